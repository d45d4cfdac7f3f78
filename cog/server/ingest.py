"""The ingest service: from an uploaded package to a stored, built and checked one.

Everything the cog server decides about packages is here; the HTTP views only translate.
An upload goes through named steps, each an async generator of build events (see
:mod:`cog.events`) that the views write out as NDJSON or reduce to the final result:

1. :meth:`IngestService.accept`: inspect the package (structure, cog.yaml, the model's
   inputs) before anything is stored; then "Received", and every member verified;
2. :meth:`IngestService.ingest`: follow a build of the same package already running
   here or on another server, or claim the package (its zip stored, its record
   "building");
3. the build (:meth:`_build`): wait for a build slot, build and push each architecture's
   image and check the model in one of them (:mod:`cog.server.images`), record the
   outcome; every event goes to the build's live log, stored when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import structlog

from cog import events
from cog.builders import (
    Builder,
    BuildError,
    BuilderSettings,
)
from cog.config import ConfigError
from cog.config_bounds import MAX_NAME
from cog.package import PackageLimits, short_id
from cog.server.build_run import BuildRun
from cog.server.catalog import Catalog, PackageDeleted, PackageNotFound, log_key, package_key
from cog.server.images import ImageSteps
from cog.server.inspection import Inspection, build_notes, inspect_package, verify_package
from cog.server.live import LiveBuild
from cog.server.records import (
    PackageRecord,
    PackageSummary,
    Status,
    now,
    record_to_json,
)
from cog.server.settings import IngestOptions
from cog.server.uploads import ReceivedUpload
from cog.storage import NotFound, Storage
from cog.streams import file_chunks, to_file
from cog.units import format_size

log = structlog.get_logger(__name__)

Event = dict[str, Any]
#: The name of a package whose cog.yaml names none, uploaded without ?name= (`cog build`
#: sends its directory's name)
DEFAULT_NAME = "cog-model"


class PackageBusy(Exception):
    """A change refused because the package is being built (409)."""


def missing_zip(package_id: str) -> str:
    """The error for a record whose zip is gone (a delete running now, a store changed by
    hand)."""
    return (
        f"package {short_id(package_id)} has a record but its zip is not in storage "
        "(being deleted?); upload it again to restore it"
    )


class _Claims:
    """One lock per package ID, held while an upload or rebuild decides whether it builds
    the package: a second one in this server then finds the first one's live build."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, package_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(package_id, (asyncio.Lock(), 0))
        self._locks[package_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[package_id]
            if users == 1:
                del self._locks[package_id]
            else:
                self._locks[package_id] = (lock, users - 1)


class IngestService:
    """Stores, builds and checks packages; one per server. See the module docstring."""

    #: seconds between looks at a package another server is building
    poll_interval = 1.0

    def __init__(
        self,
        storage: Storage,
        catalog: Catalog,
        builder: Builder | None,
        *,
        builder_settings: BuilderSettings,
        options: IngestOptions,
        limits: PackageLimits,
        tmp_dir: Path,
        clock: Callable[[], dt.datetime] = now,
    ):
        self.storage = storage
        self.catalog = catalog
        self.builder = builder
        self.builder_settings = builder_settings
        self.options = options
        self.limits = limits
        self.tmp_dir = tmp_dir
        #: the time records are stamped with (tests age packages without waiting)
        self.clock = clock
        self._live: dict[str, LiveBuild] = {}
        self._claims = _Claims()
        self._slots = asyncio.Semaphore(options.max_concurrent_builds)
        self._images = ImageSteps(builder, builder_settings, options, tmp_dir)
        self._inspecting = asyncio.Lock()

    def live(self, package_id: str) -> LiveBuild | None:
        """The build of this package running in this server, if any."""
        return self._live.get(package_id)

    def is_stale(self, record: PackageRecord | PackageSummary) -> bool:
        """A "building" record not refreshed for so long that its server must be gone."""
        return (self.clock() - record.updated).total_seconds() > self.options.stale_after

    def busy(self, record: PackageRecord) -> bool:
        """Whether a build of this package runs, here or (by its record) on another server."""
        if record.id in self._live:
            return True
        return record.status is Status.BUILDING and not self.is_stale(record)

    # -- an upload ---------------------------------------------------------------------

    async def accept(
        self,
        received: ReceivedUpload,
        *,
        default_name: str | None = None,
        by: str = "",
        no_cache: bool = False,
    ) -> AsyncIterator[Event]:
        """Inspect an upload (InvalidPackage or ConfigError now, before any event), then
        its stream of events. The received file stays the caller's. ``default_name``: the
        package's name if its cog.yaml has none (else DEFAULT_NAME); ``by`` names who sent
        it (the record keeps it); ``no_cache``: build every step again (and a package
        built already is built again)."""
        # One at a time: reading a config and a model's source is Python-bound, and
        # threads that take turns with the GIL would take turns with the event loop too.
        async with self._inspecting:
            inspection = await asyncio.to_thread(inspect_package, received.path, self.limits)
        if self.builder is not None:
            self._check_image_name(inspection.config.name or default_name or DEFAULT_NAME)
        return self._accepted(received, inspection, default_name, by, no_cache)

    def _check_image_name(self, name: str) -> None:
        """A name that makes an image reference longer than a registry takes is the
        uploader's to change, said now rather than by a failed push."""
        repository = f"{self.builder_settings.registry.rstrip('/')}/{name}"
        if len(repository) > MAX_NAME:
            shown = repository if len(repository) <= 40 else repository[:40] + "..."
            raise ConfigError(
                [
                    f"name: {shown} ({len(repository)} characters) is longer than a registry "
                    f"takes ({MAX_NAME}); choose a shorter name"
                ]
            )

    async def _accepted(
        self,
        received: ReceivedUpload,
        inspection: Inspection,
        default_name: str | None,
        by: str,
        no_cache: bool,
    ) -> AsyncIterator[Event]:
        # "Received" at once: verifying every member takes seconds for a large package,
        # and the client hears from us first.
        yield events.status(
            f"Received package {short_id(received.package_id)} ({format_size(received.size)})"
        )
        for warning in inspection.warnings:
            yield events.log("config", f"warning: cog.yaml: {warning}")
        await asyncio.to_thread(verify_package, received.path, self.limits, received.scanned)
        async with contextlib.aclosing(
            self.ingest(
                received.package_id,
                received.size,
                received.path,
                inspection,
                default_name,
                by=by,
                no_cache=no_cache,
            )
        ) as stream:
            async for event in stream:
                yield event

    async def ingest(
        self,
        package_id: str,
        size: int,
        zip_path: Path,
        inspection: Inspection,
        default_name: str | None = None,
        *,
        by: str = "",
        no_cache: bool = False,
    ) -> AsyncIterator[Event]:
        """Store, build and check one received and verified package, or follow the build
        of it that runs already (zip_path stays the caller's)."""
        run: BuildRun | None = None
        name = inspection.config.name or default_name or DEFAULT_NAME
        async with self._claims.hold(package_id):
            existing = await self._existing(package_id)
            live = self._live.get(package_id)
            if live is None and self.builder is not None and self._to_build(existing, no_cache):
                record = self._new_record(package_id, size, inspection, existing, name, by=by)
                run = self._start(record, no_cache=no_cache)
        if run is not None:
            stream = self._build(run, zip_path, store=True)
        elif live is not None:
            stream = self._follow(live, "This package is being built already; following that build")
        elif existing is not None and existing.status is Status.READY:
            stream = self._already_ready(existing, zip_path)
        elif existing is not None and existing.status is Status.BUILDING:
            stream = self._await_other_server(package_id)
        else:
            stream = self._store_only(package_id, size, zip_path, inspection, existing, name, by)
        async with contextlib.aclosing(stream):
            async for event in stream:
                yield event

    async def rebuild(
        self, record: PackageRecord, *, by: str = "", no_cache: bool = False
    ) -> AsyncIterator[Event]:
        """Build a stored package again (after the registry came back, say); `by` names
        who asked; ``no_cache``: every step again, using no cached layer."""
        log.info("rebuild requested", package_id=record.id, by=by)
        if self.builder is None:
            yield events.error("this server has no builder configured", 409)
            return
        fd, name = tempfile.mkstemp(prefix="rebuild-", suffix=".zip", dir=self.tmp_dir)
        os.close(fd)
        zip_path = Path(name)
        try:
            yield events.status("Fetching package from storage")
            try:
                async with self.storage.open_reader(package_key(record.id)) as blob:
                    await to_file(blob.chunks(), zip_path)
            except NotFound:
                log.warning("package record without its zip", package_id=record.id)
                yield events.error(missing_zip(record.id), 404)
                return
            run = None
            async with self._claims.hold(record.id):
                current = await self._existing(record.id)
                if current is not None and not self.busy(current):
                    run = self._start(
                        current.evolve(updated=self.clock(), status=Status.BUILDING, error=""),
                        no_cache=no_cache,
                    )
            if run is None:
                message = "package was deleted" if current is None else "being built already"
                yield events.error(f"this {message}", 404 if current is None else 409)
                return
            async with contextlib.aclosing(self._build(run, zip_path, store=False)) as stream:
                async for event in stream:
                    yield event
        finally:
            await asyncio.shield(asyncio.to_thread(zip_path.unlink, missing_ok=True))

    async def delete(self, record: PackageRecord, *, by: str = "") -> None:
        """Remove a package (record, zip, log); PackageBusy while it is being built. `by`
        names who asked (logged: the record goes)."""
        if self.busy(record):
            raise PackageBusy("this package is being built; delete it when the build ends")
        if record.status is Status.BUILDING and self.builder is not None:
            await self._stop_abandoned_checks(record.id)
        await self.catalog.delete(record.id)
        log.info("package deleted", package_id=record.id, name=record.name, by=by)

    async def fail_abandoned(self) -> list[str]:
        """Records left "building" by servers that stopped (no heartbeat for stale_after)
        become "failed", saying so: none stays "building" for ever. The IDs changed.

        A record is read again under its claim just before it is written: another server
        taking the build over meanwhile has refreshed it, and is left alone."""
        changed = []
        for record in await self.catalog.newest_first():
            if record.status is not Status.BUILDING or record.id in self._live:
                continue
            if not self.is_stale(record):
                continue
            async with self._claims.hold(record.id):
                current = await self._existing(record.id)
                if current is None or current.id in self._live:
                    continue
                if current.status is not Status.BUILDING or not self.is_stale(current):
                    continue
                failed = current.evolve(
                    updated=self.clock(),
                    status=Status.FAILED,
                    error=(
                        "the server building this package stopped before the build ended; "
                        "rebuild it or upload it again"
                    ),
                )
                with contextlib.suppress(PackageDeleted):
                    await self.catalog.put_stored(failed)
                    changed.append(record.id)
        if changed:
            log.info("builds of stopped servers marked failed", packages=changed)
        return changed

    async def run_janitor(self) -> None:
        """fail_abandoned now, then every quarter of stale_after, for ever (a background
        task of the app)."""
        while True:
            try:
                await self.fail_abandoned()
            except Exception:  # a storage hiccup must not end the janitor
                log.exception("looking for abandoned builds failed")
            await asyncio.sleep(max(self.options.stale_after / 4, 1.0))

    async def _stop_abandoned_checks(self, package_id: str) -> None:
        """A build left "building" by a server that died may have left its check running:
        removed before the package goes; PackageBusy while a live server's runs."""
        from cog.engine import EngineError  # aiodocker: only where checks run
        from cog.server.check import stop_checks_of

        try:
            kept = await stop_checks_of(package_id, self.builder_settings.docker_host)
        except EngineError as exc:
            # Its container, if any, ends by itself when its time is up (its label says).
            log.warning("could not look for the package's check containers", error=exc.message)
            return
        if kept:
            raise PackageBusy(
                "a check of this package still runs (a container of another cog server on "
                "this Docker Engine); delete it when that ends"
            )

    # -- deciding ----------------------------------------------------------------------

    async def _existing(self, package_id: str) -> PackageRecord | None:
        try:
            return await self.catalog.get(package_id)
        except PackageNotFound:
            return None

    def _to_build(self, existing: PackageRecord | None, no_cache: bool = False) -> bool:
        """A new package, a failed one uploaded again, one whose builder died, or one
        built already that is asked for again without the cache."""
        if existing is None or existing.status is Status.FAILED:
            return True
        if no_cache and existing.status is Status.READY:
            return True
        return existing.status is Status.BUILDING and self.is_stale(existing)

    def _new_record(
        self,
        package_id: str,
        size: int,
        inspection: Inspection,
        existing: PackageRecord | None,
        name: str,
        status: Status = Status.BUILDING,
        *,
        by: str = "",
    ) -> PackageRecord:
        stamp = self.clock()
        return PackageRecord(
            id=package_id,
            name=name,
            config=inspection.config,
            created=existing.created if existing else stamp,
            updated=stamp,
            status=status,
            size=size,
            signature=inspection.signature,
            uploaded_by=by,
        )

    def _start(self, record: PackageRecord, *, no_cache: bool = False) -> BuildRun:
        """A build of record, registered as this package's live build (under its claim)."""
        run = BuildRun(
            record,
            LiveBuild(self.tmp_dir),
            self.catalog,
            heartbeat=self.options.heartbeat,
            clock=self.clock,
            no_cache=no_cache,
        )
        self._live[record.id] = run.live
        log.info("build started", package_id=record.id, name=record.name)
        return run

    # -- the ways an upload ends without a build of its own ---------------------------

    async def _follow(self, live: LiveBuild, why: str) -> AsyncIterator[Event]:
        yield events.status(why)
        async with contextlib.aclosing(live.follow()) as stream:
            async for event in stream:
                yield event

    async def _already_ready(self, record: PackageRecord, zip_path: Path) -> AsyncIterator[Event]:
        if not await self.storage.exists(package_key(record.id)):
            # lost to a delete race (see _store): restored, as the bytes are the same
            yield events.status("Storing package (its stored copy was missing)")
            await self.storage.write_file(package_key(record.id), zip_path)
        yield events.status("This package is already stored and built; nothing to do")
        yield events.package(record_to_json(record))

    async def _await_other_server(self, package_id: str) -> AsyncIterator[Event]:
        yield events.status("Another server is building this package; waiting for it")
        while True:
            await asyncio.sleep(self.poll_interval)
            record = await self.catalog.get(package_id)
            if record.status is Status.READY:
                yield events.package(record_to_json(record))
                return
            if record.status is Status.FAILED:
                yield events.error(record.error, 422, record_to_json(record))
                return
            if self.is_stale(record):
                yield events.error("the server building this package stopped; upload again", 503)
                return

    async def _store_only(
        self,
        package_id: str,
        size: int,
        zip_path: Path,
        inspection: Inspection,
        existing: PackageRecord | None,
        name: str,
        by: str,
    ) -> AsyncIterator[Event]:
        """A server without a builder: the package is stored, and ready as it is."""
        record = self._new_record(package_id, size, inspection, existing, name, Status.READY, by=by)
        async for event in self._store(record, zip_path):
            yield event
        yield events.status("Stored (this server has no builder, so no images were built)")
        yield events.package(record_to_json(record))

    async def _store(self, record: PackageRecord, zip_path: Path) -> AsyncIterator[Event]:
        """The zip, then the record. Packages are content-addressed, so writing a zip that
        is there already changes nothing."""
        key = package_key(record.id)
        if not await self.storage.exists(key):
            yield events.status("Storing package")
            await self.storage.write_file(key, zip_path)
        await self.catalog.put(record)
        # Another server's delete of this package may have removed the zip after we saw it
        # (its record first, then its zip): look again now that our record exists, and
        # write it back if it went. This narrows the race, it does not close it: a record
        # whose zip is gone answers 404 for the download and is mended by uploading the
        # package again.
        if not await self.storage.exists(key):
            log.warning("package zip deleted while it was uploaded again; storing it again")
            yield events.status("Storing package (a delete removed the stored copy meanwhile)")
            await self.storage.write_file(key, zip_path)

    # -- the build ---------------------------------------------------------------------

    async def _build(self, run: BuildRun, zip_path: Path, *, store: bool) -> AsyncIterator[Event]:
        """A claimed package through every step; the record ends ready or failed."""
        assert self.builder is not None
        recorded = False
        try:
            try:
                if store:
                    async for event in self._store(run.record, zip_path):
                        yield run.emit(event)
                else:
                    await self.catalog.put_stored(run.record)
                recorded = True
                async with contextlib.aclosing(self._steps(run, zip_path)) as steps:
                    async for event in steps:
                        yield run.emit(event)
                        await run.heartbeat()
                yield run.emit(await run.succeeded())
            except BuildError as exc:
                for event in await run.failed(exc):
                    yield run.emit(event)
        except PackageDeleted as exc:
            log.info("package deleted while it was being built", package_id=run.record.id)
            run.deleted = True
            yield run.emit(events.error(str(exc), 410))
        except BaseException as exc:
            if recorded:
                await run.interrupted(exc, self.builder.label)
            raise
        finally:
            await self._end(run)

    async def _steps(self, run: BuildRun, zip_path: Path) -> AsyncIterator[Event]:
        for note in await asyncio.to_thread(build_notes, zip_path, self.limits):
            yield events.status(note)
        if self._slots.locked():
            run.position.enter("waiting for a free build slot")
            yield events.status("Waiting for a free build slot")
        async with self._slots:
            async for event in self._images.build(run, zip_path):
                yield event

    async def _end(self, run: BuildRun) -> None:
        """The live build is over: followers end, its log goes to Storage (also when the
        caller is cancelled meanwhile: the write runs on, and the file goes after it)."""
        run.live.finish()
        self._live.pop(run.record.id, None)
        package_id = run.record.id
        if run.deleted:  # no record to keep a log for
            run.live.discard()
            return
        writing = asyncio.ensure_future(
            self.storage.write(log_key(package_id), file_chunks(run.live.path))
        )

        def written(task: asyncio.Future) -> None:
            run.live.discard()
            if not task.cancelled() and task.exception() is not None:
                log.error(
                    "could not store build log", package_id=package_id, error=str(task.exception())
                )

        writing.add_done_callback(written)
        with contextlib.suppress(Exception):  # said by the callback
            await asyncio.shield(writing)
