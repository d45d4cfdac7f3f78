"""What a package zip is made of, for the writer and the reader alike: the zip record
layouts (APPNOTE.TXT 4.3, all little-endian), the member-name rule, and the one member
every package holds."""

from __future__ import annotations

import struct

from cog.units import MiB

CONFIG_NAME = "cog.yaml"

LOCAL = struct.Struct("<IHHHHHIIIHH")
CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
END = struct.Struct("<IHHHHIIH")
END64 = struct.Struct("<IQHHIIQQQQ")
LOCATOR64 = struct.Struct("<IIQI")
SIG_LOCAL = 0x04034B50
SIG_CENTRAL = 0x02014B50
SIG_END = 0x06054B50
SIG_END64 = 0x06064B50
SIG_LOCATOR64 = 0x07064B50

#: how much of a member's data is copied at a time, writing or reading
CHUNK = 1 * MiB


def member_name_problem(name: str) -> str | None:
    """Why ``name`` is not an acceptable member path (relative, normalized, '/'-separated)."""
    if not name:
        return "is empty"
    if "\\" in name:
        return "contains a backslash"
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        return "contains a control character"
    if name.startswith("/"):
        return "is an absolute path"
    if len(name) >= 2 and name[1] == ":" and name[0].isalpha():
        return "starts with a drive letter"
    parts = name.split("/")
    if ".." in parts:
        return "points outside the package ('..')"
    if "." in parts or "" in parts:
        return "is not a normalized path (empty or '.' part)"
    return None
