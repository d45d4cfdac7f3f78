"""Package IDs (the SHA-256 of a package's bytes, in hex) and the prefixes people type."""

from __future__ import annotations

PACKAGE_ID_LENGTH = 64
SHORT_ID_LENGTH = 12
MIN_PREFIX_LENGTH = 7

_HEX = frozenset("0123456789abcdef")


def short_id(package_id: str) -> str:
    """The first SHORT_ID_LENGTH characters of an ID, for people (tags, tables)."""
    return package_id[:SHORT_ID_LENGTH]


def is_package_id(s: str) -> bool:
    """Whether ``s`` is a full package ID: 64 lowercase hexadecimal characters."""
    return len(s) == PACKAGE_ID_LENGTH and _HEX.issuperset(s)


def check_prefix(s: str) -> str:
    """``s`` as a usable ID or ID prefix (lowercased), else ValueError saying what is wrong."""
    ref = s.strip().lower()
    if not ref:
        raise ValueError("no package ID given")
    if not _HEX.issuperset(ref):
        raise ValueError(f"{s!r} is not a package ID: IDs are hexadecimal (0-9, a-f)")
    if len(ref) > PACKAGE_ID_LENGTH:
        raise ValueError(
            f"{s!r} is not a package ID: IDs are {PACKAGE_ID_LENGTH} characters long, "
            f"this is {len(ref)}"
        )
    if len(ref) < MIN_PREFIX_LENGTH:
        raise ValueError(
            f"package ID prefix {s!r} is too short: give at least {MIN_PREFIX_LENGTH} characters"
        )
    return ref
