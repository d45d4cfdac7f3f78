"""A package's architectures built at once: their event streams merged as they come.

The CPU and GPU images of one package share their first layers (the base image, the
Python check, the inference server's environment) and then differ; built side by side,
the engine or BuildKit runs the two where it has the cores, and the slower one no longer
waits for the other to finish. Each stream's events keep their order; the first failure
stops the others (their builders cancel the build in the backend) and is raised.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

T = TypeVar("T")

#: Events waiting to be taken, per stream: a builder waits for the consumer beyond this.
_QUEUED = 16
_END = object()


async def merged(streams: Sequence[AsyncIterator[T]], *, at_once: bool = True) -> AsyncIterator[T]:
    """Every item of `streams` as it comes, each stream's in its own order; or, not
    `at_once`, one stream after the other (the operator's ``--targets-in-turn``).

    A stream that raises stops the others and its exception is raised here (once they
    have stopped: no build is left running). Closing this iterator, or cancelling its
    consumer, stops them all the same way.
    """
    if len(streams) == 1 or not at_once:
        for stream in streams:  # a stream not started needs no closing
            async with contextlib.aclosing(stream) as items:
                async for item in items:
                    yield item
        return
    queue: asyncio.Queue = asyncio.Queue(maxsize=_QUEUED * len(streams))

    async def pump(stream: AsyncIterator[T]) -> None:
        async with contextlib.aclosing(stream) as items:
            async for item in items:
                await queue.put(item)
        await queue.put(_END)

    tasks = [asyncio.ensure_future(pump(stream)) for stream in streams]
    watched = set(tasks)  # the pumps not yet seen ending well
    running = len(tasks)
    try:
        while running:
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait([getter, *watched], return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
            elif getter.result() is _END:
                running -= 1
                continue
            else:
                yield getter.result()
                continue
            failed = None
            for task in [task for task in watched if task.done()]:
                watched.discard(task)
                if failed is None and task.exception() is not None:
                    failed = task.exception()
            if failed is not None:
                # What the failing build said last is queued still: it goes first.
                while not queue.empty():
                    item = queue.get_nowait()
                    if item is not _END:
                        yield item
                raise failed
    finally:
        for task in tasks:
            task.cancel()
        # Each pump closes its stream, which stops its build, before this returns.
        await asyncio.gather(*tasks, return_exceptions=True)


__all__ = ["merged"]
