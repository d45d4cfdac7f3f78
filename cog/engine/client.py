"""One Docker Engine, through its API: address, streamed calls, image presence, pull, push.

The address is ``--docker-host``, else ``DOCKER_HOST``, else the local socket, in the
docker CLI's order (cog reads no docker context). Every failure is an :class:`EngineError`:
:class:`EngineUnreachable` when the engine cannot be reached at all,
:class:`RegistryUnreachable` when the engine cannot reach a registry,
:class:`ImageNotFound` for a pull of an image nobody has.
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

from cog.streams import lines

#: The Docker Engine when neither --docker-host nor DOCKER_HOST names one
DEFAULT_ENGINE = "unix:///var/run/docker.sock"
#: aiodocker's status for "could not connect to the engine at all"
_CONNECTION_FAILED = 900
#: lines of progress kept for an error's account of a failed pull or push
TAIL = 20
#: An anonymous X-Registry-Auth: "{}" in base64
_ANONYMOUS = "e30="
_REGISTRY_UNREACHABLE = re.compile(
    r"connection refused|no such host|dial tcp|i/o timeout|server gave HTTP response|"
    r"network is unreachable|no route to host|TLS handshake",
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

    def __init__(self, docker_host: str | None = None):
        self.address = engine_address(docker_host)
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

    def published_host(self) -> str:
        """Where a port this engine publishes can be reached from here."""
        from urllib.parse import urlsplit

        if self.address.startswith(("tcp://", "http://", "https://")):
            return urlsplit(self.address.replace("tcp://", "http://")).hostname or "127.0.0.1"
        return "127.0.0.1"

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
        headers = {"X-Registry-Auth": _ANONYMOUS}
        try:
            async with self.stream("POST", "images/create", params=params, headers=headers) as r:
                async for item in self.json_lines(r):
                    error = stream_error(item)
                    if error:
                        kind = ImageNotFound if "not found" in error else _registry_error(error)
                        raise kind(f"pulling {image} failed: {error}", 404, tuple(tail))
                    status, layer = item.get("status", ""), item.get("id", "")
                    if status and last.get(layer) != status and status != "Downloading":
                        last[layer] = status
                        line = f"{layer}: {status}" if layer else status
                        tail.append(line)
                        yield line
        except EngineError as exc:
            # The engine asks the registry before it answers: no such image is a plain 404.
            if exc.status != 404 or isinstance(exc, ImageNotFound):
                raise
            raise ImageNotFound(f"pulling {image} failed: {exc.message}", 404) from None

    async def push(self, image: str) -> AsyncIterator[str | Pushed]:
        """Push image (repository:tag): compact progress lines, then one :class:`Pushed`."""
        repository, tag = split_image(image)
        digest = ""
        last_status: dict[str, str] = {}
        tail: collections.deque[str] = collections.deque(maxlen=TAIL)
        params = {"tag": tag}
        headers = {"X-Registry-Auth": _ANONYMOUS}
        path = f"images/{repository}/push"
        async with self.stream("POST", path, params=params, headers=headers) as response:
            async for item in self.json_lines(response):
                error = stream_error(item)
                if error:
                    kind = _registry_error(error)
                    raise kind(f"pushing {image} failed: {error}", 500, tuple(tail))
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


def _registry_error(message: str) -> type[EngineError]:
    return RegistryUnreachable if _REGISTRY_UNREACHABLE.search(message) else EngineError
