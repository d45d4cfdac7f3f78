"""A built model image running as a container: start it, wait until ready, call it, remove it.

Used by the check after a build (:mod:`cog.server.check`), by ``cog infer``
(:mod:`cog.cli.infer`) and by the server's warm models (:mod:`cog.server.warm`).
The container has no network (``--network none``): the model's code cannot reach the
cog server, the engine, the host's services or other containers. Its runtime listens on
a Unix socket in a directory shared with this machine, and cog talks to it there
(:mod:`cog.engine.model_socket`); so the engine must run on this machine. It is always
removed on the way out, also when the caller is cancelled (Ctrl-C, client gone), even
in the middle of its creation: it is named up front, so it can be removed without its ID.

Each container is labelled with its role (``check``, ``infer``), its owner (host, PID
namespace, process and instance of the cog that started it) and, when bounded, the time
after which its owner has given up on it. A process killed outright cannot remove its
containers: the next one to start a container of that role removes them
(:func:`remove_stale_containers`), leaving alone those of owners still alive, as several
servers may share one Docker Engine.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp

from cog.engine.client import Engine, EngineError
from cog.engine.model_socket import ModelSocketConnector, SocketDirectory, remove_directory_of

__all__ = ["ContainerError", "ModelContainer", "remove_stale_containers", "sweep_containers"]

LABEL = "org.cog-models.role"
#: "<host>/<pid namespace>/<pid>/<instance>" of the cog process that started the container
OWNER_LABEL = "org.cog-models.owner"
#: Unix time after which the owner has surely given up on the container
EXPIRES_LABEL = "org.cog-models.expires"
#: This process's instance, told apart from a later process that got the same PID
INSTANCE = uuid.uuid4().hex[:12]
TARGET_LABEL = "org.cog-models.target"  # written by cog.builders.dockerfile
VERSION_LABEL = "org.cog-models.cog-version"  # so is this one, on every image cog builds
#: how long a model's runtime may take to open its socket (it opens it before the
#: model's setup): an image whose runtime never does was built by an older cog
SOCKET_WAIT = 60.0
#: seconds between wait_ready's questions to the engine whether the container still runs
RUNNING_CHECK = 0.2
#: the package a check container checks
PACKAGE_LABEL = "org.cog-models.package"
#: the longest line of the model's output kept (the rest of it is dropped)
MAX_LOG_LINE = 16 * 1024
#: the model's output lines kept until they are taken (new_log_lines)
NEW_LINES = 1000
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


def pid_namespace() -> str:
    """This process's PID namespace, e.g. "pid:[4026531836]"; "" where there is none to
    read (not Linux). Two cogs in containers with --network host share a hostname, not
    the PIDs they see."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def owner() -> str:
    return f"{socket.gethostname()}/{pid_namespace()}/{os.getpid()}/{INSTANCE}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, alive
    return True


def abandoned(labels: dict[str, str], state: str, now: float) -> bool:
    """Whether a cog container was left behind by an owner that is gone.

    Its owner is gone when its time is up, or when it ran on this host, in this PID
    namespace, in a process that no longer exists. A container of an owner elsewhere (on
    another host, or in another PID namespace, where its PID means another process) is
    left to its owner until its time is up; so is one whose owner label cog cannot read.
    One of an older cog (no owner label) is removed once it has exited.
    """
    expires = labels.get(EXPIRES_LABEL, "")
    if expires:
        try:
            if float(expires) < now:
                return True
        except ValueError:
            pass
    label = labels.get(OWNER_LABEL, "")
    if not label:
        return state in ("exited", "dead", "created")
    parts = label.split("/")
    if len(parts) != 4:
        return False
    host, namespace, pid, instance = parts
    here = (socket.gethostname(), pid_namespace())
    if instance == INSTANCE or (host, namespace) != here or not pid.isdigit():
        return False
    return not _pid_alive(int(pid))


async def remove_stale_containers(engine: Engine, role: str) -> list[str]:
    """Remove the containers of `role` whose owner is gone; their names."""
    removed, _ = await sweep_containers(engine, role)
    return removed


