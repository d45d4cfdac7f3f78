"""The storage contract against the local filesystem backend, plus what is local-only."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import pytest

from cog.storage import (
    BlobReader,
    CheckedStorage,
    StorageConfigError,
    StorageUnavailable,
    load_storage,
)
from cog.storage.local import TMP_PREFIX, LocalStorage
from cog.testing.storage import StorageContract


class TestLocalStorage(StorageContract):
    @pytest.fixture
    async def storage(self, tmp_path):
        store = load_storage(f"file://{tmp_path / 'store'}")
        await store.open()
        yield store
        await store.close()

    async def leftovers(self, storage):
        root = storage.backend.root
        return [
            name for _, _, names in os.walk(root) for name in names if name.startswith(TMP_PREFIX)
        ]


async def test_open_removes_what_a_crash_left(tmp_path):
    root = tmp_path / "store"
    (root / "packages").mkdir(parents=True)
    (root / "packages" / f"{TMP_PREFIX}abc").write_bytes(b"half a package")
    store = load_storage(f"file://{root}")
    await store.open()
    assert [i.key async for i in store.list("")] == []
    assert not (root / "packages" / f"{TMP_PREFIX}abc").exists()


@pytest.mark.parametrize("url", ["file://relative/path", "file://host/x", "file:///x?opt=1"])
def test_bad_urls(url):
    with pytest.raises(StorageConfigError):
        LocalStorage.from_url(url)


def test_unknown_scheme_lists_the_installed_ones():
    with pytest.raises(StorageConfigError) as caught:
        load_storage("nosuch://x")
    assert "file" in str(caught.value) and "s3" in str(caught.value)
    with pytest.raises(StorageConfigError, match="no scheme"):
        load_storage("/just/a/path")


class _FailingReader(BlobReader):
    def __init__(self, blob: BlobReader):
        self.info = blob.info
        self._blob = blob

    async def chunks(self):
        async for chunk in self._blob.chunks():
            yield chunk
            raise OSError(errno.EIO, "Input/output error")


class _FailingDisk(LocalStorage):
    """Local storage on a disk whose reads fail after the first chunk (EIO). A fake: a
    real disk in a test cannot be made to fail that way."""

    @contextlib.asynccontextmanager
    async def open_reader(self, key):
        async with super().open_reader(key) as blob:
            yield _FailingReader(blob)


async def test_backend_read_errors_are_translated_but_the_callers_are_not(tmp_path):
    store = CheckedStorage(_FailingDisk(tmp_path))
    await store.open()
    await store.write_bytes("k", os.urandom(3 * 1024 * 1024))
    with pytest.raises(StorageUnavailable, match="Input/output error"):
        await store.read_bytes("k")
    caller_error = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError) as caught:
        async with store.open_reader("k") as blob:
            async for _ in blob.chunks():
                raise caller_error
    assert caught.value is caller_error


async def test_a_file_on_the_stores_file_system_is_linked_not_copied(tmp_path):
    """The spool of an upload becomes the stored package by a link and a rename: the blob
    is the very same inode, and no temp file is left."""
    store = load_storage(f"file://{tmp_path / 'store'}")
    await store.open()
    source = tmp_path / "upload-1.zip"
    source.write_bytes(os.urandom(2 * 1024 * 1024))
    info = await store.write_file("packages/p.zip", source)
    blob = tmp_path / "store" / "packages" / "p.zip"
    assert blob.stat().st_ino == source.stat().st_ino
    assert info.size == source.stat().st_size
    assert [n for n in os.listdir(blob.parent) if n.startswith(TMP_PREFIX)] == []


async def test_a_file_on_another_file_system_is_copied(tmp_path):
    shm = Path("/dev/shm")
    store = load_storage(f"file://{tmp_path / 'store'}")
    await store.open()
    source = shm / f"cog-test-{os.getpid()}-upload.zip"
    try:
        source.write_bytes(os.urandom(1024 * 1024))
        assert source.stat().st_dev != tmp_path.stat().st_dev  # two file systems
        assert await store.link_file("packages/p.zip", source) is None
        await store.write_file("packages/p.zip", source)
        blob = tmp_path / "store" / "packages" / "p.zip"
        assert blob.read_bytes() == source.read_bytes()
        assert blob.stat().st_ino != source.stat().st_ino
    finally:
        source.unlink(missing_ok=True)
