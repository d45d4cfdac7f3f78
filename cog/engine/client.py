"""One Docker Engine, through its API: address, streamed calls, image presence, pull, push.

The address is ``--docker-host``, else ``DOCKER_HOST``, else the local socket, in the
docker CLI's order (cog reads no docker context). Pushes and pulls carry the registry's
credentials from Docker's config or a file in its format (:mod:`cog.engine.auth`). Every
failure is an :class:`EngineError`: :class:`EngineUnreachable` when the engine cannot be
reached at all, :class:`RegistryUnreachable` when the engine cannot reach a registry,
:class:`RegistryLoginRefused` when the registry refuses the credentials (or their
absence), :class:`ImageNotFound` for a pull of an image nobody has.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiodocker
import aiohttp
import attrs

from cog.engine.auth import RegistryAuth, RegistryAuthError, registry_of
from cog.streams import lines

#: The Docker Engine when neither --docker-host nor DOCKER_HOST names one
DEFAULT_ENGINE = "unix:///var/run/docker.sock"
#: aiodocker's status for "could not connect to the engine at all"
_CONNECTION_FAILED = 900
#: lines of progress kept for an error's account of a failed pull or push
TAIL = 20
_LOGIN_REFUSED = re.compile(
    r"no basic auth credentials|unauthorized|authentication required|denied|"
    r"incorrect username or password",
    re.IGNORECASE,
)
_REGISTRY_UNREACHABLE = re.compile(
    r"connection refused|no such host|dial tcp|i/o timeout|server gave HTTP response|"
    r"network is unreachable|no route to host|TLS handshake|"
    # a registry (or a proxy in front of it) that hung up on the engine
    r"\bEOF\b|connection reset by peer|broken pipe",
    re.IGNORECASE,
)


class EngineError(Exception):
    """The engine refused or failed a call; ``status`` is its HTTP status where it gave
    one, ``output`` the last progress lines of a failed stream."""

    def __init__(self, message: str, status: int = 500, output: tuple[str, ...] = ()):
        super().__init__(message)
        self.message = message
        self.status = status
        self.output = tuple(output)


class EngineUnreachable(EngineError):
    """The engine cannot be reached (no socket, refused, connection broken)."""


class RegistryUnreachable(EngineError):
    """The engine could not reach the registry it was to pull from or push to."""


class RegistryLoginRefused(EngineError):
    """The registry refused the credentials cog sent (or wants some and got none)."""


class ImageNotFound(EngineError):
    """A pull of an image the registry does not have (or the engine cannot resolve)."""


@attrs.frozen
class Pushed:
    """The end of a push: the registry's manifest digest of the image."""

    image: str
    digest: str


def engine_address(docker_host: str | None) -> str:
    """The engine cog uses: ``docker_host``, else ``DOCKER_HOST``, else the local socket."""
    return docker_host or os.environ.get("DOCKER_HOST") or DEFAULT_ENGINE


def split_image(image: str) -> tuple[str, str]:
    """'host:5000/a/b:tag' -> ('host:5000/a/b', 'tag')."""
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, "latest"
    return name, tag


def stream_error(item: dict) -> str | None:
    """The error an engine progress line reports, if any."""
    if "errorDetail" in item or "error" in item:
        detail = item.get("errorDetail") or {}
        return (detail.get("message") or item.get("error") or "unknown error").strip()
    return None


