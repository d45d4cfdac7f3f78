"""The deterministic zip writer: a model directory in, a package and its ID out.

The zip's bytes depend only on the files' names, contents and executable bits: entries
sorted by name, every timestamp 1980-01-01 00:00, modes 0644 or 0755, no directory
entries, no extra fields (except the ZIP64 field a member over 4 GiB needs), names in
UTF-8. The package ID is the SHA-256 of those bytes, so the same tree gives the same ID
on any machine.

Members are stored, not deflated: weights do not compress, deflating runs at a twentieth
of hashing speed, and deflate's output depends on the zlib build, which would make IDs
differ between machines. Our own writer (not :mod:`zipfile`) keeps the bytes independent
of the Python version too.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import typing
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs

from cog.package.selection import (
    IGNORE_FILE,
    PackageError,
    PackageIgnore,
    check_root,
    error_reason,
    source_files,
)
from cog.package.zipformat import (
    CENTRAL,
    CHUNK,
    CONFIG_NAME,
    END,
    END64,
    LOCAL,
    LOCATOR64,
    SIG_CENTRAL,
    SIG_END,
    SIG_END64,
    SIG_LOCAL,
    SIG_LOCATOR64,
)

_DOS_TIME = 0  # 00:00:00
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, the earliest a zip can say
_FLAG_UTF8 = 0x0800
_MADE_BY_UNIX = 3 << 8
_VERSION = 20  # 2.0: plain stored files
_VERSION_ZIP64 = 45
# Values at or over these need ZIP64 records (module-level so tests can lower them).
_ZIP64_LIMIT = 0xFFFFFFFF
_ZIP64_COUNT_LIMIT = 0xFFFF


@attrs.frozen
class _Written:
    name: bytes
    crc: int
    size: int
    offset: int
    mode: int


class _HashingWriter:
    """Writes to ``out`` while hashing and counting every byte."""

    def __init__(self, out: typing.BinaryIO):
        self._out = out
        self.sha256 = hashlib.sha256()
        self.offset = 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self.sha256.update(view)
        self.offset += len(view)
        try:
            while view:
                n = self._out.write(view)
                # Raw (unbuffered) files may write less than asked; buffered ones return
                # None or everything.
                if n is None or n >= len(view):
                    break
                view = view[n:]
        except OSError as exc:
            raise PackageError(f"cannot write the package: {error_reason(exc)}") from None


def write_package(
    root: Path,
    out: typing.BinaryIO,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Write the deterministic zip of ``root`` to ``out``; return its package ID.

    ``progress(bytes_done, bytes_total)`` is called as file contents are copied (input
    bytes, not zip bytes). Contents are streamed in 1 MiB chunks; each file is read twice
    (its CRC goes in the header before its data, which keeps the zip readable by every
    tool), and a file that changes between the reads is an error. On PackageError, ``out``
    holds a partial zip the caller must discard.
    """
    root = check_root(root)
    skip: set[tuple[int, int]] = set()
    try:
        st = os.fstat(out.fileno())
        skip.add((st.st_dev, st.st_ino))
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass  # not a file (BytesIO, ...): it cannot be inside the tree
    ignore = PackageIgnore.from_root(root)
    files = source_files(root, ignore, skip)
    if not any(f.name == CONFIG_NAME for f in files):
        if (root / CONFIG_NAME).exists() and ignore.ignores(CONFIG_NAME):
            raise PackageError(f"{CONFIG_NAME} is excluded by {IGNORE_FILE}")
        raise PackageError(f"no {CONFIG_NAME} in {root}")

    total = 0
    for f in files:
        try:
            total += os.stat(f.path).st_size
        except OSError as exc:
            raise PackageError(f"cannot read {f.name}: {error_reason(exc)}") from None
    done = 0
    if progress is not None:
        progress(0, total)

    writer = _HashingWriter(out)
    buf = bytearray(CHUNK)
    written: list[_Written] = []
    for f in files:
        name = f.name.encode("utf-8")
        try:
            with open(f.path, "rb") as src:
                st = os.fstat(src.fileno())
                size = st.st_size
                crc = _crc_of(src, size, buf, f.name)
                src.seek(0)
                offset = writer.offset
                big = size >= _ZIP64_LIMIT
                extra = struct.pack("<HHQQ", 1, 16, size, size) if big else b""
                writer.write(
                    LOCAL.pack(
                        SIG_LOCAL,
                        _VERSION_ZIP64 if big else _VERSION,
                        _FLAG_UTF8,
                        zipfile.ZIP_STORED,
                        _DOS_TIME,
                        _DOS_DATE,
                        crc,
                        0xFFFFFFFF if big else size,
                        0xFFFFFFFF if big else size,
                        len(name),
                        len(extra),
                    )
                )
                writer.write(name)
                writer.write(extra)
                copied_crc = 0
                for chunk in _chunks(src, size, buf, f.name):
                    copied_crc = zlib.crc32(chunk, copied_crc)
                    writer.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
                if copied_crc != crc:
                    raise PackageError(f"{f.name} changed while it was being packaged")
        except OSError as exc:
            raise PackageError(f"cannot read {f.name}: {error_reason(exc)}") from None
        mode = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
        written.append(_Written(name, crc, size, offset, mode))
        if progress is not None:
            progress(done, total)

    _write_central_directory(writer, written)
    return writer.sha256.hexdigest()


