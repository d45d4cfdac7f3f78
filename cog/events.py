"""The events of a build stream (``Accept: application/x-ndjson``), one JSON object a line.

- ``{"type": "status", "message": "Received package 1a2b3c4d5e6f (2.1 KiB)"}``
- ``{"type": "log", "stage": "build", "target": "cpu", "line": "Step 3/9 : RUN ..."}``
  (a line of plain text: terminal codes and other control characters are taken out)
- ``{"type": "package", "package": {...the package document...}}``  (final, success)
- ``{"type": "error", "message": "...", "status": 422, "package": {...} | null}`` (final;
  with ``"step"``, the failing step as the build's log named it, when one is known)

The server writes them and the CLI reads them; both use this module so the wire format is
defined once. Only the standard library is used: the CLI imports it too.
"""

from __future__ import annotations

import json
import re
from typing import Any

NDJSON = "application/x-ndjson"

#: Terminal codes (colours, cursor moves, window titles) and the other control characters
#: but the tab: what programs print for a terminal, and what must not reach one from a log.
_CONTROL = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: titles, hyperlinks, clipboard
    r"|\x1b[ -/]*[0-~]?"  # other escapes, or a lone ESC
    r"|[\x00-\x08\x0a-\x1f\x7f-\x9f]"
)


def plain(line: str) -> str:
    """A line of program output as plain text (see _CONTROL)."""
    return _CONTROL.sub("", line)


def status(message: str) -> dict[str, Any]:
    return {"type": "status", "message": message}


def log(stage: str, line: str, target: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "log", "stage": stage, "line": plain(line)}
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
