"""Lines out of a byte stream, however the stream is cut into chunks."""

from __future__ import annotations

import asyncio

import pytest

from cog.streams import LineTooLong, file_chunks, in_thread, lines, to_file


async def chunked(data: bytes, size: int):
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def collect(chunks, **kwargs) -> list[bytes]:
    return [line async for line in lines(chunks, **kwargs)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
async def test_lines_whatever_the_chunks(size):
    data = b'{"a": 1}\n\n{"b": 2}\r\n  \n{"c": "no newline at the end"}'
    assert await collect(chunked(data, size)) == [
        b'{"a": 1}',
        b'{"b": 2}\r',
        b'{"c": "no newline at the end"}',
    ]


async def test_a_line_over_the_limit_is_refused_whether_ended_or_not():
    with pytest.raises(LineTooLong):
        await collect(chunked(b"x" * 100 + b"\n", 7), max_line=50)
    with pytest.raises(LineTooLong):
        await collect(chunked(b"x" * 100, 7), max_line=50)
    assert await collect(chunked(b"x" * 50 + b"\n", 7), max_line=50) == [b"x" * 50]


async def test_file_round_trip(tmp_path):
    data = bytes(range(256)) * 10_000
    source = tmp_path / "in.bin"
    source.write_bytes(data)
    assert await to_file(file_chunks(source, 4096), tmp_path / "out.bin") == len(data)
    assert (tmp_path / "out.bin").read_bytes() == data


# -- a blocking iterator as an async stream ------------------------------------------------


async def test_in_thread_yields_every_chunk_in_order_and_off_the_event_loop():
    import threading

    loop_thread = threading.get_ident()
    seen_threads: set[int] = set()

    def produce():
        for i in range(50):
            seen_threads.add(threading.get_ident())
            yield bytes([i]) * 10

    chunks = [c async for c in in_thread(produce())]
    assert chunks == [bytes([i]) * 10 for i in range(50)]
    assert loop_thread not in seen_threads


async def test_in_thread_passes_the_iterators_error_on():
    def produce():
        yield b"one"
        raise ValueError("the file changed")

    received = []
    with pytest.raises(ValueError, match="the file changed"):
        async for chunk in in_thread(produce()):
            received.append(chunk)
    assert received == [b"one"]


async def test_in_thread_closes_the_iterator_when_the_consumer_leaves_mid_step():
    """The consumer is cancelled while the next step blocks in its thread: the iterator
    is closed once that step is done (closing a running generator would fail), and the
    consumer ends only then, so no file is left open behind it."""
    import threading

    blocked = threading.Event()
    release = threading.Event()
    closed = threading.Event()

    def produce():
        try:
            yield b"first"
            blocked.set()
            release.wait(10)
            yield b"second"
        finally:
            closed.set()

    async def consume():
        async for _ in in_thread(produce()):
            pass

    task = asyncio.create_task(consume())
    await asyncio.get_running_loop().run_in_executor(None, blocked.wait, 10)
    task.cancel()
    for _ in range(10):  # loop turns, not time: the cancellation is delivered
        await asyncio.sleep(0)
    assert not task.done() and not closed.is_set()  # waiting for the step to end
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed.is_set()
