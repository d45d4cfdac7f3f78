"""A model's answer to an example, judged as it streams in, never held whole.

The model is as hostile as any uploader: its answer may be gigabytes long or never end.
A file expected (``@path``) is compared chunk by chunk with the package's member, and the
comparison stops at the first difference or the first byte past the member's end. Text
and JSON are read up to a bound (what an answer equal to the expected one could take)
and called different past it. An answer that nothing is expected of is not read at all;
an error answer is read up to a small bound for its message.
"""

from __future__ import annotations

import asyncio
import json
import zipfile
from pathlib import Path, PurePosixPath

import aiohttp
import attrs

CHUNK = 256 * 1024
#: the most of an error answer read for its message
ERROR_BYTES = 64 * 1024
#: the most of a text or JSON answer read: an answer equal to the expected one, with any
#: amount of surrounding whitespace a sane model adds, fits
TEXT_BYTES = 1024 * 1024
#: the most of a prediction's JSON answer read (today's models: file outputs come as
#: data: URIs inside it)
PREDICTION_BYTES = 64 * 1024 * 1024


@attrs.frozen
class Verdict:
    status: int
    #: why the answer is not the one expected (None: it is, or nothing was expected)
    mismatch: str | None = None
    #: an error answer's message (status other than 200)
    error: str = ""


def member(zip_path: Path, name: str) -> bytes:
    """A small example file from the package (examples are checked at upload to exist)."""
    with zipfile.ZipFile(zip_path) as archive:
        return archive.read(str(PurePosixPath(name)))


def output_matches(expected: str, body: bytes, content_type: str, zip_path: Path) -> bool:
    """An example's expected output against a whole (bounded) answer: a file (``@path``)
    byte for byte, JSON by value, text with surrounding whitespace trimmed."""
    if expected.startswith("@"):
        return body == member(zip_path, expected[1:])
    if content_type == "application/json":
        try:
            return json.loads(body) == json.loads(expected)
        except ValueError:
            return False
    return body.decode(errors="replace").strip() == expected.strip()


def describe_output(body: bytes, content_type: str, *, more: bool = False) -> str:
    """The model's answer, short, for an error message; `more`: body is only its start."""
    if content_type.startswith(("text/", "application/json")):
        text = body.decode(errors="replace").strip()
        cut = more or len(text) > 200
        return repr(text[:200] + ("..." if cut else ""))
    return f"{'more than ' if more else ''}{len(body)} bytes of {content_type}"


async def read_at_most(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """Up to limit bytes of the body; whether there was more (left unread)."""
    data = bytearray()
    async for chunk in response.content.iter_chunked(CHUNK):
        data += chunk
        if len(data) > limit:
            return bytes(data[:limit]), True
    return bytes(data), False


async def judge(response: aiohttp.ClientResponse, expected: str | None, zip_path: Path) -> Verdict:
    """The model's answer against the example's expected output (see the module)."""
    if response.status != 200:
        body, _ = await read_at_most(response, ERROR_BYTES)
        try:
            error = json.loads(body).get("error") or body.decode(errors="replace")
        except (ValueError, AttributeError):
            error = body.decode(errors="replace")
        return Verdict(response.status, error=error)
    if expected is None:
        return Verdict(200)
    if expected.startswith("@"):
        return Verdict(200, await _compare_file(response, expected[1:], zip_path))
    limit = max(TEXT_BYTES, 4 * len(expected.encode()))
    body, more = await read_at_most(response, limit)
    content_type = response.content_type
    if not more and output_matches(expected, body, content_type, zip_path):
        return Verdict(200)
    return Verdict(
        200, f"expected {expected!r}, got {describe_output(body, content_type, more=more)}"
    )


async def _compare_file(response: aiohttp.ClientResponse, name: str, zip_path: Path) -> str | None:
    """The answer against a member of the package, chunk by chunk."""
    with zipfile.ZipFile(zip_path) as archive, archive.open(str(PurePosixPath(name))) as want:
        size = archive.getinfo(str(PurePosixPath(name))).file_size
        seen = 0
        async for chunk in response.content.iter_chunked(CHUNK):
            if seen + len(chunk) > size:
                return (
                    f"expected @{name} ({size} bytes), got an answer of more than "
                    f"{size} bytes of {response.content_type}"
                )
            wanted = await asyncio.to_thread(want.read, len(chunk))
            if wanted != chunk:
                at = seen + next(i for i, (a, b) in enumerate(zip(wanted, chunk)) if a != b)
                return f"expected @{name}, got an answer that differs from it at byte {at:,}"
            seen += len(chunk)
        if seen != size:
            return f"expected @{name} ({size} bytes), got {seen} bytes of {response.content_type}"
    return None
