"""The Storage contract: where every byte and record the cog server knows lives.

A backend implements a handful of primitives on opaque keys (``packages/<id>.zip``,
``records/<id>.json``); everything else (key validation, error translation)
lives once in :class:`CheckedStorage`, which :func:`load_storage` wraps around every
backend. Backends are found through the ``cog.storage`` entry-point group, keyed by the
URL scheme they serve, so a third-party package can add one without touching cog.

Rules every backend keeps (the contract suite :mod:`cog.testing.storage` checks them):

- ``write`` creates or replaces a blob, atomically: readers see the old blob (or
  nothing) until the new one is complete; if the chunk stream raises, nothing is left
  behind and the error propagates. (Packages are content-addressed, so a package zip is
  never rewritten with other bytes; records and logs are.)
- ``open_reader`` raises :class:`NotFound` on entry, before any byte is produced, so an
  HTTP handler can still answer 404.
- ``list`` yields every blob under a prefix with an opaque ``version`` that changes when
  the blob is rewritten with other bytes (it may stay for the very same bytes), so caches
  can tell what to reload; ``write`` returns the version of what it wrote, even when
  another writer replaces it at once.
- ``link_file`` is optional (the default answers None): a backend that can take a local
  file in without copying its bytes (a hard link, where the file shares its file
  system) does so, atomically as ``write``; the blob then shares the file's bytes, so
  callers never change such a file afterwards (removing it is fine). ``write_file``
  stores a local file either way.
- vendor errors never escape: a backend raises :class:`NotFound`,
  :class:`StorageUnavailable` or :class:`StorageError`. Only the backend's own steps are
  translated: an exception the caller raises inside ``open_reader``'s block, or between
  two items of ``list``/``chunks``, reaches the caller unchanged.
"""

from __future__ import annotations

import abc
import contextlib
import re
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import ClassVar

import attrs

from cog.plugins import installed, load_plugin
from cog.streams import file_chunks

ENTRY_POINT_GROUP = "cog.storage"

__all__ = [
    "ENTRY_POINT_GROUP",
    "BlobInfo",
    "BlobReader",
    "CheckedStorage",
    "InvalidKey",
    "NotFound",
    "Storage",
    "StorageConfigError",
    "StorageError",
    "StorageUnavailable",
    "available_schemes",
    "load_storage",
    "validate_key",
]


class StorageError(Exception):
    """A storage operation failed for a reason that is not the caller's fault."""


class NotFound(StorageError):
    """No blob under that key."""


class StorageUnavailable(StorageError):
    """The backing store cannot be reached right now (network, stopped server); retryable."""


class InvalidKey(StorageError, ValueError):
    """A key that breaks the key rules (see :func:`validate_key`)."""


class StorageConfigError(Exception):
    """A --storage URL that names no installed backend or that the backend rejects."""


@attrs.frozen
class BlobInfo:
    key: str
    size: int
    #: Opaque token that changes when the blob is rewritten (mtime+size, an ETag...).
    version: str


class BlobReader(abc.ABC):
    """An open blob: its info, then its bytes as an async stream of chunks."""

    info: BlobInfo

    @abc.abstractmethod
    def chunks(self) -> AsyncIterator[bytes]:
        """The blob's bytes, in order, in chunks of a backend-chosen size."""


class Storage(abc.ABC):
    """A flat namespace of blobs addressed by keys; a write replaces a blob whole."""

    #: Informational: the scheme this backend is registered under.
    scheme: ClassVar[str] = ""

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str) -> Storage:
        """Build the backend from its URL (``file:///var/lib/cog``, ``s3://b/p?endpoint=``).

        The backend parses its own options out of the URL; raise StorageConfigError
        with a readable message for a URL it cannot use.
        """

    async def open(self) -> None:
        """Acquire clients and check the store is usable. Called once before use."""

    async def close(self) -> None:
        """Release what open() acquired."""

    @abc.abstractmethod
    async def write(self, key: str, chunks: AsyncIterable[bytes]) -> BlobInfo:
        """Store the stream under key, atomically; replaces an existing blob."""

    @abc.abstractmethod
    def open_reader(self, key: str) -> contextlib.AbstractAsyncContextManager[BlobReader]:
        """``async with storage.open_reader(key) as blob:``; NotFound raised on entry."""

    @abc.abstractmethod
    async def stat(self, key: str) -> BlobInfo:
        """Info of one blob, or NotFound."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove one blob, or NotFound."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        """Every blob whose key starts with prefix (a string prefix, not only a folder)."""

    # Shared conveniences, written once on top of the primitives.

    async def exists(self, key: str) -> bool:
        try:
            await self.stat(key)
        except NotFound:
            return False
        return True

    async def link_file(self, key: str, path: Path) -> BlobInfo | None:
        """Store the local file at ``path`` under ``key`` without copying its bytes, if
        this backend can (see the module docstring); None if it cannot, and nothing is
        stored. The file stays the caller's, who must not change it afterwards."""
        return None

    async def write_file(self, key: str, path: Path) -> BlobInfo:
        """Store the local file at ``path`` under ``key``: linked where the backend can,
        else its bytes written (``write``). The file stays the caller's."""
        info = await self.link_file(key, path)
        if info is None:
            info = await self.write(key, file_chunks(path))
        return info

    async def write_bytes(self, key: str, data: bytes) -> BlobInfo:
        async def one_chunk() -> AsyncIterator[bytes]:
            yield data

        return await self.write(key, one_chunk())

    async def read_bytes(self, key: str) -> bytes:
        """Whole blob in memory: for small records only, never for packages."""
        async with self.open_reader(key) as blob:
            return b"".join([chunk async for chunk in blob.chunks()])


