"""The server side of packages: an uploaded zip, opened and checked before anything reads it.

:class:`PackageArchive` refuses, with :class:`InvalidPackage`, anything a well-behaved
client would not send: not a zip, truncated, encrypted, members with unsafe names or of
unsafe kinds, duplicates, more members or more uncompressed bytes than
:class:`PackageLimits` allow, no ``cog.yaml`` at the root. Every read counts the bytes
actually decompressed, since headers can lie.
"""

from __future__ import annotations

import bisect
import io
import os
import posixpath
import shutil
import stat
import struct
import typing
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import attrs

from cog.package.scan import ScannedMember
from cog.package.selection import IGNORE_FILE
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
    SIG_LOCATOR64,
    member_name_problem,
)
from cog.units import GiB, KiB, MiB, format_size


class InvalidPackage(Exception):
    """An uploaded zip is refused; ``str()`` is a one-line message for the uploader."""


@attrs.frozen
class PackageLimits:
    """What an uploaded package may expand to; over any of these it is refused."""

    #: entries in the zip, directories included
    max_members: int = 10_000
    #: total declared (and actually decompressed) size of all members
    max_uncompressed_bytes: int = 8 * GiB
    #: total uncompressed / zip size, enforced once the total is over ratio_threshold_bytes,
    #: so that small, very compressible packages (a text file of zeros) are fine
    max_ratio: float = 200.0
    ratio_threshold_bytes: int = 64 * MiB
    #: largest member read_text() will load into memory (cog.yaml, the model's source)
    max_text_bytes: int = 16 * MiB


@attrs.frozen
class MemberInfo:
    """A regular file in a package."""

    #: relative '/'-separated path
    name: str
    #: uncompressed size in bytes
    size: int
    #: 0o644, or 0o755 for executables
    mode: int


