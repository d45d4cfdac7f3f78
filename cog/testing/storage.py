"""The Storage contract, written once; every backend's test module subclasses it::

    from cog.storage import load_storage
    from cog.testing.storage import StorageContract

    class TestMyStorage(StorageContract):
        @pytest.fixture
        async def storage(self, tmp_path):
            store = load_storage("my://...")  # wrapped in CheckedStorage, as the server does
            await store.open()
            yield store
            await store.close()

Optionally override ``leftovers`` (what a failed write may have left: temp files,
multipart uploads) and ``max_write_memory``. The ``tmp_path`` fixture (pytest's) gives the
local files that ``write_file``/``link_file`` take in. The tests are async: run them with
pytest-asyncio in auto mode (``asyncio_mode = auto``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tracemalloc
from pathlib import Path

import pytest

from cog.storage import InvalidKey, NotFound, Storage

MiB = 1024 * 1024


class Boom(Exception):
    """The caller's own stream failing mid-write."""


async def stream(data: bytes, chunk: int = 256 * 1024):
    for i in range(0, len(data), chunk):
        yield data[i : i + chunk]
        await asyncio.sleep(0)


async def failing(data: bytes, fail_after: int):
    sent = 0
    async for chunk in stream(data):
        if sent >= fail_after:
            raise Boom("the client went away")
        sent += len(chunk)
        yield chunk


async def read_all(storage: Storage, key: str) -> bytes:
    async with storage.open_reader(key) as blob:
        return b"".join([chunk async for chunk in blob.chunks()])


async def keys(storage: Storage, prefix: str = "") -> list[str]:
    return [info.key async for info in storage.list(prefix)]


