"""A built model image running as a container: start it, wait until ready, call it, remove it.

Used by the check after a build (:mod:`cog.check`) and by ``cog infer`` (:mod:`cog.infer`).
The container publishes the model's port 5000 on a random host port and is always
removed on the way out, also when the caller is cancelled (Ctrl-C, client gone).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import aiodocker
import aiohttp

from cog.builders.docker import (
    docker_error,
    engine_stream,
    json_lines,
    split_image,
    stream_error,
)

MODEL_PORT = "5000/tcp"
LABEL = "org.cog-models.role"
TARGET_LABEL = "org.cog-models.target"  # written by cog.builders.dockerfile
#: every GPU the engine has, as `docker run --gpus all` asks for them
ALL_GPUS = {"Driver": "", "Count": -1, "Capabilities": [["gpu"]]}


def device_requests(image_labels: dict[str, str] | None, runtimes: dict | None) -> list[dict]:
    """The GPUs to give a container of this image: all of them for a GPU image on an engine
    with NVIDIA's runtime; none otherwise (a GPU image then runs on the CPU)."""
    if (image_labels or {}).get(TARGET_LABEL) != "gpu" or "nvidia" not in (runtimes or {}):
        return []
    return [ALL_GPUS]


class ContainerError(Exception):
    """The model container could not be started, did not become ready, or died."""

    def __init__(self, message: str, logs: tuple[str, ...] = ()):
        super().__init__(message)
        self.logs = logs


def _published_host(docker: aiodocker.Docker) -> str:
    """Where a port published by this engine can be reached from here."""
    host = docker.docker_host or ""
    if host.startswith(("tcp://", "http://", "https://")):
        return urlsplit(host.replace("tcp://", "http://")).hostname or "127.0.0.1"
    return "127.0.0.1"


async def ensure_image(
    docker: aiodocker.Docker, image: str, progress: Callable[[str], None] | None = None
) -> None:
    """Pull image unless the engine has it already."""
    try:
        await docker.images.inspect(image)
        return
    except aiodocker.DockerError as exc:
        if exc.status != 404:
            raise
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
            if progress and status and last.get(layer) != status and status != "Downloading":
                last[layer] = status
                progress(f"{layer}: {status}" if layer else status)


