"""One build of one package, from its first event to its final record.

A :class:`BuildRun` holds what the steps of the pipeline (:mod:`cog.server.ingest`) share:
the record being built, the live log every event goes to, the images pushed so far,
where the build is (for the account of one cancelled midway) and the heartbeat that
tells other servers the build is alive. Its last act is the outcome: the record as
``ready`` or ``failed``, and the final event. Every record it writes goes through
:meth:`Catalog.put_stored`: a package deleted meanwhile is not brought back
(:class:`PackageDeleted`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import time
from collections.abc import Callable
from typing import Any

from cog import events
from cog.builders import BuildError, BuilderUnavailable, being_cancelled
from cog.events import plain
from cog.server.catalog import Catalog, PackageDeleted
from cog.server.live import LiveBuild
from cog.server.records import Artifact, PackageRecord, Status, record_to_json

Event = dict[str, Any]


class BuildPosition:
    """Where a build is: its phase, the architecture at hand, its last output lines."""

    #: longest piece of the last output line quoted in a message
    QUOTE = 200
    #: output lines remembered, so a failure does not print again what was just shown
    RECENT = 500

    def __init__(self) -> None:
        self.phase = "starting"
        self.last_line = ""
        self.recent: collections.deque[str] = collections.deque(maxlen=self.RECENT)
        #: the architecture being built or checked, for the failure's log lines
        self.target: str | None = None
        #: the builder's last line once the cancellation had begun: its own account of it
        self.said_while_cancelling: str | None = None

    def enter(self, phase: str, target: str | None = None) -> None:
        self.phase, self.target = phase, target

    def saw(self, line: str) -> None:
        if line.strip():
            self.last_line = line.strip()
            self.recent.append(plain(line).strip())
        if being_cancelled():
            self.said_while_cancelling = line.strip()

    def shown(self, output: tuple[str, ...]) -> bool:
        """Whether these lines were all in the live log just now (each the end of a line
        shown: a builder or the check may have put a prefix before it)."""
        lines = [plain(line).strip() for line in output]
        return all(any(seen.endswith(line) for seen in self.recent) for line in lines if line)

    def cancelled(self, builder: str) -> str:
        """Why the build ended, for one cancelled (client gone, server stopping)."""
        if self.said_while_cancelling:
            return self.said_while_cancelling
        message = f"{builder}: build cancelled while {self.phase}"
        if self.last_line:
            last = self.last_line
            if len(last) > self.QUOTE:
                last = last[: self.QUOTE - 3] + "..."
            message += f" (last output: {last})"
        return message


class BuildRun:
    """The shared state of one build; see the module docstring."""

    def __init__(
        self,
        record: PackageRecord,
        live: LiveBuild,
        catalog: Catalog,
        *,
        heartbeat: float,
        clock: Callable[[], dt.datetime],
        no_cache: bool = False,
    ):
        self.record = record
        #: build every step again, using no cached layer
        self.no_cache = no_cache
        self.live = live
        self.artifacts: list[Artifact] = []
        self.position = BuildPosition()
        self._catalog = catalog
        self._heartbeat = heartbeat
        self._clock = clock
        self._last_beat = time.monotonic()
        #: the package was deleted meanwhile: its log is not stored
        self.deleted = False

    def emit(self, event: Event) -> Event:
        """An event of this build: into its log, to its followers, and back to the caller."""
        self.live.publish(event)
        return event

    async def heartbeat(self) -> None:
        """Refresh the record's Updated time now and then, so that other servers see the
        build is alive (a record left "building" longer than stale_after is taken over)."""
        if time.monotonic() - self._last_beat > self._heartbeat:
            self._last_beat = time.monotonic()
            self.record = self.record.evolve(updated=self._clock())
            await self._catalog.put_stored(self.record)

    async def succeeded(self) -> Event:
        self.record = self.record.evolve(
            updated=self._clock(), status=Status.READY, artifacts=tuple(self.artifacts), error=""
        )
        await self._catalog.put_stored(self.record)
        return events.package(record_to_json(self.record))

    async def failed(self, exc: BuildError) -> list[Event]:
        """The record failed with exc; the events that say so (log lines, then the error)."""
        self.record = self.record.evolve(
            updated=self._clock(),
            status=Status.FAILED,
            artifacts=tuple(self.artifacts),
            error=str(exc),
        )
        await self._catalog.put_stored(self.record)
        lines = [f"Build failed: {exc}"]
        if exc.output and not self.position.shown(exc.output):
            lines += ["Last lines of its output:", *(f"  {line}" for line in exc.output)]
        status = 503 if isinstance(exc, BuilderUnavailable) else 422
        return [
            *(events.log("error", line, self.position.target) for line in lines),
            events.error(str(exc), status, record_to_json(self.record), step=exc.step),
        ]

    async def interrupted(self, exc: BaseException, builder: str) -> None:
        """Cancelled (client gone, server stopping) or a bug: the record never stays
        "building"; the log says why."""
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            reason = self.position.cancelled(builder)
            if reason != self.position.said_while_cancelling:  # not in the log in its words
                self.live.publish(events.log("error", reason, self.position.target))
        else:
            reason = f"internal error: {exc}"
            self.live.publish(events.log("error", f"Build failed: {reason}", self.position.target))
        self.record = self.record.evolve(
            updated=self._clock(),
            status=Status.FAILED,
            artifacts=tuple(self.artifacts),
            error=reason,
        )
        self.live.publish(events.error(reason, 500, record_to_json(self.record)))
        with contextlib.suppress(PackageDeleted):  # nothing to say it to: the caller left
            await asyncio.shield(self._catalog.put_stored(self.record))
