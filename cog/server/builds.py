"""From a received upload to a stored, built and checked package, as a stream of events.

:meth:`Packages.ingest` is an async generator of build events (see :mod:`cog.events`):
status lines, every builder/check log line as it happens, then one final ``package`` or
``error`` event. The HTTP layer writes them out as NDJSON or keeps only the last one.

Every event of a build is also appended to a log file (later stored as ``logs/<id>.log``)
and published to anyone following the build live (``GET /v1/packages/<id>/log``), so a
build's log is kept on disk and in Storage, never in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import structlog

from cog import events
from cog.builders import (
    Builder,
    BuildError,
    BuilderUnavailable,
    BuildLog,
    BuildRequest,
    being_cancelled,
)
from cog.config import Config
from cog.package import short_id
from cog.server.catalog import Catalog, PackageNotFound, log_key, package_key
from cog.server.records import Artifact, PackageRecord, Status, now, record_to_json
from cog.storage import NotFound, Storage

log = structlog.get_logger(__name__)

Event = dict[str, Any]
FILE_CHUNK = 1024 * 1024
DEFAULT_NAME = "cog-model"


@attrs.frozen
class BuildOptions:
    #: registry host[:port][/path] images are pushed to
    registry: str = "127.0.0.1:5000"
    #: boot the built image and run the package's examples before calling it ready
    check_images: bool = True
    check_timeout: float = 300.0
    #: Docker Engine that runs the check (None: DOCKER_HOST or the default socket)
    docker_host: str | None = None
    #: builds running at once in this server; more wait for a slot
    max_concurrent_builds: int = 1
    #: a running build refreshes its record this often...
    heartbeat: float = 30.0
    #: ...so a "building" record older than this belongs to a server that died: rebuild
    stale_after: float = 120.0


def missing_zip(package_id: str) -> str:
    """The error for a record whose zip is gone (a delete running now, a store changed by
    hand)."""
    return (
        f"package {short_id(package_id)} has a record but its zip is not in storage "
        "(being deleted?); upload it again to restore it"
    )


async def file_chunks(path: Path, chunk_size: int = FILE_CHUNK) -> AsyncIterator[bytes]:
    """A local file as an async byte stream; reads happen in a worker thread."""
    loop = asyncio.get_running_loop()
    file = await loop.run_in_executor(None, open, path, "rb")
    try:
        while chunk := await loop.run_in_executor(None, file.read, chunk_size):
            yield chunk
    finally:
        await asyncio.shield(loop.run_in_executor(None, file.close))  # closed even if cancelled


class LiveBuild:
    """One build running in this process: its events on disk, and live followers."""

    def __init__(self, tmp_dir: Path):
        fd, name = tempfile.mkstemp(prefix="build-", suffix=".ndjson", dir=tmp_dir)
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._count = 0
        self._followers: set[asyncio.Queue[tuple[int, Event] | None]] = set()
        self.done = False

    def publish(self, event: Event) -> None:
        # Appended to the log file (buffered; flushed when a follower joins late).
        self._file.write(events.encode(event))
        for queue in self._followers:
            queue.put_nowait((self._count, event))
        self._count += 1

    def finish(self) -> None:
        self.done = True
        self._file.close()
        for queue in self._followers:
            queue.put_nowait(None)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)

    async def follow(self) -> AsyncIterator[Event]:
        """Everything published so far (from the file), then new events until the end."""
        queue: asyncio.Queue[tuple[int, Event] | None] = asyncio.Queue()
        self._followers.add(queue)
        try:
            replayed = 0
            if self._count and not self.done:
                self._file.flush()
            if self._count:
                async for line in _lines(self.path):
                    yield events.decode(line)
                    replayed += 1
            while not self.done or not queue.empty():
                item = await queue.get()
                if item is None:
                    break
                index, event = item
                if index >= replayed:
                    yield event
        finally:
            self._followers.discard(queue)


async def _lines(path: Path) -> AsyncIterator[bytes]:
    pending = b""
    async for chunk in file_chunks(path, 64 * 1024):
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            if line:
                yield line
    if pending:
        yield pending


class Packages:
    """Ingests packages: store, build each architecture, check, record. One per app."""

    def __init__(
        self,
        storage: Storage,
        catalog: Catalog,
        builder: Builder | None,
        options: BuildOptions,
        tmp_dir: Path,
    ):
        self.storage = storage
        self.catalog = catalog
        self.builder = builder
        self.options = options
        self.tmp_dir = tmp_dir
        self._live: dict[str, LiveBuild] = {}
        self._slots = asyncio.Semaphore(options.max_concurrent_builds)

    def live(self, package_id: str) -> LiveBuild | None:
        return self._live.get(package_id)

    async def ingest(
        self,
        package_id: str,
        size: int,
        zip_path: Path,
        config: Config,
        signature: dict[str, Any] | None,
    ) -> AsyncIterator[Event]:
        """Store, build and check one uploaded package, received and verified (zip_path
        stays the caller's)."""
        existing: PackageRecord | None
        try:
            existing = await self.catalog.get(package_id)
        except PackageNotFound:
            existing = None

        key = package_key(package_id)
        if existing is not None and existing.status is Status.READY:
            if not await self.storage.exists(key):  # lost to a delete race (below): restore
                yield events.status("Storing package (its stored copy was missing)")
                await self.storage.write(key, file_chunks(zip_path))
            yield events.status("This package is already stored and built; nothing to do")
            yield events.package(record_to_json(existing))
            return
        if existing is not None and existing.status is Status.BUILDING:
            live = self._live.get(package_id)
            if live is not None:
                yield events.status("This package is being built already; following that build")
                async with contextlib.aclosing(live.follow()) as stream:
                    async for event in stream:
                        yield event
                return
            if not self._is_stale(existing):
                async for event in self._await_other_server(package_id):
                    yield event
                return

        if not await self.storage.exists(key):
            yield events.status("Storing package")
            await self.storage.write(key, file_chunks(zip_path))
        record = PackageRecord(
            id=package_id,
            name=config.name or DEFAULT_NAME,
            config=config,
            created=existing.created if existing else now(),
            updated=now(),
            status=Status.BUILDING if self.builder else Status.READY,
            size=size,
            signature=signature,
        )
        await self.catalog.put(record)
        # Another server's delete of this package may have removed the zip after we saw it
        # (its record first, then its zip): look again now that our record exists, and
        # write it back if it went. Packages are content-addressed, so rewriting is safe.
        # This narrows the race, it does not close it (the other delete may remove the zip
        # after this look, too): a record whose zip is gone answers 404 for the download
        # and is mended by uploading the package again.
        if not await self.storage.exists(key):
            log.warning("package zip deleted while it was uploaded again; storing it again")
            yield events.status("Storing package (a delete removed the stored copy meanwhile)")
            await self.storage.write(key, file_chunks(zip_path))
        if self.builder is None:
            yield events.status("Stored (this server has no builder, so no images were built)")
            yield events.package(record_to_json(record))
            return
        async with contextlib.aclosing(self._build(record, zip_path)) as stream:
            async for event in stream:
                yield event

    async def rebuild(self, record: PackageRecord) -> AsyncIterator[Event]:
        """Build a stored package again (e.g. after the registry came back)."""
        if self.builder is None:
            yield events.error("this server has no builder configured", 409)
            return
        if record.id in self._live or (
            record.status is Status.BUILDING and not self._is_stale(record)
        ):
            yield events.error("this package is being built already", 409)
            return
        fd, name = tempfile.mkstemp(prefix="rebuild-", suffix=".zip", dir=self.tmp_dir)
        os.close(fd)
        zip_path = Path(name)
        try:
            yield events.status("Fetching package from storage")
            try:
                async with self.storage.open_reader(package_key(record.id)) as blob:
                    await _to_file(blob.chunks(), zip_path)
            except NotFound:
                log.warning("package record without its zip", package_id=record.id)
                yield events.error(missing_zip(record.id), 404)
                return
            record = record.evolve(status=Status.BUILDING, error="")
            await self.catalog.put(record)
            async with contextlib.aclosing(self._build(record, zip_path)) as stream:
                async for event in stream:
                    yield event
        finally:
            zip_path.unlink(missing_ok=True)

    def _is_stale(self, record: PackageRecord) -> bool:
        return (now() - record.updated).total_seconds() > self.options.stale_after

    async def _await_other_server(self, package_id: str) -> AsyncIterator[Event]:
        yield events.status("Another server is building this package; waiting for it")
        while True:
            await asyncio.sleep(1.0)
            record = await self.catalog.get(package_id)
            if record.status is Status.READY:
                yield events.package(record_to_json(record))
                return
            if record.status is Status.FAILED:
                yield events.error(record.error, 422, record_to_json(record))
                return
            if self._is_stale(record):
                yield events.error("the server building this package stopped; upload again", 503)
                return

    async def _build(self, record: PackageRecord, zip_path: Path) -> AsyncIterator[Event]:
        assert self.builder is not None
        live = LiveBuild(self.tmp_dir)
        self._live[record.id] = live
        artifacts: list[Artifact] = []
        last_beat = time.monotonic()

        async def beat() -> None:
            nonlocal record, last_beat
            if time.monotonic() - last_beat > self.options.heartbeat:
                last_beat = time.monotonic()
                record = record.evolve()
                await self.catalog.put(record)

        where = _Whereabouts()

        def emit(event: Event) -> Event:
            live.publish(event)
            return event

        try:
            if self._slots.locked():
                where.phase = "waiting for a free build slot"
                yield emit(events.status("Waiting for a free build slot"))
            async with self._slots:
                for target in record.config.environment.architectures:
                    image = self._image_name(record, target)
                    where.phase = f"building the {target.upper()} image {image}"
                    where.target = target
                    yield emit(events.status(f"Building {target.upper()} image {image}"))
                    request = BuildRequest(
                        package_id=record.id,
                        package_zip=zip_path,
                        config=record.config,
                        target=target,  # type: ignore[arg-type]
                        image=image,
                        signature_json=json.dumps(record.signature) if record.signature else None,
                    )
                    async with contextlib.aclosing(self.builder.build(request)) as stream:
                        async for item in stream:
                            if isinstance(item, BuildLog):
                                where.saw(item.line)
                                yield emit(events.log(item.stage, item.line, target))
                                await beat()
                            else:
                                artifacts.append(
                                    Artifact(f"docker-{target}", item.image, item.digest)
                                )
                                yield emit(events.status(f"Pushed {item.image} ({item.digest})"))
                if self.options.check_images:
                    async for event in self._check(record, zip_path, artifacts, where):
                        yield emit(event)
                        await beat()
            record = record.evolve(status=Status.READY, artifacts=tuple(artifacts), error="")
            await self.catalog.put(record)
            yield emit(events.package(record_to_json(record)))
        except BuildError as exc:
            record = record.evolve(status=Status.FAILED, artifacts=tuple(artifacts), error=str(exc))
            await self.catalog.put(record)
            lines = [f"Build failed: {exc}"]
            if exc.output:
                lines += ["Last lines of its output:", *(f"  {line}" for line in exc.output)]
            for line in lines:
                yield emit(events.log("error", line, where.target))
            status = 503 if isinstance(exc, BuilderUnavailable) else 422
            yield emit(events.error(str(exc), status, record_to_json(record)))
        except BaseException as exc:
            # Cancelled (client gone, server stopping) or a bug: never leave "building".
            if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                reason = where.cancelled(self.builder.label)
                if reason != where.said_while_cancelling:  # not in the log in its words
                    live.publish(events.log("error", reason, where.target))
            else:
                reason = f"internal error: {exc}"
                live.publish(events.log("error", f"Build failed: {reason}", where.target))
            record = record.evolve(status=Status.FAILED, artifacts=tuple(artifacts), error=reason)
            live.publish(events.error(reason, 500, record_to_json(record)))
            await asyncio.shield(self.catalog.put(record))
            raise
        finally:
            live.finish()
            del self._live[record.id]
            try:
                await asyncio.shield(self.storage.write(log_key(record.id), file_chunks(live.path)))
            except Exception:
                log.exception("could not store build log", package_id=record.id)
            finally:
                live.discard()

    async def _check(
        self,
        record: PackageRecord,
        zip_path: Path,
        artifacts: list[Artifact],
        where: _Whereabouts,
    ) -> AsyncIterator[Event]:
        from cog.server.check import check_image  # needs aiodocker: only where checks run

        by_target = {a.target: a for a in artifacts}
        artifact = by_target.get("docker-cpu") or by_target.get("docker-gpu")
        if artifact is None:
            return
        target = artifact.target.removeprefix("docker-")
        where.phase, where.target = f"testing the model in {artifact.uri}", target
        yield events.status(f"Testing the model in {artifact.uri}")
        async with contextlib.aclosing(
            check_image(
                artifact.uri,
                zip_path,
                record.config,
                record.signature,
                docker_host=self.options.docker_host,
                timeout=self.options.check_timeout,
            )
        ) as stream:
            async for item in stream:
                where.saw(item.line)
                yield events.log(item.stage, item.line, target)

    def _image_name(self, record: PackageRecord, target: str) -> str:
        tag = short_id(record.id) + ("" if target == "cpu" else f"-{target}")
        return f"{self.options.registry.rstrip('/')}/{record.name}:{tag}"


class _Whereabouts:
    """Where a build is, for the message of a build cancelled midway."""

    #: longest piece of the last output line quoted in the message
    QUOTE = 200

    def __init__(self) -> None:
        self.phase = "starting"
        self.last_line = ""
        #: the architecture being built or checked, for the failure's log lines
        self.target: str | None = None
        #: the builder's last line once the cancellation had begun: its own account of it
        self.said_while_cancelling: str | None = None

    def saw(self, line: str) -> None:
        if line.strip():
            self.last_line = line.strip()
        if being_cancelled():
            self.said_while_cancelling = line.strip()

    def cancelled(self, builder: str) -> str:
        if self.said_while_cancelling:
            return self.said_while_cancelling
        message = f"{builder}: build cancelled while {self.phase}"
        if self.last_line:
            last = self.last_line
            if len(last) > self.QUOTE:
                last = last[: self.QUOTE - 3] + "..."
            message += f" (last output: {last})"
        return message


async def _to_file(chunks: AsyncIterator[bytes], path: Path) -> None:
    loop = asyncio.get_running_loop()
    file = await loop.run_in_executor(None, open, path, "wb")
    try:
        async for chunk in chunks:
            await loop.run_in_executor(None, file.write, chunk)
    finally:
        await asyncio.shield(loop.run_in_executor(None, file.close))  # closed even if cancelled
