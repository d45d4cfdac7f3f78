"""Model containers kept warm for the server's predictions: one per package, reused.

A request asks the pool for a package's model (``async with pool.model(id, image) as m``).
The first request starts the package's CPU image (pull, boot, ``setup()``); later ones
reuse it, one request at a time per container, the others waiting their turn. At most
``max_warm`` containers are up at once: a request for another package removes the one
unused longest, or waits until one is free; at most ``max_queue`` requests wait at once,
and more are refused (:class:`QueueFull`). A container unused for ``warm_for`` seconds is
removed; so is one whose request failed, was cancelled or ran out of time (whatever the
model was doing is stopped with it). All are removed when the server stops; those of a
server killed outright are removed by the next one (the role's stale-container sweep).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import structlog

from cog.engine import Engine, EngineError
from cog.engine.containers import ContainerError, ModelContainer, remove_stale_containers
from cog.package import short_id
from cog.server.settings import PredictionOptions

log = structlog.get_logger(__name__)

ROLE = "run"


class QueueFull(Exception):
    """Too many requests wait for a model already (503, try again later)."""


class ModelUnavailable(Exception):
    """The model's container could not be started, or did not become ready (502)."""

    def __init__(self, message: str, logs: tuple[str, ...] = ()):
        super().__init__(message)
        self.logs = logs


class WarmModel:
    """One package's container in the pool."""

    def __init__(self, package_id: str, image: str):
        self.package_id = package_id
        self.image = image
        self.container: ModelContainer | None = None
        self.starting: asyncio.Future[None] | None = None
        #: held by the request the container is serving
        self.turn = asyncio.Lock()
        #: requests holding or waiting for a turn
        self.users = 0
        self.last_used = time.monotonic()
        self.idle_timer: asyncio.TimerHandle | None = None
        self.removed = False


class WarmPool:
    """See the module docstring; one per server, closed when it stops."""

    def __init__(self, options: PredictionOptions, docker_host: str | None = None):
        self.options = options
        self.docker_host = docker_host
        self._engine: Engine | None = None
        self._engine_lock = asyncio.Lock()
        self._models: dict[str, WarmModel] = {}
        #: told whenever a container is freed or removed (a request may wait for a slot)
        self._changed = asyncio.Condition()
        self._waiting = 0
        self._removals: set[asyncio.Task[None]] = set()

    @property
    def warm(self) -> dict[str, str]:
        """Package ID -> image of the containers up or starting now."""
        return {pid: m.image for pid, m in self._models.items()}

    # -- one request's model -----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def model(self, package_id: str, image: str) -> AsyncIterator[ModelContainer]:
        """The package's running model, this request's alone until the block ends. A
        block that raises (or is cancelled) removes the container: the model may be
        stuck in the request, or dead."""
        if self._waiting >= self.options.max_queue:
            raise QueueFull(
                f"{self._waiting} requests are waiting for a model already; try again later"
            )
        self._waiting += 1
        try:
            warm = await self._acquire(package_id, image)
        finally:
            self._waiting -= 1
        assert warm.container is not None
        try:
            yield warm.container
        except BaseException:
            warm.turn.release()
            warm.users -= 1
            await asyncio.shield(self._remove(warm, "its request failed or was cancelled"))
            raise
        warm.turn.release()
        warm.users -= 1
        warm.last_used = time.monotonic()
        if warm.users == 0 and not warm.removed:
            loop = asyncio.get_running_loop()
            warm.idle_timer = loop.call_later(self.options.warm_for, self._expire, warm)
        async with self._changed:
            self._changed.notify_all()

    async def _acquire(self, package_id: str, image: str) -> WarmModel:
        while True:
            warm = self._models.get(package_id)
            if warm is None or warm.image != image:
                if warm is not None:  # the package's image changed (rebuilt)
                    await self._remove(warm, "its package has a new image")
                if not await self._make_room():
                    async with self._changed:
                        await self._changed.wait()
                    continue
                warm = WarmModel(package_id, image)
                self._models[package_id] = warm
                warm.starting = asyncio.ensure_future(self._start(warm))
            warm.users += 1
            try:
                assert warm.starting is not None
                # Shielded: the start goes on for the others if this request leaves.
                await asyncio.shield(warm.starting)
                await warm.turn.acquire()
            except BaseException:
                warm.users -= 1
                raise
            if warm.removed:  # removed while we waited for our turn: start it again
                warm.turn.release()
                warm.users -= 1
                continue
            if warm.idle_timer is not None:
                warm.idle_timer.cancel()
                warm.idle_timer = None
            return warm

    async def _make_room(self) -> bool:
        """Whether there is room for one more container (made by removing the one unused
        longest, if need be); False when every container is in use."""
        if len(self._models) < self.options.max_warm:
            return True
        idle = [m for m in self._models.values() if m.users == 0 and m.starting.done()]
        if not idle:
            return False
        oldest = min(idle, key=lambda m: m.last_used)
        await self._remove(oldest, "another model needed its place")
        return True

    async def _start(self, warm: WarmModel) -> None:
        started = time.monotonic()
        try:
            engine = await self._engine_opened()
            with engine.translated():
                await engine.ensure_image(warm.image)
            container = ModelContainer(engine, warm.image, role=ROLE)
            await container.__aenter__()
            warm.container = container
            try:
                async for _ in container.wait_ready(self.options.start_timeout):
                    pass
            except ContainerError as exc:
                raise ModelUnavailable(f"the model did not start: {exc}", exc.logs) from None
        except EngineError as exc:
            await self._remove(warm, "it could not start")
            raise ModelUnavailable(f"could not run {warm.image}: {exc.message}") from None
        except BaseException:
            await self._remove(warm, "it could not start")
            raise
        log.info(
            "model started",
            package_id=warm.package_id,
            image=warm.image,
            seconds=round(time.monotonic() - started, 2),
        )

    async def _engine_opened(self) -> Engine:
        async with self._engine_lock:
            if self._engine is None:
                engine = Engine(self.docker_host)
                await engine.__aenter__()
                try:
                    for name in await remove_stale_containers(engine, ROLE):
                        log.info("removed a model container a stopped server left", name=name)
                except BaseException:
                    await engine.__aexit__(None, None, None)
                    raise
                self._engine = engine
            return self._engine

    # -- removal -----------------------------------------------------------------------

    def _expire(self, warm: WarmModel) -> None:
        if warm.users or warm.removed:
            return
        task = asyncio.ensure_future(self._remove(warm, f"unused for {self.options.warm_for:g}s"))
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)

    async def _remove(self, warm: WarmModel, why: str) -> None:
        if self._models.get(warm.package_id) is warm:
            del self._models[warm.package_id]
        if warm.removed:
            return
        warm.removed = True
        if warm.idle_timer is not None:
            warm.idle_timer.cancel()
        container, warm.container = warm.container, None
        if container is not None:
            try:
                await asyncio.shield(container.__aexit__(None, None, None))
            except EngineError as exc:
                log.warning(
                    "could not remove a model container", name=container.name, error=str(exc)
                )
            log.info("model stopped", package_id=short_id(warm.package_id), why=why)
        async with self._changed:
            self._changed.notify_all()

    async def close(self) -> None:
        """Remove every container (the server stops)."""
        for warm in list(self._models.values()):
            if warm.starting is not None and not warm.starting.done():
                warm.starting.cancel()
                await asyncio.gather(warm.starting, return_exceptions=True)
            await self._remove(warm, "the server stops")
        await asyncio.gather(*self._removals, return_exceptions=True)
        if self._engine is not None:
            await self._engine.__aexit__(None, None, None)
            self._engine = None
