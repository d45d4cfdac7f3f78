"""Byte sizes, read and shown one way everywhere: binary units (KiB, MiB, GiB, TiB).

:func:`parse_size` reads what operators write (``4GiB``, ``500MiB``, ``4G``, ``1048576``);
:func:`format_size` is the one way cog shows a size to people (``1.4 KiB``, ``512 B``).
Only the standard library: the CLI and the in-image runtime may use it.
"""

from __future__ import annotations

import re

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

_UNITS = (("KiB", KiB), ("MiB", MiB), ("GiB", GiB), ("TiB", TiB))
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def format_size(n: float) -> str:
    """``512 B``, ``1.4 KiB``, ``8.0 MiB``, ``4.0 GiB``."""
    if n < KiB:
        return f"{n:.0f} B"
    for unit, scale in _UNITS:
        if n < 1024 * scale or unit == "TiB":
            return f"{n / scale:.1f} {unit}"
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """Bytes from ``4GiB``/``4Gi`` (powers of 1024), ``4G``/``4GB`` (powers of 1000), or a
    plain number of bytes; ValueError for anything else."""
    match = _SIZE.fullmatch(text.strip())
    if not match or (match.group(3) and not match.group(2)):
        raise ValueError(f"not a size: {text!r} (e.g. 4GiB, 500MiB, 4G or 1048576)")
    number, prefix, binary = float(match.group(1)), match.group(2).lower(), match.group(3)
    return int(number * (1024 if binary else 1000) ** _POWERS[prefix])
