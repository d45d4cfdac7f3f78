"""Plugins: the storage backends and image builders that packages add through entry points.

A package declares ``[options.entry_points] cog.storage = myscheme = mypkg:MyStorage`` (or
``cog.builders``) and cog finds it by that name, with no change to cog itself. Both
groups are loaded here, one way: an unknown name fails with the installed ones listed.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any


def installed(group: str) -> list[str]:
    """The names registered in an entry-point group, sorted."""
    return sorted({ep.name for ep in _entry_points(group)})


def load_plugin(group: str, name: str, *, noun: str, hint: str, error: type[Exception]) -> Any:
    """The object registered as ``name`` in ``group``; ``error`` (one line, naming what is
    installed, or the extra that would make it load) if there is none or it cannot load."""
    matches = [ep for ep in _entry_points(group) if ep.name == name]
    if not matches:
        names = ", ".join(installed(group)) or "none"
        raise error(f"no {noun} {name!r} (installed: {names})")
    try:
        return matches[0].load()
    except ImportError as exc:
        raise error(
            f"{noun} {name!r} cannot be loaded: {exc} (is its extra installed? e.g. {hint})"
        ) from exc


def _entry_points(group: str) -> list[EntryPoint]:
    return list(entry_points(group=group))
