"""The messages between the inference server and the worker, and how they are framed.

Each message is a JSON object, sent as a 4-byte big-endian length and its UTF-8 bytes.

Server to worker:

- ``{"op": "predict", "id": ID, "inputs": {...}, "dir": PATH}``: run one prediction.
  File inputs are paths of files the server has stored; ``dir`` is the prediction's own
  directory (made on first use, removed by the server after the answer).
- ``{"op": "cancel", "id": ID}``: cancel it (a synchronous one is interrupted by SIGUSR1
  too; the ID is also written, one a line, to the worker's cancel pipe).

Worker to server:

- ``{"op": "log", "id": ID or null, "stream": "stdout", "line": "..."}``: what the model
  printed (null: during setup);
- ``{"op": "loaded", "signature": {...}, "name": ..., "doc": ..., "async": bool}`` once
  the model is imported, then ``{"op": "ready", "setup_time": seconds}`` once its setup
  is over, or ``{"op": "failed", "error": "..."}`` when either failed;
- ``{"op": "output", "id": ID, "value": V}``: one item an iterator yielded;
- ``{"op": "done", "id": ID, "status": "succeeded" | "failed" | "canceled", "value": V,
  "error": "...", "seconds": ...}``.

Values are JSON, with a file as ``{"$cog": "file", "path": PATH}`` and bytes as
``{"$cog": "bytes", "base64": ...}``.

Standard library only: both sides import this module.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Dict, List

_LENGTH = struct.Struct(">I")
#: A worker's message may be at most this long (files travel as paths, not bytes).
MAX_MESSAGE = 256 * 1024 * 1024
FILE = "file"
BYTES = "bytes"
MARK = "$cog"


class ProtocolError(Exception):
    """The other side sent what is not a message."""


def encode(message: Dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
    return _LENGTH.pack(len(data)) + data


class Decoder:
    """Messages from a stream of bytes, fed as they arrive."""

    def __init__(self, limit: int = MAX_MESSAGE) -> None:
        self._buffer = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> List[Dict[str, Any]]:
        buffer = self._buffer
        buffer += data
        messages = []
        start = 0
        while len(buffer) - start >= 4:
            (size,) = _LENGTH.unpack_from(buffer, start)
            if size > self._limit:
                raise ProtocolError(f"a message of {size} bytes (at most {self._limit})")
            end = start + 4 + size
            if len(buffer) < end:
                break
            try:
                message = json.loads(buffer[start + 4 : end])
            except ValueError as e:
                raise ProtocolError(f"not JSON: {e}") from None
            if not isinstance(message, dict) or "op" not in message:
                raise ProtocolError("a message without op")
            messages.append(message)
            start = end
        if start:
            del buffer[:start]
        return messages
