"""A third-party storage plugin (contrib/cog-sqlite-storage), installed with pip as an
operator would, passes the same contract suite: a plugin needs no change in cog."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from cog.storage import available_schemes, load_storage
from tests.storage_contract import StorageContract

PLUGIN = Path(__file__).resolve().parent.parent / "contrib" / "cog-sqlite-storage"


@pytest.fixture(scope="session")
def plugin_installed() -> None:
    # Installed afresh each session (not editable), so what is tested is this checkout's.
    # --no-deps: its one dependency, cog, is this checkout, installed already.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall",
         str(PLUGIN)],
        check=True,
    )  # fmt: skip
    importlib.invalidate_caches()
    assert "sqlite" in available_schemes()


class TestSQLitePlugin(StorageContract):
    @pytest.fixture
    async def storage(self, plugin_installed, tmp_path):
        store = load_storage(f"sqlite://{tmp_path / 'cog.db'}")
        await store.open()
        yield store
        await store.close()

    async def leftovers(self, storage):
        rows = await storage.backend._run(
            "SELECT count(*) FROM chunks WHERE blob_id NOT IN (SELECT blob_id FROM blobs)"
        )
        return ["orphan chunks"] * rows[0][0]


def test_the_plugin_is_found_by_its_scheme(plugin_installed):
    store = load_storage("sqlite:///tmp/x.db")
    assert type(store.backend).__module__ == "cog_sqlite_storage"
