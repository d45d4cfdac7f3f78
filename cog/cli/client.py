"""HTTP client for the cog server's API (used by the CLI; other programs may use it too).

Uploads stream from a file, or from a model directory zipped as it is sent; downloads
stream to a file and build events are read line by line as they arrive: nothing here
holds a package or a build log in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.payload import AsyncIterablePayload

from cog import events
from cog.cli.output import CLIError
from cog.package import PackageError, PackagePlan, package_chunks
from cog.streams import LineTooLong, file_chunks, in_thread, lines
from cog.tls import load_certificates

CHUNK = 1024 * 1024
Progress = Callable[[int], None]


class RegistryClient:
    def __init__(self, base_url: str, *, token: str | None = None, connect_timeout: float = 10.0):
        """token: sent as ``Authorization: Bearer`` with every request (None: anonymous)."""
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> RegistryClient:
        if self.base_url.startswith("https:"):
            load_certificates()  # put off by the CLI (cog.tls), needed now
        self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._session is not None
        await self._session.close()

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    async def _request(self, method: str, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        assert self._session is not None, "use `async with RegistryClient(...)`"
        try:
            response = await self._session.request(method, self._url(path), **kwargs)
        except aiohttp.ClientConnectorError as exc:
            raise CLIError(
                f"cannot reach the cog server at {self.base_url} ({exc.os_error or exc}); "
                "is it running? (set it with `cog remote set URL`)"
            ) from None
        except aiohttp.ClientError as exc:
            raise CLIError(f"request to {self.base_url} failed: {exc}") from None
        if response.status >= 400:
            message = await _error_message(response)
            if response.status == 401:
                how = "a different token" if self._headers else "a token"
                message += f"; log in with `cog login` or set COG_TOKEN to use {how}"
            raise CLIError(message)
        return response

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        async with await self._request(method, path, **kwargs) as response:
            try:
                return await response.json()
            except (aiohttp.ContentTypeError, ValueError):
                raise CLIError(
                    f"{self.base_url} answered {path} with something that is not JSON; "
                    "is it a cog server?"
                ) from None

    # -- API ---------------------------------------------------------------------------

    async def ping(self) -> dict[str, Any]:
        return await self._json("GET", "/ping")

    async def whoami(self) -> dict[str, Any]:
        """Who the server takes this client for: Name, Scopes, Anonymous."""
        return await self._json("GET", "/v1/whoami")

    async def list(self) -> list[dict[str, Any]]:
        return await self._json("GET", "/v1/packages/")

    async def show(self, ref: str) -> dict[str, Any]:
        return await self._json("GET", f"/v1/packages/{ref}")

    async def delete(self, ref: str) -> dict[str, Any]:
        return await self._json("DELETE", f"/v1/packages/{ref}")

    async def predict(
        self,
        ref: str,
        inputs: list[tuple[str, str]],
        output_path: Path | None,
        signature: dict[str, Any] | None = None,
    ):
        """One inference on the server (``-i`` inputs, named); the text it answered, or
        the file it answered saved (as ``cog infer`` saves it). A predictor of today's Cog
        (``signature``'s kind) gets JSON, and its output is written as Cog writes it."""
        from cog.cli.infer import Output, _form, _save

        if signature is not None and signature.get("kind") == "predictor":
            return await self._predict_json(ref, inputs, output_path, signature)
        opened: list = []
        try:
            form = _form(inputs, opened)
            async with await self._request(
                "POST", f"/v1/packages/{ref}/predictions", data=form
            ) as response:
                kind = response.content_type
                if kind.startswith("text/") or kind == "application/json":
                    return Output(kind, text=await response.text())
                return Output(kind, path=await _save(response, output_path))
        finally:
            for file in opened:
                file.close()

    async def _predict_json(
        self,
        ref: str,
        inputs: list[tuple[str, str]],
        output_path: Path | None,
        signature: dict[str, Any],
    ):
        from cog.cli.infer import Output
        from cog.cli.predict import PredictionInputError, prediction_input, write_output
        from cog.signature import Signature

        described = Signature.from_json(signature)
        try:
            values = await asyncio.to_thread(prediction_input, described, inputs)
        except PredictionInputError as exc:
            raise CLIError(str(exc)) from None
        path = f"/v1/packages/{ref}/predictions"
        answer = await self._json("POST", path, json={"input": values})
        try:
            text, written = await asyncio.to_thread(
                write_output, answer.get("output"), described.output, output_path
            )
        except OSError as exc:
            raise CLIError(f"cannot write the output: {exc.strerror or exc}") from None
        except PredictionInputError as exc:
            raise CLIError(str(exc)) from None
        return Output("application/json", text=text, paths=tuple(written))

    async def upload(
        self,
        zip_path: Path,
        progress: Progress | None = None,
        *,
        name: str | None = None,
        no_cache: bool = False,
    ) -> AsyncIterator[dict[str, Any]]:
        """Upload a package zip; the server's build events as they happen. ``name``: the
        package's name if its cog.yaml has none; ``no_cache``: the server builds every
        step again, using no cached layer."""
        size = zip_path.stat().st_size
        chunks = _counted(file_chunks(zip_path), progress)
        async for event in self._upload(chunks, size, name, no_cache):
            yield event

    async def upload_package(
        self,
        plan: PackagePlan,
        progress: Progress | None = None,
        *,
        name: str | None = None,
        no_cache: bool = False,
    ) -> AsyncIterator[dict[str, Any]]:
        """Upload a model directory's package, zipped as it is sent (no file on the way);
        the server's build events as they happen. PackageError (as CLIError) if a file
        cannot be read or changes meanwhile: the request is then abandoned, and the
        server keeps nothing of it."""
        failure: list[PackageError] = []

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in in_thread(package_chunks(plan)):
                    yield chunk
            except PackageError as exc:
                failure.append(exc)
                raise

        try:
            async for event in self._upload(
                _counted(chunks(), progress), plan.size, name, no_cache
            ):
                yield event
        except (CLIError, PackageError, aiohttp.ClientError):
            if failure:  # the request failed because the zip did: say why
                raise CLIError(str(failure[0])) from None
            raise

    async def _upload(
        self, chunks: AsyncIterator[bytes], size: int, name: str | None, no_cache: bool
    ) -> AsyncIterator[dict[str, Any]]:
        with aiohttp.MultipartWriter("form-data") as form:
            part = form.append_payload(_Sized(chunks, size, content_type="application/zip"))
            part.set_content_disposition("form-data", name="file", filename="package.zip")
            headers = {"Accept": events.NDJSON}
            params = {"name": name} if name else {}
            if no_cache:
                params["no_cache"] = "1"
            async with await self._request(
                "POST", "/v1/packages/upload", data=form, headers=headers, params=params
            ) as response:
                async for event in _events(response):
                    yield event

    async def rebuild(self, ref: str, *, no_cache: bool = False) -> AsyncIterator[dict[str, Any]]:
        headers = {"Accept": events.NDJSON}
        path = f"/v1/packages/{ref}/build" + ("?no_cache=1" if no_cache else "")
        async with await self._request("POST", path, headers=headers) as response:
            async for event in _events(response):
                yield event

    async def log(self, ref: str) -> AsyncIterator[dict[str, Any]]:
        async with await self._request("GET", f"/v1/packages/{ref}/log") as response:
            async for event in _events(response):
                yield event

    async def download(
        self,
        ref: str,
        dest: Path | None,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[Path, str]:
        """Save the package zip (atomically; verified against its ID). Path and ID."""
        package_id = (await self.show(ref))["ID"]
        if dest is not None:
            _check_destination(dest)  # before anything is downloaded
        async with await self._request("GET", f"/v1/packages/{package_id}.zip") as response:
            total = response.content_length or 0
            name = Path(response.content_disposition.filename or f"{package_id[:12]}.zip").name
            if dest is None:
                dest = Path(name)
            elif dest.is_dir():  # like cp: into the directory, under the package's file name
                dest = dest / name
            dest = dest.resolve()
            try:
                fd, tmp_name = tempfile.mkstemp(prefix=".cog-download-", dir=dest.parent)
            except OSError as exc:  # named after the file asked for, not our temp file
                raise OSError(exc.errno, exc.strerror, str(dest)) from None
            digest = hashlib.sha256()
            done = 0
            try:
                with os.fdopen(fd, "wb") as file:
                    async for chunk in response.content.iter_chunked(CHUNK):
                        digest.update(chunk)
                        await asyncio.to_thread(file.write, chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, total)
                if digest.hexdigest() != package_id:
                    raise CLIError(
                        "the downloaded bytes do not match the package ID "
                        f"(got sha256 {digest.hexdigest()[:12]}); nothing was saved"
                    )
                os.replace(tmp_name, dest)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
        return dest, package_id


def _check_destination(dest: Path) -> None:
    """A clear error now for a -o path that cannot be written, rather than after the
    download."""
    if dest.is_dir():
        return
    parent = dest.resolve().parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise CLIError(f"cannot save to {dest}: the directory {parent} {what}")


class _Sized(AsyncIterablePayload):
    """A stream whose length is known: the form, and so the request, gets a
    Content-Length (the server refuses an upload over its limit before reading it)."""

    def __init__(self, chunks: AsyncIterator[bytes], size: int, **kwargs: Any):
        super().__init__(chunks, **kwargs)
        self._known_size = size

    @property
    def size(self) -> int:
        return self._known_size


async def _counted(chunks: AsyncIterator[bytes], progress: Progress | None) -> AsyncIterator[bytes]:
    done = 0
    async for chunk in chunks:
        done += len(chunk)
        if progress:
            progress(done)
        yield chunk


async def _events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """Events of an NDJSON response, or the one result of a plain JSON one."""
    if not response.content_type.endswith("ndjson"):
        yield events.package(await response.json())
        return
    try:
        async for line in lines(response.content.iter_any()):
            yield _decode(line)
    except aiohttp.ClientPayloadError:
        raise CLIError(
            "the connection to the server broke before the build ended; "
            "see `cog logs ID` for what happened"
        ) from None
    except LineTooLong as exc:
        raise CLIError(f"the server sent no build event: {exc}") from None


def _decode(line: bytes) -> dict[str, Any]:
    try:
        return events.decode(line)
    except ValueError:
        raise CLIError(
            f"the server sent something that is not a build event: {line[:100]!r}"
        ) from None


async def _error_message(response: aiohttp.ClientResponse) -> str:
    try:
        body = await response.json(content_type=None)
        message = body.get("error") if isinstance(body, dict) else None
    except (ValueError, aiohttp.ClientError):
        message = None
    if not message:
        text = (await response.text(errors="replace")).strip()
        message = text[:300] or response.reason or "no details"
    return f"{message} (HTTP {response.status})" if "\n" not in message else message