async def sweep_containers(
    engine: Engine, role: str, *, package: str | None = None
) -> tuple[list[str], list[str]]:
    """Remove the containers of `role` (of one package, if given) whose owner is gone,
    with their socket directories: the names of those removed and of those left to
    owners still alive."""
    labels = [f"{LABEL}={role}"] + ([f"{PACKAGE_LABEL}={package}"] if package else [])
    with engine.translated():
        found = await engine.docker.containers.list(all=True, filters=json.dumps({"label": labels}))
        now = time.time()
        removed, kept = [], []
        for container in found:
            # The listing's summary of each: Labels, State, Names, Id, Mounts.
            names = ",".join(n.lstrip("/") for n in container["Names"] or []) or container.id
            if abandoned(container["Labels"] or {}, container["State"], now):
                await ModelContainer._delete(container)
                for mount in container["Mounts"] or ():
                    remove_directory_of(mount.get("Source", ""))
                removed.append(names)
            else:
                kept.append(names)
    return removed, kept


class ModelContainer:
    """``async with ModelContainer(engine, image) as model:`` a running model image.

    Entering raises EngineError when the engine cannot create or start it."""

    def __init__(
        self,
        engine: Engine,
        image: str,
        *,
        role: str = "check",
        lifetime: float | None = None,
        socket_root: Path | None = None,
        labels: dict[str, str] | None = None,
    ):
        """lifetime: seconds after which whoever finds the container may remove it;
        socket_root: where the directory of the model's socket is made (default: the
        system's temp dir); labels: more labels for the container."""
        self.engine = engine
        self.docker = engine.docker
        self.image = image
        self.role = role
        self.lifetime = lifetime
        self.socket_root = socket_root
        self.extra_labels = dict(labels or {})
        self.socket_dir: SocketDirectory | None = None
        #: given up front, so a container whose creation was interrupted can be removed
        self.name = f"cog-{role}-{uuid.uuid4().hex[:16]}"
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
        self._new_lines: collections.deque[str] = collections.deque(maxlen=NEW_LINES)
        #: lines that fell out of _new_lines before they were taken (said, not hidden)
        self._skipped = 0
        self._log_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ModelContainer:
        try:
            with self.engine.translated():
                await self._start()
        except EngineError as exc:
            if "bind source path does not exist" not in exc.message:
                raise
            raise EngineError(
                f"the Docker Engine at {self.engine.address} is not on this machine: cog "
                "runs models with no network and talks to them through a socket in a "
                "directory of this machine, which that engine cannot see"
            ) from None
        return self

    async def _start(self) -> None:
        image = await self.docker.images.inspect(self.image)
        image_labels = image.get("Config", {}).get("Labels") or {}
        if VERSION_LABEL not in image_labels:
            raise ContainerError(
                f"{self.image} is not an image cog built (it has no {VERSION_LABEL} label): "
                "cog runs a model only in its own runtime, which serves it with no network"
            )
        self.target = image_labels.get(TARGET_LABEL, "")
        if self.target == "gpu":
            runtimes = (await self.docker.system.info()).get("Runtimes")
            self.device_requests = device_requests(image["Config"]["Labels"], runtimes)
        labels = {**self.extra_labels, LABEL: self.role, OWNER_LABEL: owner()}
        if self.lifetime is not None:
            labels[EXPIRES_LABEL] = f"{time.time() + self.lifetime:.0f}"
        self.socket_dir = await asyncio.to_thread(SocketDirectory, self.socket_root)
        config = {
            "Image": self.image,
            "Labels": labels,
            "Env": [self.socket_dir.env()],
            "HostConfig": {
                "NetworkMode": "none",
                "Mounts": [self.socket_dir.mount()],
                "DeviceRequests": self.device_requests,
            },
        }
        # A task of its own: cancelling this coroutine mid-request must not leave the
        # engine creating a container nobody knows about.
        creating = asyncio.ensure_future(self.docker.containers.create(config, name=self.name))
        try:
            self.container = await asyncio.shield(creating)
            await self.container.start()
        except BaseException:
            await asyncio.shield(self._discard(creating))
            raise
        self.url = "http://model"
        self._session = aiohttp.ClientSession(
            connector=ModelSocketConnector(self.socket_dir.socket),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        self._log_task = asyncio.create_task(self._follow_logs())

    async def __aexit__(self, *exc: object) -> None:
        if self._log_task is not None:
            self._log_task.cancel()
            await asyncio.gather(self._log_task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        await self._remove()

    async def _discard(self, creating: asyncio.Future) -> None:
        """After a failed or interrupted start: wait for the create request's answer, then
        remove the container by name (there may be one even if we never saw its ID)."""
        if not creating.done():
            await asyncio.wait([creating], timeout=60)
            creating.cancel()  # an engine silent for a minute: stop waiting for its answer
        # Awaited and its exception retrieved: the caller's own exception is what counts.
        await asyncio.gather(creating, return_exceptions=True)
        self.container = None
        try:
            await self._delete(self.docker.containers.container(self.name))
        finally:
            self._remove_socket_dir()

    async def _remove(self) -> None:
        try:
            if self.container is not None:
                # Shielded: removal must finish even when the caller is being cancelled.
                with self.engine.translated():
                    await asyncio.shield(self._delete(self.container))
                self.container = None
        finally:
            self._remove_socket_dir()

    def _remove_socket_dir(self) -> None:
        if self.socket_dir is not None:
            self.socket_dir.remove()
            self.socket_dir = None

    @staticmethod
    async def _delete(container: Any) -> None:
        try:
            await container.delete(force=True)
        except aiodocker.DockerError as exc:
            if exc.status not in (404, 409):  # gone, or being removed already
                raise

    async def _follow_logs(self) -> None:
        """Collect the model's output lines (stdout and stderr) as they come. A line is
        cut at MAX_LOG_LINE characters: a model printing without newlines must not grow
        this process."""
        pending = ""
        frames = bytearray()
        try:
            async with self.engine.stream(
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
                        del frames[: 8 + size]
                        *lines, pending = (pending + text).split("\n")
                        if len(pending) > MAX_LOG_LINE:
                            lines.append(pending[:MAX_LOG_LINE])
                            pending = ""
                        for line in lines:
                            self._logs.append(line)
                            if len(self._new_lines) == NEW_LINES:
                                self._skipped += 1
                            self._new_lines.append(line)
        except (EngineError, aiohttp.ClientError):
            pass  # the container went away: its last lines are kept already

    def new_log_lines(self) -> list[str]:
        """Lines the model printed since the last call (the last NEW_LINES of them, and a
        line saying how many came before those)."""
        lines = []
        if self._skipped:
            lines.append(
                f"({self._skipped} lines of the model's output not shown: more than "
                f"{NEW_LINES} came between two reads)"
            )
            self._skipped = 0
        while self._new_lines:
            lines.append(self._new_lines.popleft())
        return lines

    async def last_log_lines(self, within: float = 5.0) -> list[str]:
        """Stop the model, then the lines it printed that new_log_lines() has not given
        yet. Its output is a stream of its own, so its last lines can arrive after its
        answers (or after /health-check said it was ready): they are read until the
        stream ends with the container (killed: it is removed next anyway), at most
        ``within`` seconds."""
        if self.container is not None:
            # Best effort: a container that is gone or stopped has ended its log
            # already, and an engine that does not answer is waited for `within` at most.
            with contextlib.suppress(
                aiodocker.DockerError, aiohttp.ClientError, asyncio.TimeoutError
            ):
                await asyncio.wait_for(self.container.kill(), within)
        if self._log_task is not None:
            await asyncio.wait([self._log_task], timeout=within)
        return self.new_log_lines()

    def log_tail(self, n: int = 20) -> tuple[str, ...]:
        return tuple(list(self._logs)[-n:])

    async def _running(self) -> bool:
        with self.engine.translated():
            info = await self.container.show()
        return bool(info["State"]["Running"])

    async def exit_code(self) -> int | None:
        """The container's exit code if it has stopped, else None (also if unknown)."""
        try:
            state = (await self.container.show())["State"]
        except (aiodocker.DockerError, aiohttp.ClientError):
            return None
        return None if state.get("Running") else int(state.get("ExitCode", -1))

    async def stopped(self, wait: float = 3.0) -> int | None:
        """The exit code once the container has stopped, waiting up to `wait` seconds for
        it (a model whose process died takes a moment to end); None if it runs on."""
        deadline = time.monotonic() + wait
        while (code := await self.exit_code()) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return code

    async def failure(self, doing: str, exc: BaseException) -> ContainerError:
        """What went wrong while `doing` (e.g. "running the inference"): the model's
        container died (its exit code and last lines), or the connection's error."""
        code = await self.stopped()
        if code is None:
            what = str(exc) or type(exc).__name__
            return ContainerError(f"{self.image}: {doing} failed: {what}", self.log_tail())
        await asyncio.sleep(0.2)  # let its last lines reach the log
        return ContainerError(
            f"{self.image}: the model's process exited (code {code}) while {doing}",
            self.log_tail(),
        )

    async def wait_ready(self, timeout: float) -> AsyncIterator[str]:
        """Poll /ping until ready; yields the model's log lines meanwhile."""
        assert self._session is not None and self.socket_dir is not None
        started = time.monotonic()
        deadline = started + timeout
        seen_running = started  # when the engine last said the container runs
        while True:
            if time.monotonic() - started > SOCKET_WAIT and not self.socket_dir.socket.exists():
                raise ContainerError(
                    f"{self.image}: the model's runtime did not open its socket within "
                    f"{SOCKET_WAIT:.0f} seconds (built by an older cog? build it again)",
                    self.log_tail(),
                )
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
            # An engine call, not made at every poll: a dead container is found a little
            # later, and the polls that find the model ready sooner cost the engine nothing.
            if time.monotonic() - seen_running >= RUNNING_CHECK:
                if not await self._running():
                    await asyncio.sleep(0.2)
                    for line in self.new_log_lines():
                        yield line
                    raise ContainerError(
                        "the model's container exited before it was ready", self.log_tail()
                    )
                seen_running = time.monotonic()
            if time.monotonic() > deadline:
                raise ContainerError(
                    f"the model was not ready after {timeout:.0f} seconds", self.log_tail()
                )
            # Most models are up within a second: poll often at first, then back off.
            await asyncio.sleep(0.02 if time.monotonic() - started < 3 else 0.25)

    async def help(self) -> dict[str, Any]:
        """The model's input signature; ContainerError if what answers is no cog model."""
        assert self._session is not None
        async with self._session.get(f"{self.url}/help") as response:
            if response.status != 200:
                raise ContainerError(
                    f"{self.image}: /help answered HTTP {response.status}", self.log_tail()
                )
            try:
                doc = await response.json()
            except aiohttp.ContentTypeError:
                raise ContainerError(
                    f"{self.image}: /help answered {response.content_type}, not JSON "
                    "(is it an image cog built?)",
                    self.log_tail(),
                ) from None
            except ValueError as exc:
                raise ContainerError(
                    f"{self.image}: /help is not valid JSON: {exc}", self.log_tail()
                ) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("arguments", {}), dict):
            raise ContainerError(
                f"{self.image}: /help is not an input signature: {doc!r:.200}", self.log_tail()
            )
        return doc

    def infer(self, form: aiohttp.FormData):
        """POST /infer; use as ``async with model.infer(form) as response``."""
        assert self._session is not None
        return self._session.post(f"{self.url}/infer", data=form)

    def request(self, method: str, path: str, **kwargs: Any):
        """Any request to the model's server; ``async with model.request(...) as response``."""
        assert self._session is not None
        return self._session.request(method, f"{self.url}{path}", **kwargs)

    def predict(self, body: dict[str, Any]):
        """POST /predictions (today's Cog); use as ``async with model.predict(body) as r``."""
        assert self._session is not None
        return self._session.post(f"{self.url}/predictions", json=body)
