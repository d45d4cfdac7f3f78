"""stdout/stderr of the model, line by line into the server log, tagged with the request.

``sys.stdout`` and ``sys.stderr`` are wrapped once. A thread running model code (setup or
an inference, see :func:`call_tagged`) has a tag; what it prints is cut into lines and
logged on the ``cog.model`` logger as ``[tag] stdout: line``. Every other thread writes
through unchanged. Only Python-level writes are seen: a subprocess or C library writing
to file descriptor 1 or 2 directly reaches the container log untagged.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Callable, TypeVar

logger = logging.getLogger("cog.model")

_Result = TypeVar("_Result")
_local = threading.local()
_install_lock = threading.Lock()
#: A partial line longer than this is logged as it is (progress bars never end a line).
_MAX_PENDING = 64 * 1024


class TaggedStream:
    """A text stream that logs the lines of tagged threads and passes the rest through."""

    def __init__(self, wrapped: Any, name: str) -> None:
        self.wrapped = wrapped
        self.name = name

    def write(self, text: str) -> int:
        tag = getattr(_local, "tag", None)
        # While a line is being logged, a handler writing to this very stream must not
        # loop back into the log.
        if tag is None or getattr(_local, "emitting", False):
            return self.wrapped.write(text)
        pending = _local.pending
        data = pending.get(self.name, "") + text
        lines = data.splitlines(True)
        rest = ""
        if lines and not lines[-1].endswith(("\n", "\r")):
            rest = lines.pop()
        if len(rest) > _MAX_PENDING:
            lines.append(rest)
            rest = ""
        pending[self.name] = rest
        for line in lines:
            _emit(tag, self.name, line)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.wrapped.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


def _emit(tag: str, stream: str, line: str) -> None:
    line = line.rstrip("\r\n")
    if not line.strip():
        return
    _local.emitting = True
    try:
        logger.info("[%s] %s: %s", tag, stream, line, extra={"request_id": tag})
    finally:
        _local.emitting = False


def install() -> None:
    """Wrap sys.stdout and sys.stderr (again, if something replaced them since)."""
    with _install_lock:
        if not isinstance(sys.stdout, TaggedStream):
            sys.stdout = TaggedStream(sys.stdout, "stdout")
        if not isinstance(sys.stderr, TaggedStream):
            sys.stderr = TaggedStream(sys.stderr, "stderr")


def uninstall() -> None:
    """Put back the streams that install() wrapped."""
    with _install_lock:
        if isinstance(sys.stdout, TaggedStream):
            sys.stdout = sys.stdout.wrapped
        if isinstance(sys.stderr, TaggedStream):
            sys.stderr = sys.stderr.wrapped


def call_tagged(tag: str, function: Callable[..., _Result], *args: Any, **kwargs: Any) -> _Result:
    """Call ``function`` in this thread with its printed lines tagged ``tag``."""
    # Checked on every call, not once: a test runner or the model may swap sys.stdout.
    if not (isinstance(sys.stdout, TaggedStream) and isinstance(sys.stderr, TaggedStream)):
        install()
    _local.tag = tag
    _local.pending = {}
    try:
        return function(*args, **kwargs)
    finally:
        for stream, rest in _local.pending.items():
            if rest:
                _emit(tag, stream, rest)
        _local.tag = None
