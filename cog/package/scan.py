"""Checking a package's members as its bytes arrive, so an upload is verified once received.

:class:`MemberScan` follows a zip from its first byte: each local header, then that
member's data, CRC-checked against the header. It follows only what it can check
exactly (stored members with their sizes in the header, as cog's writer makes them); at
anything else it stops following and the rest of the zip is left to the full check. What
it found is only a claim until :meth:`cog.package.PackageArchive.open` matches it against
the central directory: a member counts as verified only if the directory's entry points
at a header the scan read, with the same name, CRC and size. Every other member is read
and checked as before, so a hostile zip gains nothing by being streamed.

Pure computation, no I/O: the server feeds it the upload's chunks as they are spooled.
"""

from __future__ import annotations

import struct
import zipfile
import zlib

import attrs

from cog.package.zipformat import LOCAL, SIG_LOCAL

_FLAG_UTF8 = 0x0800
_ZIP64_EXTRA = 0x0001


@attrs.frozen
class ScannedMember:
    """A member whose data matched its local header's CRC as it streamed in."""

    #: the name's bytes as in the local header
    name: bytes
    #: the local header's general-purpose flags (bit 11: the name is UTF-8)
    flags: int
    crc: int
    size: int
    #: the offset just past its data
    end: int


class MemberScan:
    """Follows one zip's bytes, fed in order; see the module docstring.

    ``members`` maps the offset of each local header whose member checked out to what it
    said. At most ``max_members`` are followed: a zip with more is refused by the
    directory's count anyway, and the scan's memory stays bounded.
    """

    def __init__(self, max_members: int):
        self.max_members = max_members
        self.members: dict[int, ScannedMember] = {}
        self._pending = bytearray()  # the header being read
        self._position = 0  # offset in the zip of the next byte fed
        self._following = True
        self._header_at = 0
        self._member: ScannedMember | None = None  # whose data is streaming
        self._left = 0
        self._crc = 0

    @property
    def following(self) -> bool:
        """Whether the scan still reads the zip (False once it met what it does not check)."""
        return self._following

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view and self._following:
            view = self._data(view) if self._member is not None else self._header(view)
        self._position += len(view)

    def _data(self, view: memoryview) -> memoryview:
        assert self._member is not None
        n = min(self._left, len(view))
        self._crc = zlib.crc32(view[:n], self._crc)
        self._left -= n
        self._position += n
        if not self._left:
            if self._crc == self._member.crc:
                self.members[self._header_at] = self._member
            self._member = None  # a bad CRC: not recorded, so the full check reads it
        return view[n:]

    def _header(self, view: memoryview) -> memoryview:
        # Each call takes bytes, or starts a member, or stops: never a call that does none.
        if not self._pending:
            self._header_at = self._position
        if len(self._pending) < LOCAL.size:
            view = self._take(view, LOCAL.size)
            if len(self._pending) < LOCAL.size:
                return view
            if struct.unpack_from("<I", self._pending)[0] != SIG_LOCAL:
                self._stop()  # the central directory, or something unexpected
                return view
        name_len, extra_len = struct.unpack_from("<HH", self._pending, 26)
        want = LOCAL.size + name_len + extra_len
        view = self._take(view, want)
        if len(self._pending) == want:
            self._start_member()
        return view

    def _take(self, view: memoryview, want: int) -> memoryview:
        """Up to ``want`` bytes of header in all; what is left of view."""
        n = min(want - len(self._pending), len(view))
        self._pending += view[:n]
        self._position += n
        return view[n:]

    def _start_member(self) -> None:
        header = bytes(self._pending)
        self._pending.clear()
        (_, _, flags, method, _, _, crc, packed, size, name_len, extra_len) = LOCAL.unpack_from(
            header
        )
        name = header[LOCAL.size : LOCAL.size + name_len]
        extra = header[LOCAL.size + name_len : LOCAL.size + name_len + extra_len]
        if 0xFFFFFFFF in (packed, size):
            sizes = _zip64_sizes(extra)
            if sizes is None:
                return self._stop()
            size, packed = sizes
        # Only what can be checked exactly: stored, sizes and CRC up front (no data
        # descriptor), not encrypted, no other flags.
        if method != zipfile.ZIP_STORED or flags & ~_FLAG_UTF8 or packed != size:
            return self._stop()
        if len(self.members) >= self.max_members:
            return self._stop()
        self._member = ScannedMember(
            name=name, flags=flags, crc=crc, size=size, end=self._position + size
        )
        self._left = size
        self._crc = 0
        if not size:
            self._data(memoryview(b""))
        return None

    def _stop(self) -> None:
        self._following = False
        self._pending.clear()
        self._member = None


def _zip64_sizes(extra: bytes) -> tuple[int, int] | None:
    """(uncompressed, compressed) from a local header's ZIP64 field, or None."""
    at = 0
    while at + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, at)
        if kind == _ZIP64_EXTRA:
            if length < 16 or at + 4 + length > len(extra):
                return None
            return struct.unpack_from("<QQ", extra, at + 4)
        at += 4 + length
    return None
