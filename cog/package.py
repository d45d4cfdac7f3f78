"""Packages: the deterministic zip of a model directory, its ID, and the safe reading of one.

Client side, :func:`write_package` turns a directory into a zip whose bytes depend only on
the files' names, contents and executable bits: entries sorted by name, every timestamp
1980-01-01 00:00, modes 0644 or 0755, no directory entries, no extra fields (except the
ZIP64 field a member over 4 GiB needs), names in UTF-8. The package ID is the SHA-256 of
those bytes, so building the same tree twice, on any machine, gives the same ID.

Members are *stored*, not deflated. Model weights, which make up nearly all of a package's
bytes, do not compress, and deflating them runs at ~50 MB/s against ~1 GB/s for hashing;
deflate's output also depends on the zlib build (zlib-ng and zlib give different bytes),
which would make the ID differ between machines. Our own writer (not :mod:`zipfile`)
keeps the bytes independent of the Python version as well.

What goes in: every regular file under the root, except
- anything in a ``.git`` directory (always),
- ``__pycache__/`` and ``*.pyc`` (bytecode embeds source mtimes; a ``!`` rule in
  ``.cogignore`` brings them back),
- what ``.cogignore`` at the root lists, in gitignore syntax (an excluded directory is not
  entered, so its files cannot be re-included, as in git),
- the zip being written, when it is inside the tree.
Empty directories are not kept. A symbolic link to a file inside the tree is stored as
that file's content under the link's name; any other symbolic link (to a directory, to
something outside the tree, or dangling) and special files (sockets, fifos, devices) are
refused with an error naming them, unless ``.cogignore`` excludes them.

Server side, :class:`PackageArchive` opens an uploaded zip and refuses, with
:class:`InvalidPackage`, anything a well-behaved client would not send: not a zip,
truncated, encrypted, members with unsafe names or of unsafe kinds, duplicates, more
members or more uncompressed bytes than :class:`PackageLimits` allow, no ``cog.yaml`` at
the root. Every read counts the bytes actually decompressed, since headers can lie.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import shutil
import stat
import struct
import typing
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import attrs

from cog.units import GiB, KiB, MiB, format_size

PACKAGE_ID_LENGTH = 64
SHORT_ID_LENGTH = 12
MIN_PREFIX_LENGTH = 7

CONFIG_NAME = "cog.yaml"
IGNORE_FILE = ".cogignore"
#: excluded unless .cogignore re-includes them (see the module docstring)
DEFAULT_IGNORES = ("__pycache__/", "*.pyc")


_HEX = frozenset("0123456789abcdef")
_CHUNK = 1 * MiB


# -- IDs ------------------------------------------------------------------------------


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


# -- errors ---------------------------------------------------------------------------


class PackageError(Exception):
    """A directory cannot be packaged; the message says which file and why."""


class InvalidPackage(Exception):
    """An uploaded zip is refused; ``str()`` is a one-line message for the uploader."""


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


# -- what goes in a package -------------------------------------------------------------


class PackageIgnore:
    """The rules saying which paths stay out of a package.

    ``.git`` (at any depth) is always excluded; then DEFAULT_IGNORES and the given
    gitignore-syntax lines, later lines overriding earlier ones (``!pattern`` re-includes).
    Paths are relative, '/'-separated; directories are asked about with ``is_dir=True``.
    """

    def __init__(self, lines: Iterable[str] = ()):
        import pathspec  # server/CLI dependency; the in-image runtime never imports this

        self._spec = pathspec.GitIgnoreSpec.from_lines([*DEFAULT_IGNORES, *lines])

    @classmethod
    def from_root(cls, root: Path) -> PackageIgnore:
        """The rules for a package directory: its ``.cogignore``, if it has one."""
        path = root / IGNORE_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls()
        except (OSError, UnicodeDecodeError) as exc:
            raise PackageError(f"cannot read {IGNORE_FILE}: {_reason(exc)}") from None
        return cls(text.splitlines())

    def ignores(self, path: str, is_dir: bool = False) -> bool:
        if ".git" in path.split("/"):
            return True
        return self._spec.match_file(path + "/" if is_dir else path)


@attrs.frozen
class _SourceFile:
    #: member name: the relative posix path under the root
    name: str
    #: the file to read (a link's target, for links)
    path: str


def package_files(root: Path) -> list[str]:
    """The sorted relative paths that :func:`write_package` would put in the package."""
    root = _check_root(root)
    return [f.name for f in _collect(root, PackageIgnore.from_root(root), set())]


def _check_root(root: Path) -> Path:
    root = Path(root)
    if not root.exists():
        raise PackageError(f"{root} does not exist")
    if not root.is_dir():
        raise PackageError(f"{root} is not a directory")
    return root


def _collect(root: Path, ignore: PackageIgnore, skip: set[tuple[int, int]]) -> list[_SourceFile]:
    """Every file to package, sorted by name; PackageError on anything we cannot package.

    ``skip`` holds (st_dev, st_ino) of files never to include (the zip being written).
    """
    real_root = os.path.realpath(root)
    files: list[_SourceFile] = []

    def visit(directory: str, prefix: str) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            raise PackageError(f"cannot read directory {prefix or '.'}: {_reason(exc)}") from None
        for entry in entries:
            name = prefix + entry.name
            try:
                add(entry, name)
            except OSError as exc:  # e.g. removed while we walk
                raise PackageError(f"cannot read {name}: {_reason(exc)}") from None

    def add(entry: os.DirEntry, name: str) -> None:
        if entry.is_dir(follow_symlinks=False):
            if not ignore.ignores(name, is_dir=True):
                visit(entry.path, name + "/")
        elif entry.is_file(follow_symlinks=False):
            st = entry.stat(follow_symlinks=False)
            if not ignore.ignores(name) and (st.st_dev, st.st_ino) not in skip:
                _check_name(name)
                files.append(_SourceFile(name, entry.path))
        elif entry.is_symlink():
            source = _follow_link(real_root, entry, name, ignore, skip)
            if source is not None:
                files.append(source)
        elif not ignore.ignores(name):
            raise PackageError(
                f"{name} is not a regular file (a socket, fifo or device): list it in {IGNORE_FILE}"
            )

    visit(real_root, "")
    files.sort(key=lambda f: f.name)
    return files


def _follow_link(
    real_root: str,
    entry: os.DirEntry,
    name: str,
    ignore: PackageIgnore,
    skip: set[tuple[int, int]],
) -> _SourceFile | None:
    """A link to a regular file inside the tree, as that file; None if excluded."""
    target = os.readlink(entry.path)
    try:
        st = os.stat(entry.path)
    except OSError:
        if ignore.ignores(name):
            return None
        raise PackageError(
            f"{name} is a symbolic link to {target}, which does not exist: "
            f"remove it or list it in {IGNORE_FILE}"
        ) from None
    if ignore.ignores(name, is_dir=stat.S_ISDIR(st.st_mode)):
        return None
    if (st.st_dev, st.st_ino) in skip:
        return None
    real = os.path.realpath(entry.path)
    inside = os.path.relpath(real, real_root)
    if inside == ".." or inside.startswith(".." + os.sep) or os.path.isabs(inside):
        raise PackageError(
            f"{name} is a symbolic link to {target}, outside the package directory: "
            f"copy the file in, or list the link in {IGNORE_FILE}"
        )
    if ".git" in inside.split(os.sep):
        raise PackageError(f"{name} is a symbolic link into .git: list it in {IGNORE_FILE}")
    if stat.S_ISDIR(st.st_mode):
        raise PackageError(
            f"{name} is a symbolic link to a directory ({target}); packages hold only files: "
            f"replace it with a copy, or list it in {IGNORE_FILE}"
        )
    if not stat.S_ISREG(st.st_mode):
        raise PackageError(
            f"{name} is a symbolic link to {target}, which is not a regular file: "
            f"list it in {IGNORE_FILE}"
        )
    _check_name(name)
    return _SourceFile(name, entry.path)


def _check_name(name: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise PackageError(f"{name!r}: the file name is not valid UTF-8; rename it") from None
    problem = member_name_problem(name)
    if problem is not None:
        raise PackageError(f"{name!r}: the file name {problem}; rename it")


# -- writing ----------------------------------------------------------------------------

# Zip record layouts (APPNOTE.TXT 4.3); all little-endian.
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_END = struct.Struct("<IHHHHIIH")
_END64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR64 = struct.Struct("<IIQI")
_SIG_LOCAL = 0x04034B50
_SIG_CENTRAL = 0x02014B50
_SIG_END = 0x06054B50
_SIG_END64 = 0x06064B50
_SIG_LOCATOR64 = 0x07064B50
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
            raise PackageError(f"cannot write the package: {_reason(exc)}") from None


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
    root = _check_root(root)
    skip: set[tuple[int, int]] = set()
    try:
        st = os.fstat(out.fileno())
        skip.add((st.st_dev, st.st_ino))
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass  # not a file (BytesIO, ...): it cannot be inside the tree
    ignore = PackageIgnore.from_root(root)
    files = _collect(root, ignore, skip)
    if not any(f.name == CONFIG_NAME for f in files):
        if (root / CONFIG_NAME).exists() and ignore.ignores(CONFIG_NAME):
            raise PackageError(f"{CONFIG_NAME} is excluded by {IGNORE_FILE}")
        raise PackageError(f"no {CONFIG_NAME} in {root}")

    total = 0
    for f in files:
        try:
            total += os.stat(f.path).st_size
        except OSError as exc:
            raise PackageError(f"cannot read {f.name}: {_reason(exc)}") from None
    done = 0
    if progress is not None:
        progress(0, total)

    writer = _HashingWriter(out)
    buf = bytearray(_CHUNK)
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
                    _LOCAL.pack(
                        _SIG_LOCAL,
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
            raise PackageError(f"cannot read {f.name}: {_reason(exc)}") from None
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
            _CENTRAL.pack(
                _SIG_CENTRAL,
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
            _END64.pack(
                _SIG_END64,
                _END64.size - 12,  # the record's size, not counting these first 12 bytes
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
        writer.write(_LOCATOR64.pack(_SIG_LOCATOR64, 0, end64, 1))
    writer.write(
        _END.pack(
            _SIG_END,
            0,
            0,
            0xFFFF if many else count,
            0xFFFF if many else count,
            0xFFFFFFFF if size >= _ZIP64_LIMIT else size,
            0xFFFFFFFF if start >= _ZIP64_LIMIT else start,
            0,
        )
    )


# -- reading an uploaded package --------------------------------------------------------


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
        self, zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], limits: PackageLimits
    ):
        self._zip = zf
        self._members = members
        self.limits = limits
        #: the regular files, in archive order (directory entries left out)
        self.names: list[str] = list(members)
        #: total uncompressed size of the files
        self.uncompressed_size: int = sum(i.file_size for i in members.values())

    @classmethod
    def open(
        cls, path: Path, limits: PackageLimits | None = None, *, verify: bool = True
    ) -> PackageArchive:
        """Open and check the zip at ``path``; InvalidPackage saying why if it is refused.

        With ``verify`` (the default), every member is also decompressed once and its CRC
        checked, so a corrupt or lying member is refused now rather than halfway through a
        build. Pass ``verify=False`` to reopen a package already accepted.
        """
        limits = limits or PackageLimits()
        size = Path(path).stat().st_size
        if size == 0:
            raise InvalidPackage("the package is an empty file (0 bytes), not a zip")
        with open(path, "rb") as f:
            _check_member_count(f, size, limits)
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, EOFError, ValueError, struct.error) as exc:
            raise InvalidPackage(f"the package is not a valid zip file: {exc}") from None
        except NotImplementedError as exc:
            raise InvalidPackage(f"the package uses unsupported zip features: {exc}") from None
        try:
            if len(zf.infolist()) > limits.max_members:  # counted above; zipfile agrees
                raise _too_many(limits, len(zf.infolist()))
            archive = cls(zf, _check_entries(zf.infolist(), size, limits), limits)
            if verify:
                archive._verify()
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
                    shutil.copyfileobj(src, out, _CHUNK)
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

    def _verify(self) -> None:
        buf = bytearray(_CHUNK)
        for name in self._members:
            with self.open_member(name) as f:
                while f.readinto(buf):
                    pass


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


def _check_member_count(f: typing.BinaryIO, size: int, limits: PackageLimits) -> None:
    """Refuse too many entries, or too big a directory, reading fixed headers only.

    zipfile reads the whole central directory and builds an object per entry before we
    could count them; a hostile directory of millions of tiny entries, or of a few with
    huge extra fields, must be refused before that. The records are found the way
    zipfile finds them, so that both see the same directory.
    """
    tail_size = min(size, _END.size + 0xFFFF)
    f.seek(size - tail_size)
    tail = f.read(tail_size)
    signature = struct.pack("<I", _SIG_END)
    if tail[-_END.size :].startswith(signature) and tail[-2:] == b"\0\0":
        at = len(tail) - _END.size  # no archive comment: zipfile looks here first
    else:
        at = tail.rfind(signature)
    if at < 0 or at + _END.size > len(tail):
        raise InvalidPackage(
            "the package is not a zip file (no end-of-archive record: not a zip, or truncated)"
        )
    end_at = size - tail_size + at
    _, _, _, _, count, cd_size, _, _ = _END.unpack_from(tail, at)
    directory_end = end_at
    if end_at >= _LOCATOR64.size:
        f.seek(end_at - _LOCATOR64.size)
        locator = f.read(_LOCATOR64.size)
        if locator[:4] == struct.pack("<I", _SIG_LOCATOR64):
            directory_end = end_at - _LOCATOR64.size - _END64.size
            if directory_end < 0:
                raise InvalidPackage("the package is not a valid zip file: bad ZIP64 records")
            f.seek(directory_end)
            record = f.read(_END64.size)
            if len(record) < _END64.size or record[:4] != struct.pack("<I", _SIG_END64):
                raise InvalidPackage("the package is not a valid zip file: bad ZIP64 records")
            *_, count, cd_size, _ = _END64.unpack(record)
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
        header = f.read(_CENTRAL.size)
        if len(header) < _CENTRAL.size or header[:4] != struct.pack("<I", _SIG_CENTRAL):
            raise InvalidPackage("the package is not a valid zip file: bad central directory")
        seen += 1
        if seen > limits.max_members:
            raise _too_many(limits)
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", header, 28)
        position += _CENTRAL.size + name_len + extra_len + comment_len
        f.seek(position)


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
        if not 0 <= info.header_offset <= archive_size - _LOCAL.size - info.compress_size:
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


# -- small helpers ----------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
