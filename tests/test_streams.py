"""Lines out of a byte stream, however the stream is cut into chunks."""

from __future__ import annotations

import pytest

from cog.streams import LineTooLong, file_chunks, lines, to_file


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
