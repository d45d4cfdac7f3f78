"""The storage contract against the local filesystem backend, plus what is local-only."""

from __future__ import annotations

import os

import pytest

from cog.storage import StorageConfigError, load_storage
from cog.storage.local import TMP_PREFIX, LocalStorage
from tests.storage_contract import StorageContract


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