class StorageContract:
    #: peak Python memory a write of `big` may use (streams, never whole blobs)
    max_write_memory = 16 * MiB
    big = 48 * MiB

    # The fixture `storage` (an opened store) comes from the subclass or the test module.

    async def leftovers(self, storage: Storage) -> list[str]:
        """What a failed write left behind that a reader cannot see (backend-specific)."""
        return []

    @pytest.mark.parametrize("size", [0, 1, 1000, 5 * MiB, 5 * MiB + 1, 12 * MiB + 7])
    async def test_round_trip(self, storage, size):
        data = os.urandom(size)
        info = await storage.write(f"blobs/{size}.bin", stream(data))
        assert info.key == f"blobs/{size}.bin"
        assert info.size == size
        assert await read_all(storage, f"blobs/{size}.bin") == data
        stat = await storage.stat(f"blobs/{size}.bin")
        assert (stat.size, stat.version) == (size, info.version)
        assert await storage.exists(f"blobs/{size}.bin")

    @pytest.mark.parametrize("size", [0, 5 * MiB + 3])
    async def test_write_file_stores_a_local_files_bytes(self, storage, tmp_path, size):
        """Linked or copied, the blob is the file's bytes, and stays so when the caller
        removes its file afterwards."""
        data = os.urandom(size)
        source = tmp_path / "upload.zip"
        source.write_bytes(data)
        info = await storage.write_file("files/pkg.zip", source)
        assert (info.key, info.size) == ("files/pkg.zip", size)
        assert source.read_bytes() == data  # the file stays the caller's
        source.unlink()
        assert await read_all(storage, "files/pkg.zip") == data
        assert (await storage.stat("files/pkg.zip")).version == info.version

    async def test_link_file_stores_the_file_whole_or_not_at_all(self, storage, tmp_path):
        """A backend that cannot link says so (None) and stores nothing; one that can
        stores the file's bytes, replacing what was there, with a new version."""
        old = await storage.write_bytes("files/blob", b"old bytes")
        data = os.urandom(3 * MiB)
        source = tmp_path / "linked.bin"
        source.write_bytes(data)
        info = await storage.link_file("files/blob", source)
        if info is None:
            assert await storage.read_bytes("files/blob") == b"old bytes"
        else:
            assert info.size == len(data) and info.version != old.version
            assert await read_all(storage, "files/blob") == data
        assert await self.leftovers(storage) == []

    async def test_write_file_of_a_missing_file_stores_nothing(self, storage, tmp_path):
        with pytest.raises(FileNotFoundError):
            await storage.write_file("files/missing.zip", tmp_path / "no-such-file")
        assert not await storage.exists("files/missing.zip")
        assert await self.leftovers(storage) == []

    async def test_concurrent_write_files_end_with_one_whole_blob(self, storage, tmp_path):
        a, b = os.urandom(6 * MiB), os.urandom(6 * MiB)
        (tmp_path / "a").write_bytes(a)
        (tmp_path / "b").write_bytes(b)
        await asyncio.gather(
            storage.write_file("w/file", tmp_path / "a"),
            storage.write_file("w/file", tmp_path / "b"),
        )
        assert await read_all(storage, "w/file") in (a, b)
        assert await self.leftovers(storage) == []

    async def test_bytes_helpers(self, storage):
        await storage.write_bytes("records/a.json", b'{"a": 1}')
        assert await storage.read_bytes("records/a.json") == b'{"a": 1}'

    async def test_reader_reports_size_before_streaming(self, storage):
        await storage.write_bytes("x/y", b"12345")
        async with storage.open_reader("x/y") as blob:
            assert blob.info.size == 5
            assert b"".join([c async for c in blob.chunks()]) == b"12345"

    async def test_overwrite_replaces_and_changes_version(self, storage):
        """A rewrite with other bytes changes the version at once, even of the same size
        and within the same second: caches reload by it."""
        first = await storage.write_bytes("k", b"one")
        second = await storage.write_bytes("k", b"two")
        third = await storage.write_bytes("k", b"three, longer")
        assert len({first.version, second.version, third.version}) == 3
        assert (await storage.stat("k")).version == third.version
        assert await storage.read_bytes("k") == b"three, longer"

    @pytest.mark.parametrize(
        "error",
        [
            ConnectionResetError("the client hung up mid-download"),
            OSError(28, "No space left on device"),
            Boom("the caller's own bug"),
        ],
        ids=type,
    )
    async def test_caller_errors_inside_a_reader_pass_unchanged(self, storage, error):
        """What the caller raises in its with-block or between two items is its own,
        not relabelled a storage error (only the backend's own steps are)."""
        await storage.write("e/blob", stream(os.urandom(3 * MiB)))
        with pytest.raises(type(error)) as caught:
            async with storage.open_reader("e/blob") as blob:
                async for _ in blob.chunks():
                    raise error
        assert caught.value is error
        with pytest.raises(type(error)) as caught:
            async with storage.open_reader("e/blob"):
                raise error
        assert caught.value is error
        with pytest.raises(type(error)) as caught:
            async for _ in storage.list("e/"):
                raise error
        assert caught.value is error
        assert len(await read_all(storage, "e/blob")) == 3 * MiB  # and the store still works

    async def test_not_found_is_raised_on_entry(self, storage):
        with pytest.raises(NotFound):
            async with storage.open_reader("missing/blob"):
                pytest.fail("entered a reader for a missing blob")
        with pytest.raises(NotFound):
            await storage.stat("missing/blob")
        with pytest.raises(NotFound):
            await storage.delete("missing/blob")
        assert not await storage.exists("missing/blob")

    async def test_delete(self, storage):
        await storage.write_bytes("d/one", b"1")
        await storage.write_bytes("d/two", b"2")
        await storage.delete("d/one")
        assert await keys(storage, "d/") == ["d/two"]
        with pytest.raises(NotFound):
            await storage.read_bytes("d/one")

    async def test_list_by_prefix(self, storage):
        for key in ("p/a", "p/b/c", "p/b/d", "pq/e", "q/f"):
            await storage.write_bytes(key, key.encode())
        assert sorted(await keys(storage, "p/")) == ["p/a", "p/b/c", "p/b/d"]
        assert sorted(await keys(storage, "p")) == ["p/a", "p/b/c", "p/b/d", "pq/e"]
        assert sorted(await keys(storage, "p/b/")) == ["p/b/c", "p/b/d"]
        assert sorted(await keys(storage, "p/b/c")) == ["p/b/c"]
        assert await keys(storage, "nothing/") == []
        assert len(await keys(storage)) == 5
        infos = {i.key: i for i in [i async for i in storage.list("p/b/")]}
        assert infos["p/b/c"].size == 5

    async def test_list_many(self, storage):
        await asyncio.gather(*(storage.write_bytes(f"many/{i:04}", b"x") for i in range(300)))
        assert sorted(await keys(storage, "many/")) == [f"many/{i:04}" for i in range(300)]

    @pytest.mark.parametrize(
        "key", ["", "/abs", "a/../b", "a//b", "a/./b", ".hidden", "a/.tmp-x", "sp ace", "a\\b"]
    )
    async def test_invalid_keys_are_refused(self, storage, key):
        with pytest.raises(InvalidKey):
            await storage.write_bytes(key, b"x")
        with pytest.raises(InvalidKey):
            await storage.stat(key)
        with pytest.raises(InvalidKey):
            await storage.link_file(key, Path(__file__))  # refused before a file is touched

    @pytest.mark.parametrize("size", [3 * MiB, 12 * MiB])
    async def test_failed_write_leaves_nothing(self, storage, size):
        with pytest.raises(Boom):
            await storage.write("f/blob", failing(os.urandom(size), fail_after=size - MiB))
        assert not await storage.exists("f/blob")
        assert await keys(storage, "f/") == []
        assert await self.leftovers(storage) == []

    async def test_failed_overwrite_keeps_the_old_blob(self, storage):
        await storage.write_bytes("o/blob", b"old")
        with pytest.raises(Boom):
            await storage.write("o/blob", failing(os.urandom(12 * MiB), fail_after=11 * MiB))
        assert await storage.read_bytes("o/blob") == b"old"
        assert await self.leftovers(storage) == []

    async def test_cancelled_write_leaves_nothing(self, storage):
        took_first = asyncio.Event()

        async def slow():
            yield os.urandom(6 * MiB)
            took_first.set()  # the backend is back for more: the first chunk is in
            await asyncio.sleep(3600)
            yield b"never"

        task = asyncio.create_task(storage.write("c/blob", slow()))
        await took_first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not await storage.exists("c/blob")
        assert await self.leftovers(storage) == []

    async def test_concurrent_writers_end_with_one_whole_blob(self, storage):
        a, b = os.urandom(6 * MiB), os.urandom(6 * MiB)
        await asyncio.gather(storage.write("w/blob", stream(a)), storage.write("w/blob", stream(b)))
        assert await read_all(storage, "w/blob") in (a, b)

    async def test_streams_in_bounded_memory(self, storage):
        digest = hashlib.sha256()

        async def generated():
            block = os.urandom(MiB)
            for i in range(self.big // MiB):
                chunk = bytes([i % 256]) + block[1:]
                digest.update(chunk)
                yield chunk

        tracemalloc.start()
        try:
            await storage.write("m/big", generated())
            _, write_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            check = hashlib.sha256()
            async with storage.open_reader("m/big") as blob:
                async for chunk in blob.chunks():
                    check.update(chunk)
            _, read_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert check.hexdigest() == digest.hexdigest()
        assert write_peak < self.max_write_memory, f"write peaked at {write_peak / MiB:.1f} MiB"
        assert read_peak < 8 * MiB, f"read peaked at {read_peak / MiB:.1f} MiB"
