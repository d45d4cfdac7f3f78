"""``sqlite:///path/to/cog.db``: a cog storage backend in one SQLite file (see README.md)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sqlite3
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
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
    """Reads through the connection its open_reader holds, inside one read transaction:
    a snapshot, so a blob overwritten or deleted meanwhile is still read whole. Every call
    on the connection runs in the reader's one worker thread (``run``), in order."""

    def __init__(self, info: BlobInfo, run: Callable[..., Awaitable[Any]], blob_id: int):
        self.info = info
        self._run = run
        self._blob_id = blob_id

    async def chunks(self) -> AsyncIterator[bytes]:
        with _errors("reading"):
            cursor = await self._run(
                "execute",
                "SELECT data FROM chunks WHERE blob_id = ? ORDER BY seq",
                (self._blob_id,),
            )
        while True:
            with _errors("reading"):
                row = await self._run(cursor.fetchone)
            if row is None:
                return
            yield row[0]


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
        # Used from worker threads one call at a time (a reader's calls all go to its own
        # worker thread), hence check_same_thread=False. timeout: how long to wait for
        # another writer's lock.
        connection = sqlite3.connect(
            self.path, timeout=30, isolation_level=None, check_same_thread=False
        )
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
        except BaseException:
            # Shielded: a cancelled write still removes what it staged.
            with contextlib.suppress(StorageError):
                await asyncio.shield(self._run("DELETE FROM chunks WHERE blob_id = ?", (blob_id,)))
            raise
        await self._publish(key, blob_id, size)
        return BlobInfo(key, size, str(blob_id))

    async def _publish(self, key: str, blob_id: int, size: int) -> None:
        """Point key at the staged chunks, in one transaction in a worker thread.

        From here the thread alone decides what happens to the staged chunks: it commits
        (they are the key's blob now) or removes them itself. A write cancelled meanwhile
        waits for that outcome, so it never removes the chunks of a key it published.
        """

        def publish() -> None:
            with contextlib.closing(self._connect()) as connection:
                try:
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
                except BaseException:
                    if connection.in_transaction:
                        connection.execute("ROLLBACK")
                    # If this fails too (the database stays locked), open() removes
                    # the orphans at the next start.
                    with contextlib.suppress(sqlite3.Error):
                        connection.execute("DELETE FROM chunks WHERE blob_id = ?", (blob_id,))
                    raise

        publishing = asyncio.ensure_future(asyncio.to_thread(publish))
        try:
            with _errors(f"writing {key}"):
                await asyncio.shield(publishing)
        except asyncio.CancelledError:
            await asyncio.wait([publishing])
            if not publishing.cancelled():
                publishing.exception()  # retrieved: the cancellation is what we report
            raise

    @contextlib.asynccontextmanager
    async def open_reader(self, key: str) -> AsyncIterator[BlobReader]:
        # One worker thread owns the connection: a read the caller's cancellation left
        # running finishes before the close that follows it, and the close runs even when
        # the reader's task is cancelled (shielded), ending the read transaction.
        worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cog-sqlite")
        loop = asyncio.get_running_loop()
        opened: list[sqlite3.Connection] = []

        def call(what: str | Callable[..., Any], *args: Any) -> Any:
            if isinstance(what, str):  # a method of the connection
                what = getattr(opened[0], what)
            return what(*args)

        def start() -> tuple | None:
            opened.append(self._connect())
            # One read transaction for the whole read: the snapshot it reads from
            # starts with this SELECT and holds the blob's chunks until the end.
            opened[0].execute("BEGIN")
            return (
                opened[0]
                .execute("SELECT blob_id, size FROM blobs WHERE key = ?", (key,))
                .fetchone()
            )

        def close() -> None:
            for connection in opened:
                connection.close()

        def run(what: str | Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
            return loop.run_in_executor(worker, call, what, *args)

        try:
            with _errors(f"reading {key}"):
                row = await run(start)
            if row is None:
                raise NotFound(key)
            blob_id, size = row
            yield _Reader(BlobInfo(key, size, str(blob_id)), run, blob_id)
        finally:
            closing = run(close)
            worker.shutdown(wait=False)
            await asyncio.shield(closing)

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