def _chunks(src: typing.BinaryIO, size: int, buf: bytearray, name: str) -> Iterator[memoryview]:
    """The first `size` bytes of src, read into buf: each chunk is valid until the next one.
    A file that ends early was changed while it was being packaged."""
    left = size
    while left:
        n = src.readinto(buf)
        if not n:
            raise PackageError(f"{name} changed while it was being packaged")
        n = min(n, left)
        yield memoryview(buf)[:n]
        left -= n


def _crc_of(src: typing.BinaryIO, size: int, buf: bytearray, name: str) -> int:
    crc = 0
    for chunk in _chunks(src, size, buf, name):
        crc = zlib.crc32(chunk, crc)
    return crc


def _write_central_directory(writer: _HashingWriter, written: list[_Written]) -> None:
    start = writer.offset
    for w in written:
        fields = []
        if w.size >= _ZIP64_LIMIT:
            fields += [w.size, w.size]  # uncompressed, compressed (this order: APPNOTE 4.5.3)
        if w.offset >= _ZIP64_LIMIT:
            fields.append(w.offset)
        extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
        version = _VERSION_ZIP64 if fields else _VERSION
        writer.write(
            CENTRAL.pack(
                SIG_CENTRAL,
                _MADE_BY_UNIX | version,
                version,
                _FLAG_UTF8,
                zipfile.ZIP_STORED,
                _DOS_TIME,
                _DOS_DATE,
                w.crc,
                0xFFFFFFFF if w.size >= _ZIP64_LIMIT else w.size,
                0xFFFFFFFF if w.size >= _ZIP64_LIMIT else w.size,
                len(w.name),
                len(extra),
                0,  # comment length
                0,  # disk number
                0,  # internal attributes
                (stat.S_IFREG | w.mode) << 16,
                0xFFFFFFFF if w.offset >= _ZIP64_LIMIT else w.offset,
            )
        )
        writer.write(w.name)
        writer.write(extra)
    size = writer.offset - start
    count = len(written)
    many = count >= _ZIP64_COUNT_LIMIT
    if many or size >= _ZIP64_LIMIT or start >= _ZIP64_LIMIT:
        end64 = writer.offset
        writer.write(
            END64.pack(
                SIG_END64,
                END64.size - 12,  # the record's size, not counting these first 12 bytes
                _MADE_BY_UNIX | _VERSION_ZIP64,
                _VERSION_ZIP64,
                0,
                0,
                count,
                count,
                size,
                start,
            )
        )
        writer.write(LOCATOR64.pack(SIG_LOCATOR64, 0, end64, 1))
    writer.write(
        END.pack(
            SIG_END,
            0,
            0,
            0xFFFF if many else count,
            0xFFFF if many else count,
            0xFFFFFFFF if size >= _ZIP64_LIMIT else size,
            0xFFFFFFFF if start >= _ZIP64_LIMIT else start,
            0,
        )
    )
