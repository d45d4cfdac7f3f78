"""The Docker builder: builds through a Docker Engine's API and pushes with it (aiodocker).

The Engine address comes from ``--docker-host``, else ``DOCKER_HOST``, else the local
socket, as the docker CLI does (:func:`cog.builders.engine_address`). The build context is
streamed to ``POST /build`` as a tar made on the fly from the package zip
(:mod:`cog.builders.context`); the engine's output and the push progress come back line
by line as :class:`~cog.builders.BuildLog` events. Closing the event iterator closes the
connection, which makes the engine stop the build (intermediate containers are always
removed: ``forcerm``).
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable

import aiodocker
import aiohttp

from cog.builders import (
    Builder,
    BuildError,
    BuilderSettings,
    BuilderUnavailable,
    BuildEvent,
    BuildLog,
    BuildRequest,
    BuiltImage,
    engine_address,
)
from cog.builders.context import build_context
from cog.builders.dockerfile import base_image, dockerfile_for_request

TAIL = 20
#: aiodocker's status for "could not connect to the engine at all"
CONNECTION_FAILED = 900
_STEP = re.compile(r"^Step \d+/\d+ : ")
_UNREACHABLE = re.compile(
    r"connection refused|no such host|dial tcp|i/o timeout|server gave HTTP response|"
    r"network is unreachable|no route to host|TLS handshake",
    re.IGNORECASE,
)


@contextlib.asynccontextmanager
async def engine_stream(
    docker: aiodocker.Docker, method: str, path: str, **kwargs
) -> AsyncIterator[aiohttp.ClientResponse]:
    """A streaming Engine API request (build, push, pull, logs).

    aiodocker leaves closing the response to the caller, and its stream helpers do not when
    the consumer stops early: here it is always closed, so a cancelled build drops its
    connection (which also tells the engine to stop). No timeout: a build takes as long as
    it takes; cancellation is the caller's.
    """
    async with docker._query(path, method, timeout=None, **kwargs) as response:
        try:
            yield response
        finally:
            response.close()


def stream_error(item: dict) -> str | None:
    """The error an engine progress line reports, if any."""
    if "errorDetail" in item or "error" in item:
        detail = item.get("errorDetail") or {}
        return (detail.get("message") or item.get("error") or "unknown error").strip()
    return None


def split_image(image: str) -> tuple[str, str]:
    """'host:5000/a/b:tag' -> ('host:5000/a/b', 'tag')."""
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, "latest"
    return name, tag


def engine(docker_host: str | None) -> aiodocker.Docker:
    """A client of the Docker Engine at engine_address(docker_host)."""
    try:
        return aiodocker.Docker(url=engine_address(docker_host))
    except (ValueError, OSError) as exc:
        raise BuilderUnavailable(f"no usable Docker Engine address: {exc}") from None


def address_of(docker: aiodocker.Docker) -> str:
    """The engine's address as the operator wrote it, for messages: aiodocker's own
    docker_host is unix://localhost for every socket."""
    if isinstance(docker.connector, aiohttp.UnixConnector):
        return f"unix://{docker.connector.path}"
    return docker.docker_host


def unreachable(
    docker: aiodocker.Docker, exc: object, step: str | None = None
) -> BuilderUnavailable:
    return BuilderUnavailable(
        f"the Docker Engine at {address_of(docker)} is not reachable: {exc}", step=step
    )


async def push_image(docker: aiodocker.Docker, image: str) -> AsyncIterator[BuildEvent]:
    """Push image (repository:tag) through the engine: compact progress, then BuiltImage."""
    repository, tag = split_image(image)
    digest = ""
    last_status: dict[str, str] = {}
    tail: collections.deque[str] = collections.deque(maxlen=TAIL)
    try:
        async with engine_stream(
            docker,
            "POST",
            f"images/{repository}/push",
            params={"tag": tag},
            headers={"X-Registry-Auth": "e30="},  # "{}": anonymous push
        ) as response:
            async for item in json_lines(response):
                error = stream_error(item)
                if error:
                    raise docker_error(500, error)
                if "aux" in item and isinstance(item["aux"], dict):
                    digest = item["aux"].get("Digest", digest)
                    continue
                status = item.get("status", "")
                layer = item.get("id", "")
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
                    yield BuildLog(stage="push", line=line)
    except aiodocker.DockerError as exc:
        if exc.status == CONNECTION_FAILED:
            raise unreachable(docker, exc.message, "push") from None
        message = str(exc.message if hasattr(exc, "message") else exc)
        kind = BuilderUnavailable if _UNREACHABLE.search(message) else BuildError
        raise kind(f"pushing {image} failed: {message}", step="push", output=tuple(tail)) from None
    except aiohttp.ClientError as exc:
        raise unreachable(docker, exc, "push") from None
    if not digest:
        raise BuildError(f"pushing {image} reported no digest", step="push", output=tuple(tail))
    yield BuiltImage(image=image, digest=digest)


async def has_image(docker: aiodocker.Docker, image: str) -> bool:
    """Whether the engine has image; any answer but "yes" or 404 raises aiodocker's error
    (400 for a malformed reference, 900 for an engine it cannot reach)."""
    try:
        await docker.images.inspect(image)
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            return False
        raise
    return True


async def ensure_image(
    docker: aiodocker.Docker, image: str, progress: Callable[[str], None] | None = None
) -> None:
    """Pull image unless the engine has it already."""
    if await has_image(docker, image):
        return
    async with contextlib.aclosing(pull_image(docker, image)) as pulling:
        async for line in pulling:
            if progress:
                progress(line)