_KEY_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_KEY_LENGTH = 1024


def validate_key(key: str, *, prefix: bool = False) -> str:
    """Keys are '/'-separated parts of [A-Za-z0-9._-] (not starting with '.' or '-').

    A list prefix may be empty or end with '/' or in the middle of a part.
    """
    if not isinstance(key, str):
        raise InvalidKey(f"storage key must be a string, not {type(key).__name__}")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(f"storage key longer than {MAX_KEY_LENGTH} characters")
    if prefix and key == "":
        return key
    parts = key.split("/")
    if prefix and parts[-1] == "":
        parts = parts[:-1]
    for part in parts:
        if not _KEY_PART.fullmatch(part):
            raise InvalidKey(f"invalid storage key {key!r}")
    return key


class CheckedStorage(Storage):
    """Wraps any backend: validates keys and keeps vendor errors from leaking out."""

    def __init__(self, backend: Storage) -> None:
        self.backend = backend
        self.scheme = backend.scheme

    @classmethod
    def from_url(cls, url: str) -> Storage:  # pragma: no cover - use load_storage()
        return load_storage(url)

    def __repr__(self) -> str:
        return f"CheckedStorage({self.backend!r})"

    async def open(self) -> None:
        with _translated(self.backend):
            await self.backend.open()

    async def close(self) -> None:
        with _translated(self.backend):
            await self.backend.close()

    async def write(self, key: str, chunks: AsyncIterable[bytes]) -> BlobInfo:
        validate_key(key)
        source_errors: list[BaseException] = []

        async def watched() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks:
                    yield chunk
            except Exception as exc:
                source_errors.append(exc)
                raise

        try:
            with _translated(self.backend):
                return await self.backend.write(key, watched())
        except StorageError:
            # The caller's own stream failed (e.g. an upload over its size limit):
            # that error, not the backend's wrapping of it, is what the caller must see.
            if source_errors:
                raise source_errors[0] from None
            raise

    @contextlib.asynccontextmanager
    async def open_reader(self, key: str) -> AsyncIterator[BlobReader]:
        # Only the backend's own steps are translated (entering, reading, closing): an
        # error the caller raises inside the with-block (its client hung up, its disk is
        # full) is the caller's, and passes through unchanged.
        validate_key(key)
        manager = self.backend.open_reader(key)
        with _translated(self.backend):
            blob = await manager.__aenter__()
        try:
            yield _CheckedReader(blob, self.backend)
        except BaseException as exc:
            try:
                suppressed = await manager.__aexit__(type(exc), exc, exc.__traceback__)
            except BaseException as raised:
                translated = _translation(self.backend, raised)
                if raised is exc or translated is raised:
                    raise
                raise translated from raised
            if not suppressed:
                raise
        else:
            with _translated(self.backend):
                await manager.__aexit__(None, None, None)

    async def link_file(self, key: str, path: Path) -> BlobInfo | None:
        validate_key(key)
        with _translated(self.backend):
            return await self.backend.link_file(key, path)

    async def stat(self, key: str) -> BlobInfo:
        validate_key(key)
        with _translated(self.backend):
            return await self.backend.stat(key)

    async def delete(self, key: str) -> None:
        validate_key(key)
        with _translated(self.backend):
            await self.backend.delete(key)

    async def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        validate_key(prefix, prefix=True)
        async for info in _translated_iteration(self.backend, self.backend.list(prefix)):
            yield info


class _CheckedReader(BlobReader):
    def __init__(self, blob: BlobReader, backend: Storage) -> None:
        self.info = blob.info
        self._blob = blob
        self._backend = backend

    def chunks(self) -> AsyncIterator[bytes]:
        return _translated_iteration(self._backend, self._blob.chunks())


async def _translated_iteration(backend: Storage, items: AsyncIterator) -> AsyncIterator:
    """The backend's items with its errors translated; only its own steps are, since
    what the caller does between two items never runs inside this generator."""
    iterator = items.__aiter__()
    try:
        while True:
            with _translated(backend):
                try:
                    item = await iterator.__anext__()
                except StopAsyncIteration:
                    return
            yield item
    finally:
        close = getattr(iterator, "aclose", None)
        if close is not None:
            with _translated(backend):
                await close()


@contextlib.contextmanager
def _translated(backend: Storage):
    """Last line of defence: a backend bug or vendor error becomes a StorageError."""
    try:
        yield
    except (StorageError, StorageConfigError, GeneratorExit):
        raise
    except Exception as exc:
        raise _translation(backend, exc) from exc


def _translation(backend: Storage, exc: BaseException) -> BaseException:
    if isinstance(exc, (StorageError, StorageConfigError)) or not isinstance(exc, Exception):
        return exc  # ours already, or a cancellation / exit: never relabelled
    if isinstance(exc, OSError):
        return StorageUnavailable(f"{type(backend).__name__}: {exc}")
    return StorageError(f"{type(backend).__name__}: {type(exc).__name__}: {exc}")


def available_schemes() -> list[str]:
    return installed(ENTRY_POINT_GROUP)


def load_storage(url: str) -> Storage:
    """The backend for url's scheme, wrapped in CheckedStorage (not yet opened)."""
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        raise StorageConfigError(
            f"storage URL {url!r} has no scheme; expected e.g. file:///var/lib/cog or "
            "s3://bucket/prefix"
        )
    cls = load_plugin(
        ENTRY_POINT_GROUP,
        scheme,
        noun="storage backend for scheme",
        hint="pip install 'cog[s3]'",
        error=StorageConfigError,
    )
    backend = cls.from_url(url)
    if not backend.scheme:
        backend.scheme = scheme
    return CheckedStorage(backend)
