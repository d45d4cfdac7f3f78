"""A build running in this server: its events kept on disk as they happen, and followed.

The log is appended to a file (stored in Storage when the build ends), never kept in
memory; whoever follows the build (``GET /v1/packages/<id>/log``, a second upload of the
same package) gets what happened so far from the file, then each new event as it comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cog import events
from cog.streams import file_chunks, lines

Event = dict[str, Any]


class LiveBuild:
    """One build's events: appended to a file, and handed to live followers."""

    def __init__(self, tmp_dir: Path):
        fd, name = tempfile.mkstemp(prefix="build-", suffix=".ndjson", dir=tmp_dir)
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._count = 0
        self._followers: set[asyncio.Queue[tuple[int, Event] | None]] = set()
        self.done = False

    def publish(self, event: Event) -> None:
        self._file.write(events.encode(event))  # buffered: flushed when a follower joins
        for queue in self._followers:
            queue.put_nowait((self._count, event))
        self._count += 1

    def finish(self) -> None:
        """The build ended: no more events; followers end once they have every one."""
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
            # What the file holds now (whole lines: it is flushed first) is replayed from
            # it; the events after those come through the queue, numbered from `known` on.
            known, ended = self._count, self.done
            if not ended:
                self._file.flush()
            if known:
                async for line in lines(_prefix(self.path, _size(self))):
                    yield events.decode(line)
            while not ended:
                item = await queue.get()
                if item is None:
                    return
                index, event = item
                if index >= known:
                    yield event
        finally:
            self._followers.discard(queue)


def _size(build: LiveBuild) -> int:
    return build.path.stat().st_size if build.done else build._file.tell()


async def _prefix(path: Path, size: int) -> AsyncIterator[bytes]:
    """The first `size` bytes of a file that may be growing while it is read."""
    left = size
    async with contextlib.aclosing(file_chunks(path)) as chunks:
        async for chunk in chunks:
            if left <= 0:
                return
            yield chunk[:left]
            left -= len(chunk)
