"""Requirement specs, read one way for config completion and for the Dockerfile alike
(:mod:`cog.builders.dockerfile`): a pin the one sees, the other sees too."""

from __future__ import annotations

import re
from collections.abc import Sequence

#: name[extras] == version, once an environment marker (``; python_version < "3.12"``)
#: is cut off
_PINNED = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s;]+)\s*$")
_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
#: a comment as pip sees one: '#' at the start of a line or after whitespace (a URL's
#: '#sha256=...' is none)
_COMMENT = re.compile(r"(^|\s)#.*$")


def requirement_key(name: str) -> str:
    """A distribution name as pins are keyed: lowercase, '-' for '_'."""
    return name.lower().replace("_", "-")


def requirement_specs(text: str) -> list[str]:
    """The requirement spec of each line of a requirements file (``text.splitlines()``
    once a UTF-8 byte order mark is gone): the line without its comment, or "" for a
    blank line, a comment or an option (``-r``, ``--index-url``, ...)."""
    specs = []
    for line in text.removeprefix("\ufeff").splitlines():
        spec = _COMMENT.sub("", line).strip()
        specs.append("" if spec.startswith("-") else spec)
    return specs


def parse_pin(spec: str) -> tuple[str, str, str] | None:
    """``name[extras]==version`` (no marker) -> (name, "[extras]" or "", version)."""
    match = _PINNED.match(spec)
    return (match.group(1), match.group(2) or "", match.group(3)) if match else None


def pinned(specs: Sequence[str]) -> dict[str, str]:
    """requirement_key(name) -> version, for every ``name==version`` of specs."""
    pins = {}
    for spec in specs:
        pin = parse_pin(spec.split(";", 1)[0])
        if pin:
            pins[requirement_key(pin[0])] = pin[2]
    return pins


def requirement_names(specs: Sequence[str]) -> set[str]:
    """requirement_key of every distribution specs name, pinned or not."""
    return {requirement_key(m.group(1)) for m in map(_REQUIREMENT_NAME.match, specs) if m}
