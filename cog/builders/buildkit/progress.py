"""BuildKit's ``Status`` responses turned into readable log lines, like ``--progress=plain``."""

from __future__ import annotations

import collections
from typing import Any

import attrs

from cog.units import format_size

#: output lines kept per step, for the message of a failed one
TAIL = 20
#: an output line not ended after this many characters is shown as it is
MAX_PARTIAL = 64 * 1024


def _seconds(timestamp: Any) -> float:
    return timestamp.seconds + timestamp.nanos / 1e9


@attrs.define
class _Vertex:
    name: str = ""
    number: int = 0
    started: float | None = None
    finished: bool = False
    cached: bool = False
    error: str = ""
    partial: dict[int, str] = attrs.field(factory=dict)
    tail: collections.deque = attrs.field(factory=lambda: collections.deque(maxlen=TAIL))
    done_statuses: set[str] = attrs.field(factory=set)


class Progress:
    """``Status`` responses -> readable lines in order, like ``--progress=plain``.

    Every vertex gets a number when it is first shown: ``#3 [2/6] RUN ...``; its output
    lines follow as ``#3 <line>``; it ends with ``#3 DONE 4.2s``, ``#3 CACHED`` or
    ``#3 ERROR: <message>``. Finished sub-tasks (exporting layers, naming the image,
    downloads with their size) show once as ``#9 <what> done``.
    """

    def __init__(self) -> None:
        self._vertexes: dict[str, _Vertex] = {}
        self._count = 0
        #: has any Status response arrived?
        self.seen = False

    def _vertex(self, digest: str) -> _Vertex:
        return self._vertexes.setdefault(digest, _Vertex())

    def _announce(self, vertex: _Vertex) -> list[str]:
        if vertex.number:
            return []
        self._count += 1
        vertex.number = self._count
        return [f"#{vertex.number} {vertex.name}"]

    def feed(self, response: Any) -> list[str]:
        self.seen = True
        lines: list[str] = []
        completed = []
        for update in response.vertexes:
            vertex = self._vertex(update.digest)
            vertex.name = update.name or vertex.name
            if update.HasField("started"):
                vertex.started = _seconds(update.started)
                lines += self._announce(vertex)
            if update.HasField("completed") and not vertex.finished:
                completed.append((vertex, update))
        for log in response.logs:
            vertex = self._vertex(log.vertex)
            lines += self._announce(vertex)
            lines += self._output(vertex, log.stream, log.msg.decode("utf-8", "replace"))
        for status in response.statuses:
            vertex = self._vertex(status.vertex)
            if status.HasField("completed") and status.ID not in vertex.done_statuses:
                vertex.done_statuses.add(status.ID)
                lines += self._announce(vertex)
                size = (
                    f" {format_size(status.current)}" if status.total or status.current > 1 else ""
                )
                if status.total:
                    size += f" / {format_size(status.total)}"
                lines.append(f"#{vertex.number} {status.name or status.ID}{size} done")
        for warning in response.warnings:
            vertex = self._vertex(warning.vertex)
            lines += self._announce(vertex)
            lines.append(f"#{vertex.number} WARNING: {warning.short.decode('utf-8', 'replace')}")
        for vertex, update in completed:
            lines += self._announce(vertex)
            lines += self._flush(vertex)
            vertex.finished = True
            if update.error:
                vertex.error = update.error
                lines.append(f"#{vertex.number} ERROR: {update.error}")
            elif update.cached:
                vertex.cached = True
                lines.append(f"#{vertex.number} CACHED")
            else:
                took = _seconds(update.completed) - (vertex.started or _seconds(update.completed))
                lines.append(f"#{vertex.number} DONE {max(took, 0.0):.1f}s")
        return lines

    def _output(self, vertex: _Vertex, stream: int, text: str) -> list[str]:
        *complete, rest = (vertex.partial.pop(stream, "") + text).split("\n")
        # Only a redrawn line's last state matters; and no unended line grows without bound.
        if "\r" in rest:
            segments = [segment for segment in rest.split("\r") if segment]
            rest = (segments[-1] if segments else "") + ("\r" if rest.endswith("\r") else "")
        if len(rest) > MAX_PARTIAL:
            complete.append(rest)
            rest = ""
        vertex.partial[stream] = rest
        return [line for line in (self._line(vertex, raw) for raw in complete) if line]

    def _line(self, vertex: _Vertex, raw: str) -> str:
        # A carriage return redraws a progress bar: only its last state is a line.
        text = raw.rstrip("\r").rsplit("\r", 1)[-1].rstrip()
        if not text.strip():
            return ""
        vertex.tail.append(text)
        return f"#{vertex.number} {text}"

    def _flush(self, vertex: _Vertex) -> list[str]:
        rests, vertex.partial = vertex.partial.values(), {}
        return [line for line in (self._line(vertex, rest) for rest in rests) if line]

    def flush(self) -> list[str]:
        """Output not yet ended by a newline, for when the stream ends."""
        lines: list[str] = []
        for vertex in self._vertexes.values():
            lines += self._flush(vertex)
        return lines

    def running_steps(self) -> list[str]:
        """The steps started and not finished, as shown: ``#3 [2/6] RUN ...``."""
        running = [v for v in self._vertexes.values() if v.number and not v.finished]
        return [f"#{v.number} {v.name}" for v in sorted(running, key=lambda v: v.number)]

    def failed_step(self) -> tuple[str | None, tuple[str, ...]]:
        """The failing vertex's name and the last lines of its output."""
        failed = [v for v in self._vertexes.values() if v.error]
        # A step killed because another one failed says "context canceled": prefer the cause.
        failed.sort(key=lambda v: ("context canceled" in v.error, v.number))
        if not failed:
            return None, ()
        return failed[0].name, tuple(failed[0].tail)