async def pull_image(docker: aiodocker.Docker, image: str) -> AsyncIterator[str]:
    """Pull image through the engine, yielding compact progress lines as they come."""
    repository, tag = split_image(image)
    last: dict[str, str] = {}
    async with engine_stream(
        docker,
        "POST",
        "images/create",
        params={"fromImage": repository, "tag": tag},
        headers={"X-Registry-Auth": "e30="},
    ) as response:
        async for item in json_lines(response):
            error = stream_error(item)
            if error:
                raise docker_error(404 if "not found" in error else 500, error)
            status, layer = item.get("status", ""), item.get("id", "")
            if status and last.get(layer) != status and status != "Downloading":
                last[layer] = status
                yield f"{layer}: {status}" if layer else status


def docker_error(status: int, message: str) -> aiodocker.DockerError:
    """An aiodocker error for a failure reported inside a stream. aiodocker before 0.24 takes
    the engine's JSON body, later ones the message: this works with both."""
    error = aiodocker.DockerError(status, {"message": message})
    error.message = message
    return error


async def json_lines(response: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """The engine's JSON-lines progress stream, object by object, lines of any length."""
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)
    if buffer.strip():
        yield json.loads(buffer)


class DockerBuilder(Builder):
    name = "docker"

    def __init__(self, settings: BuilderSettings):
        self.settings = settings
        self._docker: aiodocker.Docker | None = None

    @classmethod
    def from_settings(cls, settings: BuilderSettings) -> DockerBuilder:
        return cls(settings)

    async def open(self) -> None:
        self._docker = engine(self.settings.docker_host)

    async def close(self) -> None:
        if self._docker is not None:
            await self._docker.close()
            self._docker = None

    def dockerfile(self, request: BuildRequest) -> str:
        return dockerfile_for_request(request, self.settings)

    async def build(self, request: BuildRequest) -> AsyncIterator[BuildEvent]:
        if self._docker is None:
            await self.open()
        docker = self._docker
        assert docker is not None
        for stage in (self._engine_build(docker, request), push_image(docker, request.image)):
            async with contextlib.aclosing(stage):
                async for event in stage:
                    yield event

    async def _base_image(self, docker: aiodocker.Docker, base: str) -> AsyncIterator[BuildLog]:
        """Make sure the engine has the base image; pull it (progress as log lines) if not.

        A base image nobody can get is the server's setup, not the package's fault; so is
        one the engine refuses to look up (a malformed name from a --base-image template)."""
        try:
            if await has_image(docker, base):
                return
        except aiodocker.DockerError as exc:
            if exc.status == CONNECTION_FAILED:
                raise unreachable(docker, exc.message, "base image") from None
            raise BuilderUnavailable(
                f"base image {base}: the Docker Engine refused it: {exc.message} "
                "(check --base-image)",
                step="base image",
            ) from None
        except aiohttp.ClientError as exc:
            raise unreachable(docker, exc, "base image") from None
        yield BuildLog(stage="build", line=f"Pulling base image {base}")
        tail: collections.deque[str] = collections.deque(maxlen=TAIL)
        try:
            async with contextlib.aclosing(pull_image(docker, base)) as pulling:
                async for line in pulling:
                    tail.append(line)
                    yield BuildLog(stage="build", line=line)
        except (aiodocker.DockerError, aiohttp.ClientError) as exc:
            reason = getattr(exc, "message", None) or str(exc)
            raise BuilderUnavailable(
                f"base image {base} not found on the Docker engine; build it "
                "(contrib/setup-machine.sh) or set --base-image (pulling it failed: "
                f"{reason})",
                step="base image",
                output=tuple(tail),
            ) from None

    async def _engine_build(
        self, docker: aiodocker.Docker, request: BuildRequest
    ) -> AsyncIterator[BuildLog]:
        dockerfile = self.dockerfile(request)
        base = base_image(request.config, request.target, self.settings)
        async with contextlib.aclosing(self._base_image(docker, base)) as preparing:
            async for line in preparing:
                yield line
        params = {"t": request.image, "rm": "1", "forcerm": "1", "pull": "0"}
        context = build_context(request.package_zip, dockerfile)
        tail: collections.deque[str] = collections.deque(maxlen=TAIL)
        step: str | None = None
        try:
            # aiodocker's public build() wants a blocking file object; the raw request
            # lets the tar stream from an async generator instead.
            async with engine_stream(
                docker,
                "POST",
                "build",
                params=params,
                data=context,
                headers={"Content-Type": "application/x-tar"},
            ) as response:
                pending = ""
                async for item in json_lines(response):
                    error = stream_error(item)
                    if error:
                        raise BuildError(
                            f"docker build failed: {error}",
                            step=step,
                            output=tuple(tail),
                        )
                    text = pending + item.get("stream", "")
                    *lines, pending = text.split("\n")
                    for line in lines:
                        line = line.rstrip("\r")
                        if not line.strip():
                            continue
                        if _STEP.match(line):
                            step = line
                            tail.clear()
                        tail.append(line)
                        yield BuildLog(stage="build", line=line)
                if pending.strip():
                    yield BuildLog(stage="build", line=pending)
        except aiodocker.DockerError as exc:
            if exc.status == CONNECTION_FAILED:
                raise unreachable(docker, exc.message, step or "build") from None
            raise BuildError(f"docker build failed: {exc.message}", step=step) from None
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, OSError) as exc:
            raise unreachable(docker, exc, step or "build") from None
        finally:
            await context.aclose()


__all__ = [
    "DockerBuilder",
    "address_of",
    "engine",
    "ensure_image",
    "has_image",
    "pull_image",
    "push_image",
    "split_image",
]


@contextlib.asynccontextmanager
async def opened_engine(docker_host: str | None) -> AsyncIterator[aiodocker.Docker]:
    docker = engine(docker_host)
    try:
        yield docker
    finally:
        await docker.close()