class Engine:
    """A client of one Docker Engine; ``async with Engine(docker_host) as engine:``."""

    def __init__(
        self, docker_host: str | None = None, *, registry_auth: RegistryAuth | None = None
    ):
        self.address = engine_address(docker_host)
        #: where pushes and pulls find registry credentials (default: Docker's config)
        self.registry_auth = registry_auth or RegistryAuth()
        try:
            self.docker = aiodocker.Docker(url=self.address)
        except (ValueError, OSError) as exc:
            raise EngineUnreachable(
                f"no usable Docker Engine address {self.address!r}: {exc}"
            ) from None

    async def close(self) -> None:
        await self.docker.close()

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def unreachable(self, reason: object) -> EngineUnreachable:
        return EngineUnreachable(f"the Docker Engine at {self.address} is not reachable: {reason}")

    @contextlib.contextmanager
    def translated(self) -> Iterator[None]:
        """aiodocker's and aiohttp's errors of a call to the engine, as EngineErrors."""
        try:
            yield
        except aiodocker.DockerError as exc:
            if exc.status == _CONNECTION_FAILED:
                raise self.unreachable(exc.message) from None
            raise EngineError(str(exc.message), exc.status) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise self.unreachable(str(exc) or type(exc).__name__) from None

    @contextlib.asynccontextmanager
    async def stream(self, method: str, path: str, **kwargs: Any) -> AsyncIterator[Any]:
        """A streamed API call (build, push, pull, logs): the open aiohttp response.

        aiodocker's public API cannot send a body from an async generator (the build
        context) and its stream helpers leave the response open when the consumer stops
        early; its request method is used once, here, so that the response is always
        closed (a dropped build or push connection is what tells the engine to stop).
        No timeout: a build takes as long as it takes; cancellation is the caller's.
        """
        with self.translated():
            manager = self.docker._query(path, method, timeout=None, **kwargs)
            response = await manager.__aenter__()
        try:
            yield response
        finally:
            response.close()
            await manager.__aexit__(None, None, None)

    async def json_lines(self, response: Any) -> AsyncIterator[dict]:
        """An engine response's JSON-lines progress, object by object."""
        with self.translated():
            async for line in lines(response.content.iter_any()):
                yield json.loads(line)

    async def info(self) -> dict:
        with self.translated():
            return await self.docker.system.info()

    async def image(self, image: str) -> dict | None:
        """The engine's inspection of an image, or None if it does not have it."""
        try:
            with self.translated():
                return await self.docker.images.inspect(image)
        except EngineError as exc:
            if exc.status == 404:
                return None
            raise

    async def has_image(self, image: str) -> bool:
        return await self.image(image) is not None

    async def ensure_image(self, image: str, progress: Callable[[str], None] | None = None) -> None:
        """Pull image unless the engine has it already."""
        if await self.has_image(image):
            return
        async with contextlib.aclosing(self.pull(image)) as pulling:
            async for line in pulling:
                if progress:
                    progress(line)

    async def pull(self, image: str) -> AsyncIterator[str]:
        """Pull an image, yielding compact progress lines (a layer's states, no ticks)."""
        repository, tag = split_image(image)
        last: dict[str, str] = {}
        tail: collections.deque[str] = collections.deque(maxlen=TAIL)
        params = {"fromImage": repository, "tag": tag}
        headers = {"X-Registry-Auth": self._credentials(image)}
        try:
            async with self.stream("POST", "images/create", params=params, headers=headers) as r:
                async for item in self.json_lines(r):
                    error = stream_error(item)
                    if error:
                        raise self._registry_error(image, "pulling", error, tuple(tail))
                    status, layer = item.get("status", ""), item.get("id", "")
                    if status and last.get(layer) != status and status != "Downloading":
                        last[layer] = status
                        line = f"{layer}: {status}" if layer else status
                        tail.append(line)
                        yield line
        except (ImageNotFound, RegistryLoginRefused, RegistryUnreachable, EngineUnreachable):
            raise
        except EngineError as exc:
            # The engine asks the registry before it answers: a refusal, or no such image
            # (a plain 404), can come as the call's own error.
            kind = self._registry_error(image, "pulling", exc.message, exc.output)
            if exc.status == 404 and not isinstance(kind, RegistryLoginRefused):
                raise ImageNotFound(f"pulling {image} failed: {exc.message}", 404) from None
            raise kind from None

    async def push(self, image: str) -> AsyncIterator[str | Pushed]:
        """Push image (repository:tag): compact progress lines, then one :class:`Pushed`."""
        repository, tag = split_image(image)
        digest = ""
        last_status: dict[str, str] = {}
        tail: collections.deque[str] = collections.deque(maxlen=TAIL)
        params = {"tag": tag}
        headers = {"X-Registry-Auth": self._credentials(image)}
        path = f"images/{repository}/push"
        async with self.stream("POST", path, params=params, headers=headers) as response:
            async for item in self.json_lines(response):
                error = stream_error(item)
                if error:
                    raise self._registry_error(image, "pushing", error, tuple(tail))
                if isinstance(item.get("aux"), dict):
                    digest = item["aux"].get("Digest", digest)
                    continue
                status, layer = item.get("status", ""), item.get("id", "")
                if status in ("Pushing", "Waiting", "Preparing") and layer:
                    continue  # byte-progress ticks; the layer's final state is shown
                if layer:
                    if last_status.get(layer) == status:
                        continue
                    last_status[layer] = status
                    line = f"{layer}: {status}"
                else:
                    line = status
                if line:
                    tail.append(line)
                    yield line
        if not digest:
            raise EngineError(f"pushing {image} reported no digest", 500, tuple(tail))
        yield Pushed(image, digest)

    def _credentials(self, image: str) -> str:
        """The X-Registry-Auth header for image; a credentials file that cannot be read is
        a refused login, said as such."""
        try:
            return self.registry_auth.header(image)
        except RegistryAuthError as exc:
            raise RegistryLoginRefused(
                f"cannot log in to the registry {registry_of(image)}: {exc}"
            ) from None

    def _registry_error(
        self, image: str, doing: str, message: str, tail: tuple[str, ...]
    ) -> EngineError:
        """An error a push or pull reported, as the kind it is."""
        if "not found" in message or "does not exist" in message:
            return ImageNotFound(f"{doing} {image} failed: {message}", 404, tail)
        if _LOGIN_REFUSED.search(message):
            registry = registry_of(image)
            had = self.registry_auth.has_credentials(image)
            sent = "the credentials" if had else "no credentials"
            return RegistryLoginRefused(
                f"the registry {registry} refused the login ({message}) {doing} {image}: "
                f"cog sent {sent} for it from {self.registry_auth.source()}",
                401,
                tail,
            )
        if _REGISTRY_UNREACHABLE.search(message):
            return RegistryUnreachable(f"{doing} {image} failed: {message}", 500, tail)
        return EngineError(f"{doing} {image} failed: {message}", 500, tail)