class ModelContainer:
    """``async with ModelContainer(docker, image) as model:`` a running model image."""

    def __init__(self, docker: aiodocker.Docker, image: str, *, role: str = "check"):
        self.docker = docker
        self.image = image
        self.role = role
        self.container: Any = None
        #: the image's target (cpu, gpu) from its label; "" for an image cog did not build
        self.target = ""
        #: GPUs given to the container (see device_requests)
        self.device_requests: list[dict] = []
        self.url = ""
        self._session: aiohttp.ClientSession | None = None
        self._logs: collections.deque[str] = collections.deque(maxlen=200)
        # Lines not yet taken by new_log_lines(); bounded, as `cog infer` never takes them
        # after the model is ready and a chatty model must not grow this process.
        self._new_lines: collections.deque[str] = collections.deque(maxlen=1000)
        self._log_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ModelContainer:
        bind = "127.0.0.1" if _published_host(self.docker) == "127.0.0.1" else "0.0.0.0"
        image = await self.docker.images.inspect(self.image)
        self.target = (image.get("Config", {}).get("Labels") or {}).get(TARGET_LABEL, "")
        if self.target == "gpu":
            runtimes = (await self.docker.system.info()).get("Runtimes")
            self.device_requests = device_requests(image["Config"]["Labels"], runtimes)
        try:
            self.container = await self.docker.containers.create(
                {
                    "Image": self.image,
                    "Labels": {LABEL: self.role},
                    "ExposedPorts": {MODEL_PORT: {}},
                    "HostConfig": {
                        "PortBindings": {MODEL_PORT: [{"HostIp": bind, "HostPort": ""}]},
                        "DeviceRequests": self.device_requests,
                    },
                }
            )
            await self.container.start()
            info = await self.container.show()
            port = info["NetworkSettings"]["Ports"][MODEL_PORT][0]["HostPort"]
        except BaseException:
            await self._remove()
            raise
        self.url = f"http://{_published_host(self.docker)}:{port}"
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        self._log_task = asyncio.create_task(self._follow_logs())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._log_task is not None:
            self._log_task.cancel()
            await asyncio.gather(self._log_task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        await self._remove()

    async def _remove(self) -> None:
        if self.container is not None:
            # Shielded: removal must finish even when the caller is being cancelled.
            await asyncio.shield(self._delete(self.container))
            self.container = None

    @staticmethod
    async def _delete(container: Any) -> None:
        try:
            await container.delete(force=True)
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise

    async def _follow_logs(self) -> None:
        """Collect the model's output lines (stdout and stderr) as they come."""
        pending = ""
        frames = b""
        try:
            async with engine_stream(
                self.docker,
                "GET",
                f"containers/{self.container.id}/logs",
                params={"follow": "1", "stdout": "1", "stderr": "1"},
            ) as response:
                async for chunk in response.content.iter_any():
                    # No TTY: the engine multiplexes stdout/stderr in frames of
                    # [stream, 0, 0, 0, size (4 bytes, big-endian)] + payload.
                    frames += chunk
                    while len(frames) >= 8:
                        size = int.from_bytes(frames[4:8], "big")
                        if len(frames) < 8 + size:
                            break
                        text = frames[8 : 8 + size].decode(errors="replace")
                        frames = frames[8 + size :]
                        *lines, pending = (pending + text).split("\n")
                        for line in lines:
                            self._logs.append(line)
                            self._new_lines.append(line)
        except (aiodocker.DockerError, aiohttp.ClientError):
            pass  # the container went away: its last lines are kept already

    def new_log_lines(self) -> list[str]:
        """Lines the model printed since the last call."""
        lines = []
        while self._new_lines:
            lines.append(self._new_lines.popleft())
        return lines

    def log_tail(self, n: int = 20) -> tuple[str, ...]:
        return tuple(list(self._logs)[-n:])

    async def _running(self) -> bool:
        info = await self.container.show()
        return bool(info["State"]["Running"])

    async def wait_ready(self, timeout: float) -> AsyncIterator[str]:
        """Poll /ping until ready; yields the model's log lines meanwhile."""
        assert self._session is not None
        started = time.monotonic()
        deadline = started + timeout
        while True:
            for line in self.new_log_lines():
                yield line
            try:
                async with self._session.get(
                    f"{self.url}/ping", timeout=aiohttp.ClientTimeout(total=5)
                ) as response:
                    body = await response.json(content_type=None)
                    if response.status == 200:
                        return
                    if isinstance(body, dict) and body.get("status") == "failed":
                        await asyncio.sleep(0.2)  # let the traceback reach the log
                        for line in self.new_log_lines():
                            yield line
                        raise ContainerError(
                            f"the model's setup failed: {body.get('error', 'no details')}",
                            self.log_tail(),
                        )
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                pass  # not listening yet
            if not await self._running():
                await asyncio.sleep(0.2)
                for line in self.new_log_lines():
                    yield line
                raise ContainerError(
                    "the model's container exited before it was ready", self.log_tail()
                )
            if time.monotonic() > deadline:
                raise ContainerError(
                    f"the model was not ready after {timeout:.0f} seconds", self.log_tail()
                )
            # Most models are up within a second: poll often at first, then back off.
            await asyncio.sleep(0.05 if time.monotonic() - started < 3 else 0.25)

    async def help(self) -> dict[str, Any]:
        assert self._session is not None
        async with self._session.get(f"{self.url}/help") as response:
            return await response.json()

    def infer(self, form: aiohttp.FormData):
        """POST /infer; use as ``async with model.infer(form) as response``."""
        assert self._session is not None
        return self._session.post(f"{self.url}/infer", data=form)
