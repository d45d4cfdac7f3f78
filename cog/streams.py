"""Async byte streams, read and written one way: lines out of chunks, files in and out.

Only the standard library: the CLI, the cog server and the engine client share it.
File reads and writes happen in worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from pathlib import Path

FILE_CHUNK = 1024 * 1024
#: A line longer than this is refused: a peer that never sends a newline must not grow us.
MAX_LINE = 64 * 1024 * 1024


class LineTooLong(ValueError):
    """A stream sent more than the allowed bytes without a newline."""


async def lines(chunks: AsyncIterable[bytes], max_line: int = MAX_LINE) -> AsyncIterator[bytes]:
    """The non-empty lines of a byte stream, without their newlines; the last one even if
    unended. Linear in the stream's length: each byte is searched once, and a long line
    is gathered in one growing buffer, not re-joined per chunk."""
    pending = bytearray()
    async for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if pending:
                pending += chunk[start:end]
                line = bytes(pending)
                pending.clear()
            else:
                line = chunk[start:end]
            if len(line) > max_line:
                raise LineTooLong(f"a line of {len(line)} bytes, over the limit of {max_line}")
            if line.strip():
                yield line
            start = end + 1
        pending += chunk[start:]
        if len(pending) > max_line:
            raise LineTooLong(f"more than {max_line} bytes without a newline")
    if pending.strip():
        yield bytes(pending)


async def file_chunks(path: Path, chunk_size: int = FILE_CHUNK) -> AsyncIterator[bytes]:
    """A local file as an async byte stream; each read in a worker thread. The file is
    closed even when the consumer is cancelled."""
    loop = asyncio.get_running_loop()
    file = await loop.run_in_executor(None, open, path, "rb")
    try:
        while chunk := await loop.run_in_executor(None, file.read, chunk_size):
            yield chunk
    finally:
        await asyncio.shield(loop.run_in_executor(None, file.close))


async def in_thread(items: Iterator[bytes]) -> AsyncIterator[bytes]:
    """A blocking iterator of chunks (a generator reading files) as an async stream: each
    step runs in a worker thread, one chunk ahead of the consumer, so that making the
    next chunk and sending this one overlap. At most two chunks are held. When the
    consumer stops early, the iterator is closed (in a thread: it may block too)."""
    loop = asyncio.get_running_loop()
    end = object()
    # A step may still run in its thread when the consumer leaves: closing waits for it
    # (a generator cannot be closed while it runs).
    lock = threading.Lock()

    def step() -> object:
        with lock:
            return next(items, end)

    def close() -> None:
        with lock:
            getattr(items, "close", lambda: None)()

    pending = loop.run_in_executor(None, step)
    try:
        while (chunk := await pending) is not end:
            pending = loop.run_in_executor(None, step)
            yield chunk  # type: ignore[misc]
    finally:
        if not pending.done():
            pending.cancel()  # its thread finishes the step; what it returns is dropped
        elif not pending.cancelled():
            pending.exception()  # retrieved: the consumer left before it could matter
        await asyncio.shield(loop.run_in_executor(None, close))


async def to_file(chunks: AsyncIterable[bytes], path: Path) -> int:
    """Write a byte stream to a new file (replacing one there); the bytes written."""
    loop = asyncio.get_running_loop()
    file = await loop.run_in_executor(None, open, path, "wb")
    written = 0
    try:
        async for chunk in chunks:
            await loop.run_in_executor(None, file.write, chunk)
            written += len(chunk)
    finally:
        await asyncio.shield(loop.run_in_executor(None, file.close))
    return written
