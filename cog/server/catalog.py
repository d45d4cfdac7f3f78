"""The catalog: package records kept in Storage, with an in-memory index over them.

Storage is the only source of truth (several servers may share one bucket). The index
keeps each package's summary (not its config: a listing stays small, and so does the
index, however large configs are) and makes listing and prefix lookups cheap; it is
refreshed in the background every ``ttl`` seconds, so a package written by another
server is listed here within ``ttl`` seconds; a lookup by ID or prefix that misses the
index syncs the records under that prefix at once. A refresh lists ``records/`` (or
``records/<prefix>``) and reloads only the records whose storage version changed.

Keys in Storage::

    packages/<id>.zip   the package, exactly the uploaded bytes
    records/<id>.json   its record (the package document)
    logs/<id>.log       the log of its last build
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterable

import structlog

from cog.package import MIN_PREFIX_LENGTH, check_prefix, is_package_id
from cog.server.records import (
    PackageRecord,
    PackageSummary,
    decode_record,
    encode_record,
    encode_summary,
    summarize,
    summary_from_json,
)
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


class PackageDeleted(Exception):
    """The package was deleted (through this server or another) while it was being built:
    its record is not written back (410)."""

    def __init__(self, package_id: str):
        super().__init__(
            f"package {package_id[:12]} was deleted while it was being built; upload it "
            "again to keep it"
        )


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
        self._records: dict[str, PackageSummary] = {}
        #: each package's summary as JSON: the listing joins these
        self._documents: dict[str, bytes] = {}
        self._versions: dict[str, str] = {}
        self._refreshed_at = float("-inf")
        self._lock = asyncio.Lock()
        self._listing: bytes | None = None
        #: the records newest first, kept until the index changes
        self._sorted: list[PackageSummary] | None = None

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
                    summary = await self._read_summary(package_id)
                if summary is not None:
                    self._remember(summary, seen[package_id])

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

    def _remember(self, summary: PackageSummary, version: str) -> None:
        self._records[summary.id] = summary
        self._documents[summary.id] = encode_summary(summary)
        self._versions[summary.id] = version
        self._listing = self._sorted = None

    def _forget(self, package_id: str) -> None:
        self._records.pop(package_id, None)
        self._documents.pop(package_id, None)
        self._versions.pop(package_id, None)
        self._listing = self._sorted = None

    async def _read(self, package_id: str) -> PackageRecord | None:
        try:
            data = await self.storage.read_bytes(record_key(package_id))
        except NotFound:
            return None
        try:
            return decode_record(data)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("unreadable package record skipped", package_id=package_id, error=str(exc))
            return None

    async def _read_summary(self, package_id: str) -> PackageSummary | None:
        try:
            data = await self.storage.read_bytes(record_key(package_id))
        except NotFound:
            return None
        try:
            return summary_from_json(json.loads(data))
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
        return loaded

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

    async def newest_first(self) -> list[PackageSummary]:
        if self._refreshed_at == float("-inf"):
            await self.refresh()
        if self._sorted is None:
            self._sorted = sorted(
                self._records.values(), key=lambda r: (r.created, r.id), reverse=True
            )
        return self._sorted

    async def page(
        self, *, name: str = "", offset: int = 0, limit: int = 100
    ) -> tuple[int, list[PackageSummary]]:
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
            # The summaries joined as they are: no re-encoding of every record.
            records = await self.newest_first()
            self._listing = b"[" + b",".join(self._documents[r.id] for r in records) + b"]"
        return self._listing

    # -- changes -----------------------------------------------------------------------

    async def put(self, record: PackageRecord) -> None:
        info = await self.storage.write_bytes(record_key(record.id), encode_record(record))
        self._remember(summarize(record), info.version)

    async def put_stored(self, record: PackageRecord) -> None:
        """Write the record of a package whose zip was stored: PackageDeleted (and no
        record) if the zip is gone, deleted meanwhile through any server.

        The rule that keeps a record from outliving its zip, with :meth:`delete`: the
        writer writes, then looks for the zip and takes the record back if it is gone; the
        deleter deletes the record, the zip, then the record again. In any order of the
        steps, either a package is there whole or it is gone."""
        await self.put(record)
        if not await self.storage.exists(package_key(record.id)):
            await self._delete_record(record.id)
            raise PackageDeleted(record.id)

    async def _delete_record(self, package_id: str) -> bool:
        try:
            await self.storage.delete(record_key(package_id))
            return True
        except NotFound:
            return False
        finally:
            self._forget(package_id)

    async def delete(self, package_id: str) -> None:
        """Record first, so no reader finds a record whose blob is already gone; then the
        zip and the log; then the record again, in case a build (here or on another
        server) wrote it meanwhile (see put_stored)."""
        if not await self._delete_record(package_id):
            raise PackageNotFound(package_id)
        for key in (package_key(package_id), log_key(package_id)):
            with contextlib.suppress(NotFound):
                await self.storage.delete(key)
        await self._delete_record(package_id)
        with contextlib.suppress(NotFound):  # a build's log stored meanwhile
            await self.storage.delete(log_key(package_id))


__all__ = [
    "MIN_PREFIX_LENGTH",
    "AmbiguousPrefix",
    "Catalog",
    "PackageDeleted",
    "PackageNotFound",
    "log_key",
    "package_key",
    "record_key",
]
