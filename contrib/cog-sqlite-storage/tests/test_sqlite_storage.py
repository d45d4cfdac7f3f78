"""cog-sqlite-storage against cog's storage contract (shipped in cog as cog.testing),
plus what only a SQLite backend must get right.

Run from this directory, with cog and this plugin installed: ``python -m pytest``.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3

import pytest

from cog.storage import load_storage
from cog.testing.storage import MiB, StorageContract, read_all, stream


@pytest.fixture
async def sqlite_storage(tmp_path):
    store = load_storage(f"sqlite://{tmp_path / 'cog.db'}")
    await store.open()
    yield store
    await store.close()


async def orphan_chunks(storage) -> int:
    rows = await storage.backend._run(
        "SELECT count(*) FROM chunks WHERE blob_id NOT IN (SELECT blob_id FROM blobs)"
    )
    return rows[0][0]


class TestSQLitePlugin(StorageContract):
    @pytest.fixture
    async def storage(self, sqlite_storage):
        return sqlite_storage

    async def leftovers(self, storage):
        return ["orphan chunks"] * await orphan_chunks(storage)


async def test_a_write_cancelled_while_it_publishes_leaves_a_whole_blob_or_none(
    sqlite_storage,
):
    """Another connection holds SQLite's write lock (as another writer would) while the
    write publishes; the write is cancelled then, and the lock released after."""
    backend = sqlite_storage.backend
    path = backend.path
    data = os.urandom(3 * MiB)  # whole chunks: after the last one comes the publish
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    loop = asyncio.get_running_loop()
    locked, publishing = asyncio.Event(), asyncio.Event()
    connect = backend._connect

    def traced_connect():
        # The publish's BEGIN IMMEDIATE starts (then waits for the lock) in its thread.
        connection = connect()

        def trace(sql: str) -> None:
            if sql == "BEGIN IMMEDIATE" and locked.is_set():
                loop.call_soon_threadsafe(publishing.set)

        connection.set_trace_callback(trace)
        return connection

    async def chunks():
        async for chunk in stream(data, chunk=MiB):
            yield chunk
        other.execute("BEGIN IMMEDIATE")  # every chunk is staged: the publish must wait
        locked.set()

    backend._connect = traced_connect
    try:
        writing = asyncio.create_task(sqlite_storage.write("k", chunks()))
        await publishing.wait()
        writing.cancel()
        # One turn of the loop: the write takes its cancellation and waits for the
        # publish's outcome (shielded).
        await asyncio.sleep(0)
        assert not writing.done()
        other.execute("COMMIT")  # the publish goes on, after its write was cancelled
        with pytest.raises(asyncio.CancelledError):
            await writing
    finally:
        backend._connect = connect
        other.close()
    # It had committed: a whole blob under the key, and nothing else.
    assert await read_all(sqlite_storage, "k") == data
    assert await orphan_chunks(sqlite_storage) == 0


async def test_a_read_sees_one_snapshot_while_the_blob_is_overwritten(sqlite_storage):
    old, new = os.urandom(4 * MiB), os.urandom(2 * MiB)
    await sqlite_storage.write("k", stream(old))
    read = bytearray()
    async with sqlite_storage.open_reader("k") as blob:
        async for chunk in blob.chunks():
            if not read:
                await sqlite_storage.write("k", stream(new))  # deletes the old chunks
            read += chunk
    assert bytes(read) == old
    assert await read_all(sqlite_storage, "k") == new
    assert await orphan_chunks(sqlite_storage) == 0


async def test_a_read_cancelled_midway_ends_its_read_transaction(sqlite_storage):
    """The client of a download goes away: the reader's task is cancelled mid-read. Its
    connection is closed all the same, so its snapshot no longer pins SQLite's log (a
    checkpoint of the whole log can complete)."""
    await sqlite_storage.write("k", stream(os.urandom(4 * MiB)))
    first = asyncio.Event()

    async def read():
        async with sqlite_storage.open_reader("k") as blob:
            async for _ in blob.chunks():
                first.set()
                await asyncio.sleep(3600)  # a slow client

    reading = asyncio.create_task(read())
    await first.wait()
    await sqlite_storage.write("other", stream(os.urandom(MiB)))  # log after the snapshot
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    other = sqlite3.connect(sqlite_storage.backend.path, isolation_level=None)
    try:
        busy, _, _ = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        other.close()
    assert busy == 0


def test_the_plugin_is_found_by_its_scheme():
    store = load_storage("sqlite:///tmp/x.db")
    assert type(store.backend).__module__ == "cog_sqlite_storage"
