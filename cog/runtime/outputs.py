"""What run() returned, as an HTTP response.

str -> text/plain; bytes -> application/octet-stream; a path -> the file, streamed (read
in worker threads, never on the event loop), its content type from its extension;
anything else (numbers, bool, None, lists, dicts, and numpy-like values with
``tolist()``) -> JSON.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import mimetypes
import os
import pathlib
from typing import Any, BinaryIO, Callable, Mapping
from urllib.parse import quote

from aiohttp import web

from cog.types import Path
from cog.worker.protocol import BYTES, FILE, MARK

#: A file output is read in chunks of this size, each in a worker thread.
_CHUNK = 1 << 20


class OutputError(Exception):
    """run() returned something that cannot be sent."""


def to_wire(values: dict[str, Any]) -> dict[str, Any]:
    """A request's inputs for the model's worker: files as their paths."""
    return {
        name: str(value) if isinstance(value, pathlib.PurePath) else value
        for name, value in values.items()
    }


def from_wire(value: Any) -> Any:
    """An output from the model's worker: files as cog.Path, bytes as bytes."""
    if isinstance(value, dict):
        mark = value.get(MARK)
        if mark == FILE:
            return Path(value["path"])
        if mark == BYTES:
            return base64.b64decode(value["base64"])
        return {k: from_wire(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_wire(v) for v in value]
    return value


async def respond(
    request: web.Request,
    value: Any,
    headers: Mapping[str, str],
    opened: Callable[[], None] | None = None,
) -> web.StreamResponse:
    """The response for ``value``. A file is sent before this returns (prepared response);
    ``opened`` is called once it is open, before its first byte goes out: the request's
    directory can go then (an open file is read whole even once it is unlinked), so it
    is gone before the client has the response."""
    if isinstance(value, pathlib.PurePath):
        return await _send_file(request, str(value), headers, opened)
    if isinstance(value, str):
        return web.Response(text=value, content_type="text/plain", headers=headers)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return web.Response(
            body=bytes(value), content_type="application/octet-stream", headers=headers
        )
    try:
        body = json.dumps(value, default=_to_json, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise OutputError(f"run() returned a {type(value).__name__} that is not JSON: {e}") from e
    return web.Response(text=body, content_type="application/json", headers=headers)


def _to_json(value: Any) -> Any:
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars, without importing numpy
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


async def _send_file(
    request: web.Request,
    path: str,
    headers: Mapping[str, str],
    opened: Callable[[], None] | None,
) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    opening = loop.run_in_executor(None, _open, path)
    try:
        # Shielded: a handler cancelled here (the client hung up) leaves the thread's
        # open to finish, and the file it opens is closed by the callback.
        f, size, chunk = await asyncio.shield(opening)
    except OSError as e:
        raise OutputError(f"run() returned the file {path}, which cannot be read: {e}") from e
    except asyncio.CancelledError:
        opening.add_done_callback(_close_opened)
        raise
    reading: asyncio.Future[bytes] | None = None  # the next chunk, read in a thread
    try:
        if opened is not None:
            opened()
        name = os.path.basename(path)
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        response = web.StreamResponse(headers=headers)
        response.content_type = content_type
        response.content_length = size
        response.headers["Content-Disposition"] = _disposition(name)
        await response.prepare(request)
        # The file as it was when opened: its size is the Content-Length. Each chunk is
        # read in a thread while the one before goes out.
        left = size - len(chunk)
        while True:
            if left > 0:
                reading = loop.run_in_executor(None, f.read, min(_CHUNK, left))
            await response.write(chunk)
            if reading is None:
                break
            # Shielded: on cancellation the thread's read goes on; finally waits for it.
            chunk, reading = await asyncio.shield(reading), None
            if not chunk:  # the headers promised more: the connection must be dropped
                raise RuntimeError(f"the file {path} became shorter while it was sent")
            left -= len(chunk)
        await response.write_eof()
    finally:
        # No await here: once the connection is lost aiohttp cancels the handler, which can
        # come after a failed write has already brought it here. A read still in flight
        # (the client went away) closes the file when it ends, from its callback.
        if reading is None or reading.done():
            _close_after_read(f, reading)
        else:
            reading.add_done_callback(functools.partial(_close_after_read, f))
    return response


def _close_after_read(f: BinaryIO, reading: asyncio.Future[bytes] | None) -> None:
    if reading is not None and not reading.cancelled():
        reading.exception()  # retrieved: nobody needs it now
    f.close()  # read-only: nothing to flush, one quick system call


def _close_opened(opening: asyncio.Future[tuple[BinaryIO, int, bytes]]) -> None:
    """The file of an open whose handler was cancelled meanwhile, closed."""
    if not opening.cancelled() and opening.exception() is None:
        opening.result()[0].close()


def _open(path: str) -> tuple[BinaryIO, int, bytes]:
    """The open file, its size and its first chunk (one thread hop for a small file)."""
    f = open(path, "rb")  # noqa: SIM115  # closed by _send_file
    try:
        size = os.fstat(f.fileno()).st_size
        return f, size, f.read(min(_CHUNK, size))
    except BaseException:
        f.close()
        raise


def _disposition(name: str) -> str:
    if name.isascii() and name.isprintable() and '"' not in name and "\\" not in name:
        return f'inline; filename="{name}"'
    return f"inline; filename*=UTF-8''{quote(name)}"
