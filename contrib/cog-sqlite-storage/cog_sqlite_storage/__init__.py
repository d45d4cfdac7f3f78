"""``sqlite:///path/to/cog.db``: a cog storage backend in one SQLite file (see README.md)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from cog.storage import (
    BlobInfo,
    BlobReader,
    NotFound,
    Storage,
    StorageConfigError,
    StorageError,
    StorageUnavailable,
)

CHUNK = 1024 * 1024
SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    key TEXT PRIMARY KEY,
    blob_id INTEGER NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    blob_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (blob_id, seq)
);
CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY AUTOINCREMENT);
"""


@contextlib.contextmanager
def _errors(what: str):
    try:
        yield
    except sqlite3.OperationalError as exc:
        # locked/busy, disk I/O: may pass
        raise StorageUnavailable(f"sqlite {what}: {exc}") from None
    except sqlite3.Error as exc:
        raise StorageError(f"sqlite {what}: {exc}") from None


class _Reader(BlobReader):
    def __init__(self, info: BlobInfo, db: SQLiteStorage, blob_id: int):
        self.info = info
        self._db = db
        self._blob_id = blob_id

    async def chunks(self) -> AsyncIterator[bytes]:
        seq = 0
        while True:
            rows = await self._db._run(
                "SELECT data FROM chunks WHERE blob_id = ? AND seq = ?", (self._blob_id, seq)
            )
            if not rows:
                return
            yield rows[0][0]
            seq += 1


class SQLiteStorage(Storage):
    scheme = "sqlite"

    def __init__(self, path: Path):
        self.path = path

    def __repr__(self) -> str:
        return f"SQLiteStorage('sqlite://{self.path}')"

    @classmethod
    def from_url(cls, url: str) -> SQLiteStorage:
        parts = urlsplit(url)
        if parts.scheme != "sqlite" or parts.netloc or not parts.path.startswith("/"):
            raise StorageConfigError(f"expected sqlite:///absolute/path.db, got {url!r}")
        return cls(Path(unquote(parts.path)))

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        return connection

    async def open(self) -> None:
        def create() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.closing(self._connect()) as connection:
                connection.executescript(SCHEMA)
                # Chunks of writes a crash interrupted belong to no blob.
                connection.execute(
                    "DELETE FROM chunks WHERE blob_id NOT IN (SELECT blob_id FROM blobs)"
                )

        try:
            await asyncio.to_thread(create)
        except (OSError, sqlite3.Error) as exc:
            raise StorageConfigError(f"cannot use {self.path}: {exc}") from None

    async def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        def run() -> list[tuple]:
            with contextlib.closing(self._connect()) as connection:
                return connection.execute(sql, args).fetchall()

        with _errors(sql.split()[0].lower()):
            return await asyncio.to_thread(run)

    async def write(self, key: str, chunks: AsyncIterable[bytes]) -> BlobInfo:
        # Chunks are staged under a fresh blob id no key points to yet (short statements,
        # so writers do not hold SQLite's one write lock while the upload streams in);
        # the key is switched to them in one short transaction at the end.
        rows = await self._run("INSERT INTO counter DEFAULT VALUES RETURNING id")
        blob_id = rows[0][0]
        size = seq = 0
        buffer = bytearray()
        try:
            async for chunk in chunks:
                buffer += chunk
                size += len(chunk)
                while len(buffer) >= CHUNK:
                    await self._run(
                        "INSERT INTO chunks VALUES (?, ?, ?)",
                        (blob_id, seq, bytes(memoryview(buffer)[:CHUNK])),
                    )
                    del buffer[:CHUNK]
                    seq += 1
            if buffer:
                await self._run(
                    "INSERT INTO chunks VALUES (?, ?, ?)", (blob_id, seq, bytes(buffer))
                )

            def publish() -> None:
                with contextlib.closing(self._connect()) as connection:
                    connection.execute("BEGIN IMMEDIATE")
                    old = connection.execute(
                        "SELECT blob_id FROM blobs WHERE key = ?", (key,)
                    ).fetchone()
                    connection.execute(
                        "INSERT OR REPLACE INTO blobs VALUES (?, ?, ?)", (key, blob_id, size)
                    )
                    if old:
                        connection.execute("DELETE FROM chunks WHERE blob_id = ?", old)
                    connection.execute("COMMIT")

            with _errors(f"writing {key}"):
                await asyncio.to_thread(publish)
        except BaseException:
            # Shielded: a cancelled write still removes what it staged.
            with contextlib.suppress(StorageError):
                await asyncio.shield(self._run("DELETE FROM chunks WHERE blob_id = ?", (blob_id,)))
            raise
        return BlobInfo(key, size, str(blob_id))

    @contextlib.asynccontextmanager
    async def open_reader(self, key: str) -> AsyncIterator[BlobReader]:
        rows = await self._run("SELECT blob_id, size FROM blobs WHERE key = ?", (key,))
        if not rows:
            raise NotFound(key)
        blob_id, size = rows[0]
        yield _Reader(BlobInfo(key, size, str(blob_id)), self, blob_id)

    async def stat(self, key: str) -> BlobInfo:
        rows = await self._run("SELECT blob_id, size FROM blobs WHERE key = ?", (key,))
        if not rows:
            raise NotFound(key)
        return BlobInfo(key, rows[0][1], str(rows[0][0]))

    async def delete(self, key: str) -> None:
        def delete() -> bool:
            with contextlib.closing(self._connect()) as connection:
                connection.execute("BEGIN IMMEDIATE")
                row = connection.execute(
                    "SELECT blob_id FROM blobs WHERE key = ?", (key,)
                ).fetchone()
                if row:
                    connection.execute("DELETE FROM blobs WHERE key = ?", (key,))
                    connection.execute("DELETE FROM chunks WHERE blob_id = ?", row)
                connection.execute("COMMIT")
                return row is not None

        with _errors(f"deleting {key}"):
            found = await asyncio.to_thread(delete)
        if not found:
            raise NotFound(key)

    async def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        rows = await self._run(
            "SELECT key, size, blob_id FROM blobs WHERE substr(key, 1, ?) = ? ORDER BY key",
            (len(prefix), prefix),
        )
        for key, size, blob_id in rows:
            yield BlobInfo(key, size, str(blob_id))
