"""A third-party storage plugin (contrib/cog-sqlite-storage), installed with pip as an
operator would, passes the same contract suite: a plugin needs no change in cog."""

from __future__ import annotations

import asyncio
import importlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cog.storage import available_schemes, load_storage
from tests.storage_contract import MiB, StorageContract, read_all, stream

PLUGIN = Path(__file__).resolve().parent.parent / "contrib" / "cog-sqlite-storage"


@pytest.fixture(scope="session")
def plugin_installed() -> None:
    # Installed afresh each session (not editable), so what is tested is this checkout's.
    # --no-deps: its one dependency, cog, is this checkout, installed already. Built with
    # the venv's setuptools (--no-build-isolation), so no index is needed at all.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall",
         "--no-build-isolation", "--no-index", str(PLUGIN)],
        check=True,
    )  # fmt: skip
    importlib.invalidate_caches()
    assert "sqlite" in available_schemes()


@pytest.fixture
async def sqlite_storage(plugin_installed, tmp_path):
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
    path = sqlite_storage.backend.path
    data = os.urandom(3 * MiB)  # whole chunks: after the last one comes the publish
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    locked = asyncio.Event()

    async def chunks():
        async for chunk in stream(data, chunk=MiB):
            yield chunk
        other.execute("BEGIN IMMEDIATE")  # every chunk is staged: the publish must wait
        locked.set()

    try:
        writing = asyncio.create_task(sqlite_storage.write("k", chunks()))
        await locked.wait()
        await asyncio.sleep(0.3)  # the publish waits for the lock in its thread
        writing.cancel()
        await asyncio.sleep(0.3)
        other.execute("COMMIT")  # the publish goes on, after its write was cancelled
        with pytest.raises(asyncio.CancelledError):
            await writing
    finally:
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


def test_the_plugin_is_found_by_its_scheme(plugin_installed):
    store = load_storage("sqlite:///tmp/x.db")
    assert type(store.backend).__module__ == "cog_sqlite_storage"
