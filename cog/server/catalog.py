"""The catalog: package records kept in Storage, with an in-memory index over them.

Storage is the only source of truth (several servers may share one bucket). The index
makes listing and prefix lookups cheap; it is refreshed in the background every
``ttl`` seconds, so a package written by another server is listed here within ``ttl``
seconds; a lookup by ID or prefix that misses the index syncs the records under that
prefix at once. A refresh lists ``records/`` (or ``records/<prefix>``) and reloads only
the records whose storage version changed.

Keys in Storage::

    packages/<id>.zip   the package, exactly the uploaded bytes
    records/<id>.json   its record (the package document)
    logs/<id>.log       the log of its last build
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable

import structlog

from cog.package import MIN_PREFIX_LENGTH, check_prefix, is_package_id
from cog.server.records import PackageRecord, decode_record, encode_record
from cog.storage import NotFound, Storage

log = structlog.get_logger(__name__)

RECORDS = "records/"


def package_key(package_id: str) -> str:
    return f"packages/{package_id}.zip"


def record_key(package_id: str) -> str:
    return f"{RECORDS}{package_id}.json"


def log_key(package_id: str) -> str:
    return f"logs/{package_id}.log"


class PackageNotFound(LookupError):
    def __init__(self, ref: str):
        super().__init__(f"no package matches {ref!r}")


class AmbiguousPrefix(LookupError):
    def __init__(self, prefix: str, matches: Iterable[str]):
        self.matches = sorted(matches)
        shown = ", ".join(m[:12] for m in self.matches[:10])
        more = f" and {len(self.matches) - 10} more" if len(self.matches) > 10 else ""
        super().__init__(
            f"package ID prefix {prefix!r} is ambiguous: it matches {shown}{more}; "
            "give more characters"
        )


class Catalog:
    """Records in Storage plus an index of them; see the module docstring."""

    def __init__(self, storage: Storage, ttl: float = 2.0, concurrency: int = 32):
        self.storage = storage
        self.ttl = ttl
        self._concurrency = concurrency
        self._records: dict[str, PackageRecord] = {}
        #: each record's stored JSON document, as stored: the listing joins these
        self._documents: dict[str, bytes] = {}
        self._versions: dict[str, str] = {}
        self._refreshed_at = float("-inf")
        self._lock = asyncio.Lock()
        self._listing: bytes | None = None
        #: the records newest first, kept until the index changes
        self._sorted: list[PackageRecord] | None = None

    # -- index maintenance -------------------------------------------------------------

    async def refresh(self) -> None:
        """Bring the index in line with Storage (one refresh at a time)."""
        await self._sync()

    async def _sync(self, prefix: str = "") -> None:
        """Bring the index in line with Storage for the IDs starting with prefix: one
        listing of ``records/<prefix>``, then only the changed records are read."""
        async with self._lock:
            started = time.monotonic()
            seen: dict[str, str] = {}
            async for info in self.storage.list(RECORDS + prefix):
                package_id = info.key[len(RECORDS) :].removesuffix(".json")
                if is_package_id(package_id):
                    seen[package_id] = info.version
            stale = [pid for pid, version in seen.items() if self._versions.get(pid) != version]
            gone = [pid for pid in self._matching(prefix) if pid not in seen]
            semaphore = asyncio.Semaphore(self._concurrency)

            async def load(package_id: str) -> None:
                async with semaphore:
                    loaded = await self._read(package_id)
                if loaded is not None:
                    self._remember(*loaded, seen[package_id])

            await asyncio.gather(*(load(pid) for pid in stale))
            for package_id in gone:
                self._forget(package_id)
            if not prefix:
                self._refreshed_at = time.monotonic()
            if stale or gone:
                log.debug(
                    "catalog refreshed",
                    prefix=prefix or None,
                    loaded=len(stale),
                    removed=len(gone),
                    total=len(self._records),
                    seconds=round(time.monotonic() - started, 3),
                )

    async def run_refresher(self) -> None:
        """Refresh every ttl seconds, forever (a background task of the app)."""
        while True:
            try:
                await self.refresh()
            except Exception:  # a storage hiccup must not kill the refresher
                log.exception("catalog refresh failed")
            await asyncio.sleep(self.ttl)

    def _remember(self, record: PackageRecord, document: bytes, version: str) -> None:
        self._records[record.id] = record
        self._documents[record.id] = document
        self._versions[record.id] = version
        self._listing = self._sorted = None

    def _forget(self, package_id: str) -> None:
        self._records.pop(package_id, None)
        self._documents.pop(package_id, None)
        self._versions.pop(package_id, None)
        self._listing = self._sorted = None

    async def _read(self, package_id: str) -> tuple[PackageRecord, bytes] | None:
        try:
            data = await self.storage.read_bytes(record_key(package_id))
        except NotFound:
            return None
        try:
            return decode_record(data), data
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("unreadable package record skipped", package_id=package_id, error=str(exc))
            return None

    # -- queries -----------------------------------------------------------------------

    async def get(self, package_id: str) -> PackageRecord:
        """The record of a full ID, read from Storage (authoritative)."""
        loaded = await self._read(package_id)
        if loaded is None:
            self._forget(package_id)
            raise PackageNotFound(package_id)
        return loaded[0]

    async def resolve(self, ref: str) -> PackageRecord:
        """A full ID or a unique prefix of at least MIN_PREFIX_LENGTH hex characters."""
        ref = check_prefix(ref.lower())
        if is_package_id(ref):
            return await self.get(ref)
        matches = self._matching(ref)
        if len(matches) != 1:
            # Only the records under this prefix: a lookup that misses (or a random
            # prefix sent on purpose) costs one short listing, not a listing of the store.
            await self._sync(ref)
            matches = self._matching(ref)
        if not matches:
            raise PackageNotFound(ref)
        if len(matches) > 1:
            raise AmbiguousPrefix(ref, matches)
        return await self.get(matches[0])

    def _matching(self, prefix: str) -> list[str]:
        return [pid for pid in self._records if pid.startswith(prefix)]

    async def newest_first(self) -> list[PackageRecord]:
        if self._refreshed_at == float("-inf"):
            await self.refresh()
        if self._sorted is None:
            self._sorted = sorted(
                self._records.values(), key=lambda r: (r.created, r.id), reverse=True
            )
        return self._sorted

    async def page(
        self, *, name: str = "", offset: int = 0, limit: int = 100
    ) -> tuple[int, list[PackageRecord]]:
        """A page of the packages whose name contains `name` (any case), newest first: how
        many match, and those from `offset` on, at most `limit` of them."""
        records = await self.newest_first()
        if name:
            needle = name.lower()
            records = [r for r in records if needle in r.name.lower()]
        return len(records), records[offset : offset + limit]

    async def listing_json(self) -> bytes:
        """The rendered `GET /v1/packages/` body, cached until the index changes."""
        if self._listing is None or self._refreshed_at == float("-inf"):
            # The stored documents joined as they are: no re-encoding of every record.
            records = await self.newest_first()
            self._listing = b"[" + b",".join(self._documents[r.id] for r in records) + b"]"
        return self._listing

    # -- changes -----------------------------------------------------------------------

    async def put(self, record: PackageRecord) -> None:
        document = encode_record(record)
        info = await self.storage.write_bytes(record_key(record.id), document)
        self._remember(record, document, info.version)

    async def delete(self, package_id: str) -> None:
        """Record first, so no reader finds a record whose blob is already gone."""
        try:
            await self.storage.delete(record_key(package_id))
        except NotFound:
            raise PackageNotFound(package_id) from None
        finally:
            self._forget(package_id)
        for key in (package_key(package_id), log_key(package_id)):
            with contextlib.suppress(NotFound):
                await self.storage.delete(key)


__all__ = [
    "MIN_PREFIX_LENGTH",
    "AmbiguousPrefix",
    "Catalog",
    "PackageNotFound",
    "log_key",
    "package_key",
    "record_key",
]