class PackageArchive:
    """An uploaded package zip on local disk, validated; a context manager.

    Blocking (zipfile): on the server, call it from a worker thread. Reads may run from
    several threads at once.
    """

    def __init__(
        self,
        zf: zipfile.ZipFile,
        members: dict[str, zipfile.ZipInfo],
        limits: PackageLimits,
        directory_start: int,
    ):
        self._zip = zf
        self._members = members
        self._directory_start = directory_start
        self.limits = limits
        #: the regular files, in archive order (directory entries left out)
        self.names: list[str] = list(members)
        #: total uncompressed size of the files
        self.uncompressed_size: int = sum(i.file_size for i in members.values())

    @classmethod
    def open(
        cls,
        path: Path,
        limits: PackageLimits | None = None,
        *,
        verify: bool = True,
        scanned: Mapping[int, ScannedMember] | None = None,
    ) -> PackageArchive:
        """Open and check the zip at ``path``; InvalidPackage saying why if it is refused.

        With ``verify`` (the default), every member is also decompressed once and its CRC
        checked, so a corrupt or lying member is refused now rather than halfway through a
        build. Pass ``verify=False`` to reopen a package already accepted. ``scanned``:
        what a :class:`~cog.package.scan.MemberScan` of these bytes found as they arrived;
        a member it checked, at the place the central directory says, with the same name,
        CRC and size, and not overlapped by another, is not read again.
        """
        limits = limits or PackageLimits()
        size = Path(path).stat().st_size
        if size == 0:
            raise InvalidPackage("the package is an empty file (0 bytes), not a zip")
        with open(path, "rb") as f:
            directory_start = _check_member_count(f, size, limits)
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, EOFError, ValueError, struct.error) as exc:
            raise InvalidPackage(f"the package is not a valid zip file: {exc}") from None
        except NotImplementedError as exc:
            raise InvalidPackage(f"the package uses unsupported zip features: {exc}") from None
        try:
            if len(zf.infolist()) > limits.max_members:  # counted above; zipfile agrees
                raise _too_many(limits, len(zf.infolist()))
            members = _check_entries(zf.infolist(), size, limits)
            archive = cls(zf, members, limits, directory_start)
            if verify:
                archive._verify(scanned or {})
        except BaseException:
            zf.close()
            raise
        return archive

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> PackageArchive:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def exists(self, path: str) -> bool:
        """Whether ``path`` (relative, '/'-separated) is a regular file in the package."""
        return _normalize(path) in self._members

    def read_text(self, path: str) -> str:
        """The UTF-8 text of a file in the package (FileNotFoundError if there is none)."""
        info = self._info(path)
        if info.file_size > self.limits.max_text_bytes:
            raise InvalidPackage(
                f"{info.filename} is too large to read as text ({format_size(info.file_size)}; "
                f"limit {format_size(self.limits.max_text_bytes)})"
            )
        with self.open_member(info.filename) as f:
            data = f.read()
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise InvalidPackage(
                f"{info.filename} is not UTF-8 text (byte {exc.start} is invalid)"
            ) from None

    def open_member(self, name: str) -> typing.BinaryIO:
        """A streaming reader of one file; InvalidPackage from read() if its data is bad."""
        info = self._info(name)
        try:
            raw = self._zip.open(info)
        except (zipfile.BadZipFile, EOFError, zlib.error, struct.error, UnicodeDecodeError) as exc:
            raise InvalidPackage(f"{info.filename} is corrupt in the package: {exc}") from None
        except NotImplementedError as exc:
            raise InvalidPackage(f"{info.filename} cannot be read: {exc}") from None
        return typing.cast(typing.BinaryIO, _MemberReader(raw, info.filename, info.file_size))

    def iter_members(self) -> Iterator[MemberInfo]:
        """The regular files, in archive order."""
        for name, info in self._members.items():
            yield MemberInfo(name, info.file_size, _member_mode(info))

    def extract_to(self, dest: Path) -> None:
        """Write every file under ``dest``, which must be empty or not exist yet.

        On error, everything written is removed again.
        """
        dest = Path(dest)
        created = not dest.exists()
        dest.mkdir(parents=True, exist_ok=True)
        if any(dest.iterdir()):
            raise ValueError(f"{dest} is not empty; packages are extracted into empty directories")
        try:
            for member in self.iter_members():
                target = dest.joinpath(*member.name.split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                with self.open_member(member.name) as src, open(target, "xb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
                os.chmod(target, member.mode)
        except BaseException:
            for child in dest.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
            if created:
                dest.rmdir()
            raise

    def _info(self, path: str) -> zipfile.ZipInfo:
        try:
            return self._members[_normalize(path)]
        except KeyError:
            raise FileNotFoundError(f"{path} is not in the package") from None

    def _verify(self, scanned: Mapping[int, ScannedMember]) -> None:
        # Where each entry's bytes must end: the next entry's header, or the directory.
        bounds = sorted({i.header_offset for i in self._zip.infolist()} | {self._directory_start})
        buf = bytearray(CHUNK)
        for name, info in self._members.items():
            if _checked_as_scanned(info, scanned.get(info.header_offset), bounds):
                continue
            with self.open_member(name) as f:
                while f.readinto(buf):
                    pass


def _checked_as_scanned(
    info: zipfile.ZipInfo, scanned: ScannedMember | None, bounds: list[int]
) -> bool:
    """Whether the scan checked exactly the bytes that reading this entry would: its
    header is where the directory says, with the directory's flags, naming the same file,
    stored, with the directory's CRC and size, and its data ends before the next
    entry's header (zipfile refuses overlapping entries)."""
    if scanned is None:
        return False
    try:
        name = scanned.name.decode("utf-8" if scanned.flags & 0x0800 else "cp437")
    except UnicodeDecodeError:
        return False
    at = bisect.bisect_right(bounds, info.header_offset)
    return (
        name == info.orig_filename
        and info.compress_type == zipfile.ZIP_STORED
        and scanned.flags == info.flag_bits  # so both name decodings agree
        and not info.flag_bits & ~0x0800
        and scanned.crc == info.CRC
        and scanned.size == info.file_size == info.compress_size
        and at < len(bounds)
        and scanned.end <= bounds[at]
    )


class _MemberReader(io.RawIOBase):
    """One member's bytes, counted: no more than its declared size ever comes out."""

    def __init__(self, raw: typing.BinaryIO, name: str, size: int):
        self._raw = raw
        self._name = name
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b: typing.Any) -> int:
        view = memoryview(b).cast("B")
        # Ask for one byte beyond the declared size at the end, to notice a lying header.
        want = min(len(view), self._left + 1)
        try:
            data = self._raw.read(want)
        except (zipfile.BadZipFile, EOFError, zlib.error, struct.error) as exc:
            raise InvalidPackage(f"{self._name} is corrupt in the package: {exc}") from None
        if len(data) > self._left:
            raise InvalidPackage(f"{self._name} is corrupt: more data than its header declares")
        if not data and self._left and len(view):
            raise InvalidPackage(f"{self._name} is corrupt: less data than its header declares")
        self._left -= len(data)
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


def _normalize(path: str) -> str:
    """A path as asked by config code ('./infer.py', 'a//b') in member-name form."""
    path = posixpath.normpath(path.replace("\\", "/")) if path else ""
    return "" if path in (".", "") or path.startswith(("../", "/")) or path == ".." else path


def _member_mode(info: zipfile.ZipInfo) -> int:
    return 0o755 if (info.external_attr >> 16) & stat.S_IXUSR else 0o644


def _check_member_count(f: typing.BinaryIO, size: int, limits: PackageLimits) -> int:
    """Refuse too many entries, or too big a directory, reading fixed headers only; the
    offset where the central directory starts.

    zipfile reads the whole central directory and builds an object per entry before we
    could count them; a hostile directory of millions of tiny entries, or of a few with
    huge extra fields, must be refused before that. The records are found the way
    zipfile finds them, so that both see the same directory.
    """
    tail_size = min(size, END.size + 0xFFFF)
    f.seek(size - tail_size)
    tail = f.read(tail_size)
    signature = struct.pack("<I", SIG_END)
    if tail[-END.size :].startswith(signature) and tail[-2:] == b"\0\0":
        at = len(tail) - END.size  # no archive comment: zipfile looks here first
    else:
        at = tail.rfind(signature)
    if at < 0 or at + END.size > len(tail):
        raise InvalidPackage(
            "the package is not a zip file (no end-of-archive record: not a zip, or truncated)"
        )
    end_at = size - tail_size + at
    _, _, _, _, count, cd_size, _, _ = END.unpack_from(tail, at)
    directory_end = end_at
    if end_at >= LOCATOR64.size:
        f.seek(end_at - LOCATOR64.size)
        locator = f.read(LOCATOR64.size)
        if locator[:4] == struct.pack("<I", SIG_LOCATOR64):
            directory_end = end_at - LOCATOR64.size - END64.size
            if directory_end < 0:
                raise InvalidPackage("the package is not a valid zip file: bad ZIP64 records")
            f.seek(directory_end)
            record = f.read(END64.size)
            if len(record) < END64.size or record[:4] != struct.pack("<I", SIG_END64):
                raise InvalidPackage("the package is not a valid zip file: bad ZIP64 records")
            *_, count, cd_size, _ = END64.unpack(record)
    if count > limits.max_members:
        raise _too_many(limits, count)
    # Names of a few hundred bytes and small extra fields: 1 KiB a member is plenty.
    if cd_size > limits.max_members * KiB:
        raise InvalidPackage(
            f"the zip's central directory is {format_size(cd_size)}, over the limit of "
            f"{format_size(limits.max_members * KiB)} "
            f"(1 KiB for each of {limits.max_members:,} files)"
        )
    start = directory_end - cd_size
    if start < 0:
        raise InvalidPackage("the package is not a valid zip file: truncated central directory")
    f.seek(start)
    seen = 0
    position = start
    while position < directory_end:
        header = f.read(CENTRAL.size)
        if len(header) < CENTRAL.size or header[:4] != struct.pack("<I", SIG_CENTRAL):
            raise InvalidPackage("the package is not a valid zip file: bad central directory")
        seen += 1
        if seen > limits.max_members:
            raise _too_many(limits)
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", header, 28)
        position += CENTRAL.size + name_len + extra_len + comment_len
        f.seek(position)
    return start


def _too_many(limits: PackageLimits, declared: int | None = None) -> InvalidPackage:
    count = f"{declared:,}" if declared is not None else f"more than {limits.max_members:,}"
    return InvalidPackage(
        f"the package has {count} files and directories, over the limit of "
        f"{limits.max_members:,} (list what the model does not need in {IGNORE_FILE})"
    )


def _check_entries(
    infos: list[zipfile.ZipInfo], archive_size: int, limits: PackageLimits
) -> dict[str, zipfile.ZipInfo]:
    """The regular-file members by name, once every entry has passed every check."""
    files: dict[str, zipfile.ZipInfo] = {}
    directories: set[str] = set()
    total = 0
    for info in infos:
        name = info.filename
        if info.orig_filename != name:  # zipfile cut the name at a NUL
            raise InvalidPackage(f"a member name contains a NUL character: {name!r}")
        is_dir = name.endswith("/")
        path = name[:-1] if is_dir else name
        problem = member_name_problem(path)
        if problem is not None:
            raise InvalidPackage(f"member {name!r} {problem}")
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind == stat.S_IFLNK:
            raise InvalidPackage(f"{name} is a symbolic link; packages may only hold regular files")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise InvalidPackage(f"{name} is a device or other special file, not a regular file")
        if info.flag_bits & 0x1:
            raise InvalidPackage(f"{name} is encrypted; packages must not be encrypted")
        if is_dir or kind == stat.S_IFDIR:
            if info.file_size:
                raise InvalidPackage(f"{name} is a directory entry with data in it")
            if path in directories:
                raise InvalidPackage(f"{name} appears twice in the package")
            directories.add(path)
            continue
        if not 0 <= info.header_offset <= archive_size - LOCAL.size - info.compress_size:
            raise InvalidPackage(f"{name} is corrupt: its data lies outside the zip")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise InvalidPackage(
                f"{name} uses an unsupported compression method ({info.compress_type}); "
                "packages may use stored or deflate"
            )
        if name in files:
            raise InvalidPackage(f"{name} appears twice in the package")
        files[name] = info
        total += info.file_size

    parents = {posixpath.dirname(n) for n in files} | directories
    for parent in list(parents):
        while parent:
            parents.add(parent)
            parent = posixpath.dirname(parent)
    clashes = sorted(parents & files.keys())
    if clashes:
        raise InvalidPackage(f"{clashes[0]} is both a file and a directory in the package")

    if total > limits.max_uncompressed_bytes:
        raise InvalidPackage(
            f"the package expands to {format_size(total)} uncompressed, over the limit of "
            f"{format_size(limits.max_uncompressed_bytes)}"
        )
    ratio = total / archive_size
    if total > limits.ratio_threshold_bytes and ratio > limits.max_ratio:
        raise InvalidPackage(
            f"the package expands {ratio:.0f} times ({format_size(archive_size)} to "
            f"{format_size(total)} uncompressed), over the ratio limit of "
            f"{limits.max_ratio:g}: refused as a zip bomb"
        )

    if CONFIG_NAME not in files:
        nested = sorted(n for n in files if posixpath.basename(n) == CONFIG_NAME)
        hint = (
            f" (found {nested[0]}: zip the directory's contents, not the directory)"
            if nested
            else ""
        )
        raise InvalidPackage(f"no {CONFIG_NAME} at the root of the package{hint}")
    return files
