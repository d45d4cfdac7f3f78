"""Local filesystem storage: ``file:///var/lib/cog``.

A blob is a file under the root, at its key's path. Writes go to a temp file in the same
directory (named ``.tmp-*``, never listed), are fsynced, then renamed into place and the
directory fsynced: a crash leaves either the old blob or the new one, never half of one.
A local file on the same file system is taken in the same way without a copy
(:meth:`LocalStorage.link_file`): hard-linked as the temp file, fsynced, renamed.
Temp files a crash left behind are removed by :meth:`open`. Blocking calls run in worker
threads, batched so a listing of 10,000 blobs is one thread hop, not 10,000.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import tempfile
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from cog.storage import BlobInfo, BlobReader, NotFound, Storage, StorageConfigError

CHUNK = 1024 * 1024
TMP_PREFIX = ".tmp-"


def _info(key: str, st: os.stat_result) -> BlobInfo:
    # Every write renames a new file into place: its inode tells a rewrite apart even
    # within the file system's timestamp granularity, and with the same size.
    version = f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"
    return BlobInfo(key=key, size=st.st_size, version=version)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FileReader(BlobReader):
    def __init__(self, info: BlobInfo, file):
        self.info = info
        self._file = file

    async def chunks(self) -> AsyncIterator[bytes]:
        while chunk := await asyncio.to_thread(self._file.read, CHUNK):
            yield chunk


class LocalStorage(Storage):
    scheme = "file"

    def __init__(self, root: Path):
        self.root = root

    def __repr__(self) -> str:
        return f"LocalStorage('file://{self.root}')"

    @classmethod
    def from_url(cls, url: str) -> LocalStorage:
        parts = urlsplit(url)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost") or not parts.path:
            raise StorageConfigError(
                f"not a local storage URL: {url!r} (expected file:///absolute/path)"
            )
        if parts.query:
            raise StorageConfigError(f"file:// storage takes no options, got ?{parts.query}")
        return cls(Path(unquote(parts.path)))

    async def open(self) -> None:
        def prepare() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            for dirpath, _, filenames in os.walk(self.root):
                for name in filenames:
                    if name.startswith(TMP_PREFIX):
                        Path(dirpath, name).unlink(missing_ok=True)

        try:
            await asyncio.to_thread(prepare)
        except OSError as exc:
            raise StorageConfigError(f"cannot use {self.root} for storage: {exc}") from None

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    async def write(self, key: str, chunks: AsyncIterable[bytes]) -> BlobInfo:
        path = self._path(key)

        def start():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
            return os.fdopen(fd, "wb"), name

        file, tmp = await asyncio.to_thread(start)
        try:
            try:
                async for chunk in chunks:
                    await asyncio.to_thread(file.write, chunk)

                def finish() -> os.stat_result:
                    file.flush()
                    os.fsync(file.fileno())
                    file.close()
                    os.replace(tmp, path)
                    _fsync(path.parent)
                    return path.stat()

                st = await asyncio.to_thread(finish)
            finally:
                if not file.closed:
                    file.close()
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return _info(key, st)

    async def link_file(self, key: str, path: Path) -> BlobInfo | None:
        dest = self._path(key)

        def link() -> os.stat_result | None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.parent / f"{TMP_PREFIX}{secrets.token_hex(8)}"
            try:
                os.link(path, tmp)
            except OSError:
                return None  # another file system, no hard links there, ...: copy it
            try:
                _fsync(tmp)  # its bytes on disk before its name appears
                os.replace(tmp, dest)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync(dest.parent)
            return dest.stat()

        st = await asyncio.to_thread(link)
        return None if st is None else _info(key, st)

    @contextlib.asynccontextmanager
    async def open_reader(self, key: str) -> AsyncIterator[BlobReader]:
        path = self._path(key)

        def start():
            file = open(path, "rb")  # noqa: SIM115 - closed below
            return file, os.fstat(file.fileno())

        try:
            file, st = await asyncio.to_thread(start)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(key) from None
        try:
            yield _FileReader(_info(key, st), file)
        finally:
            # Closing a file opened for reading does not wait on the disk, and must
            # happen even when the reader's task is being cancelled (a thread hop here
            # could be cancelled before it runs, leaving the file open).
            file.close()

    async def stat(self, key: str) -> BlobInfo:
        try:
            st = await asyncio.to_thread(self._path(key).stat)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(key) from None
        if not os.path.isfile(self._path(key)):
            raise NotFound(key)
        return _info(key, st)

    async def delete(self, key: str) -> None:
        try:
            await asyncio.to_thread(self._path(key).unlink)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(key) from None

    async def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        # The deepest directory the prefix names fully; filter the rest by string prefix.
        folder = prefix.rpartition("/")[0]
        base = self._path(folder) if folder else self.root
        infos = await asyncio.to_thread(self._scan, base, folder, prefix)
        for info in infos:
            yield info

    @staticmethod
    def _scan(base: Path, folder: str, prefix: str) -> list[BlobInfo]:
        found: list[BlobInfo] = []
        pending = [(base, f"{folder}/" if folder else "")]
        while pending:
            directory, key_prefix = pending.pop()
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                key = key_prefix + entry.name
                if entry.name.startswith(TMP_PREFIX):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if key.startswith(prefix) or prefix.startswith(key + "/"):
                        pending.append((Path(entry.path), key + "/"))
                elif entry.is_file(follow_symlinks=False) and key.startswith(prefix):
                    try:
                        found.append(_info(key, entry.stat()))
                    except FileNotFoundError:
                        continue  # deleted while listing
        found.sort(key=lambda info: info.key)
        return found
