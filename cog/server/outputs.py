"""What run() returned, as an HTTP response.

str -> text/plain; bytes -> application/octet-stream; a path -> the file, streamed, its
content type from its extension; anything else (numbers, bool, None, lists, dicts, and
numpy-like values with ``tolist()``) -> JSON.
"""

from __future__ import annotations

import json
import mimetypes
import os
import pathlib
from typing import Any, Mapping
from urllib.parse import quote

from aiohttp import web

_CHUNK = 256 * 1024


class OutputError(Exception):
    """run() returned something that cannot be sent."""


async def respond(
    request: web.Request, value: Any, headers: Mapping[str, str]
) -> web.StreamResponse:
    """The response for ``value``. A file is sent before this returns (prepared response)."""
    if isinstance(value, pathlib.PurePath):
        return await _send_file(request, str(value), headers)
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
    request: web.Request, path: str, headers: Mapping[str, str]
) -> web.StreamResponse:
    try:
        f = open(path, "rb")  # noqa: SIM115  # closed below, after streaming
    except OSError as e:
        raise OutputError(f"run() returned the file {path}, which cannot be read: {e}") from e
    with f:
        size = os.fstat(f.fileno()).st_size
        name = os.path.basename(path)
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        response = web.StreamResponse(headers=headers)
        response.content_type = content_type
        response.content_length = size
        response.headers["Content-Disposition"] = _disposition(name)
        await response.prepare(request)
        # A local file: reads come from the page cache or a fast disk.
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            await response.write(chunk)
        await response.write_eof()
    return response


def _disposition(name: str) -> str:
    if name.isascii() and name.isprintable() and '"' not in name and "\\" not in name:
        return f'inline; filename="{name}"'
    return f"inline; filename*=UTF-8''{quote(name)}"
