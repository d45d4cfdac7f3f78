"""The events of a build stream (``Accept: application/x-ndjson``), one JSON object a line.

- ``{"type": "status", "message": "Received package 1a2b3c4d5e6f (2.1 KiB)"}``
- ``{"type": "log", "stage": "build", "target": "cpu", "line": "Step 3/9 : RUN ..."}``
- ``{"type": "package", "package": {...the package document...}}``  (final, success)
- ``{"type": "error", "message": "...", "status": 422, "package": {...} | null}`` (final;
  with ``"step"``, the failing step as the build's log named it, when one is known)

The server writes them and the CLI reads them; both use this module so the wire format is
defined once. Only the standard library is used: the CLI imports it too.
"""

from __future__ import annotations

import json
from typing import Any

NDJSON = "application/x-ndjson"


def status(message: str) -> dict[str, Any]:
    return {"type": "status", "message": message}


def log(stage: str, line: str, target: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "log", "stage": stage, "line": line}
    if target:
        event["target"] = target
    return event


def package(document: dict[str, Any]) -> dict[str, Any]:
    return {"type": "package", "package": document}


def error(
    message: str,
    http_status: int,
    document: dict[str, Any] | None = None,
    step: str | None = None,
) -> dict[str, Any]:
    event = {"type": "error", "message": message, "status": http_status, "package": document}
    if step:
        event["step"] = step
    return event


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """One event from one line; raises ValueError for anything that is not an event."""
    event = json.loads(line)
    if not isinstance(event, dict) or "type" not in event:
        raise ValueError(f"not a build event: {line[:200]!r}")
    return event
