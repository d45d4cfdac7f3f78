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

Stored members also make the zip's length known before a byte of it is read
(:func:`plan_package`), so it can be sent as it is made (:func:`package_chunks`), with a
Content-Length, and never written to disk on the way.
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
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import attrs

from cog.package.selection import (
    IGNORE_FILE,
    PackageError,
    PackageIgnore,
    SourceFile,
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


@attrs.frozen
class PlannedFile:
    """A file as it was when the package was planned."""

    #: member name: the relative posix path under the root
    name: str
    #: the file to read (a link's target, for links)
    path: str
    size: int


@attrs.frozen
class PackagePlan:
    """What a package's zip will hold, and its exact length, before any content is read.

    Made by :func:`plan_package`; :func:`package_chunks` produces the bytes. A file whose
    size differs when it is read is an error then (the length was promised).
    """

    files: tuple[PlannedFile, ...]
    #: the zip's length in bytes
    size: int
    #: the files' total length (what progress counts)
    content_size: int


class _HashingWriter:
    """Writes to ``out`` while hashing every byte."""

    def __init__(self, out: typing.BinaryIO):
        self._out = out
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self.sha256.update(view)
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
    skip: set[tuple[int, int]] = set()
    try:
        st = os.fstat(out.fileno())
        skip.add((st.st_dev, st.st_ino))
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass  # not a file (BytesIO, ...): it cannot be inside the tree
    writer = _HashingWriter(out)
    for chunk in package_chunks(_plan(root, skip), progress):
        writer.write(chunk)
    return writer.sha256.hexdigest()


def plan_package(root: Path) -> PackagePlan:
    """The files of ``root``'s package and the length of its zip; PackageError if the
    directory cannot be packaged (as :func:`write_package` would raise)."""
    return _plan(root, set())


def _plan(root: Path, skip: set[tuple[int, int]]) -> PackagePlan:
    root = check_root(root)
    ignore = PackageIgnore.from_root(root)
    files = source_files(root, ignore, skip)
    if not any(f.name == CONFIG_NAME for f in files):
        if (root / CONFIG_NAME).exists() and ignore.ignores(CONFIG_NAME):
            raise PackageError(f"{CONFIG_NAME} is excluded by {IGNORE_FILE}")
        raise PackageError(f"no {CONFIG_NAME} in {root}")
    planned = tuple(_planned(f) for f in files)
    # The headers' lengths depend on names, sizes and offsets only, never on CRCs: the
    # same code that writes them, given zero CRCs, measures the zip exactly.
    offset = 0
    written: list[_Written] = []
    for f in planned:
        name = f.name.encode("utf-8")
        written.append(_Written(name, 0, f.size, offset, 0o644))
        offset += len(_local_header(name, 0, f.size)) + f.size
    size = offset + sum(len(piece) for piece in _central_directory(written, offset))
    return PackagePlan(planned, size, sum(f.size for f in planned))


def _planned(f: SourceFile) -> PlannedFile:
    try:
        return PlannedFile(f.name, f.path, os.stat(f.path).st_size)
    except OSError as exc:
        raise PackageError(f"cannot read {f.name}: {error_reason(exc)}") from None


def package_chunks(
    plan: PackagePlan, progress: Callable[[int, int], None] | None = None
) -> Iterator[bytes]:
    """The zip's bytes, in order: exactly ``plan.size`` of them (blocking reads).

    Each chunk is a bytes object of its own (at most 1 MiB), which the consumer may keep.
    ``progress`` as for :func:`write_package`. PackageError if a file cannot be read or
    changed since it was planned.
    """
    total = plan.content_size
    done = 0
    if progress is not None:
        progress(0, total)
    offset = 0
    written: list[_Written] = []
    for f in plan.files:
        name = f.name.encode("utf-8")
        try:
            with open(f.path, "rb") as src:
                st = os.fstat(src.fileno())
                if st.st_size != f.size:
                    raise PackageError(f"{f.name} changed while it was being packaged")
                crc = _crc_of(src, f.size, f.name)
                src.seek(0)
                header = _local_header(name, crc, f.size)
                yield header
                copied_crc = 0
                for chunk in _chunks(src, f.size, f.name):
                    copied_crc = zlib.crc32(chunk, copied_crc)
                    yield chunk
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
                if copied_crc != crc:
                    raise PackageError(f"{f.name} changed while it was being packaged")
        except OSError as exc:
            raise PackageError(f"cannot read {f.name}: {error_reason(exc)}") from None
        mode = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
        written.append(_Written(name, crc, f.size, offset, mode))
        offset += len(header) + f.size
        if progress is not None:
            progress(done, total)
    yield b"".join(_central_directory(written, offset))


def _chunks(src: typing.BinaryIO, size: int, name: str) -> Iterator[bytes]:
    """The first `size` bytes of src, in chunks of at most CHUNK. A file that ends early
    was changed while it was being packaged."""
    left = size
    while left:
        chunk = src.read(min(CHUNK, left))
        if not chunk:
            raise PackageError(f"{name} changed while it was being packaged")
        yield chunk
        left -= len(chunk)


def _crc_of(src: typing.BinaryIO, size: int, name: str) -> int:
    crc = 0
    buf = bytearray(CHUNK)
    left = size
    while left:
        n = src.readinto(memoryview(buf)[: min(CHUNK, left)])
        if not n:
            raise PackageError(f"{name} changed while it was being packaged")
        crc = zlib.crc32(memoryview(buf)[:n], crc)
        left -= n
    return crc


def _local_header(name: bytes, crc: int, size: int) -> bytes:
    big = size >= _ZIP64_LIMIT
    extra = struct.pack("<HHQQ", 1, 16, size, size) if big else b""
    return (
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
        + name
        + extra
    )


def _central_directory(written: Iterable[_Written], start: int) -> Iterator[bytes]:
    """The central directory and end records, for a directory beginning at ``start``."""
    position = start
    count = 0
    for w in written:
        count += 1
        fields = []
        if w.size >= _ZIP64_LIMIT:
            fields += [w.size, w.size]  # uncompressed, compressed (this order: APPNOTE 4.5.3)
        if w.offset >= _ZIP64_LIMIT:
            fields.append(w.offset)
        extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
        version = _VERSION_ZIP64 if fields else _VERSION
        entry = (
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
            + w.name
            + extra
        )
        position += len(entry)
        yield entry
    size = position - start
    many = count >= _ZIP64_COUNT_LIMIT
    if many or size >= _ZIP64_LIMIT or start >= _ZIP64_LIMIT:
        end64 = position
        yield END64.pack(
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
        yield LOCATOR64.pack(SIG_LOCATOR64, 0, end64, 1)
    yield END.pack(
        SIG_END,
        0,
        0,
        0xFFFF if many else count,
        0xFFFF if many else count,
        0xFFFFFFFF if size >= _ZIP64_LIMIT else size,
        0xFFFFFFFF if start >= _ZIP64_LIMIT else start,
        0,
    )
