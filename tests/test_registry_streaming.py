"""A model directory zipped as it is sent, against the real server app on real local
storage: what arrives is the package write_package makes, announced by its length,
checked as it streams in (not read again), committed by a link, in bounded memory; a
file that changes mid-upload leaves nothing anywhere."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tracemalloc
from pathlib import Path

import pytest
from aiohttp import web

from cog.cli.client import RegistryClient
from cog.cli.output import CLIError
from cog.package import PackageArchive, plan_package, write_package
from cog.server.app import ServerSettings, make_app
from cog.server.keys import STORAGE
from cog.storage.local import LocalStorage
from tests.registry_helpers import make_model_dir, nothing_spooled, spooled, stored_keys
from tests.test_registry import until

MiB = 1024 * 1024


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def settings(tmp_path: Path, spool: Path) -> ServerSettings:
    return ServerSettings(
        storage_url=f"file://{tmp_path / 'store'}",
        builder=None,
        tmp_dir=spool,
        max_upload_bytes=256 * MiB,
    )


@pytest.fixture
def seen() -> list[web.Request]:
    return []


class RememberingLinks(LocalStorage):
    """Real local storage that remembers what it took in by a link."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.linked: list[str] = []

    async def link_file(self, key, path):
        info = await super().link_file(key, path)
        if info is not None:
            self.linked.append(key)
        return info


@pytest.fixture
def store(tmp_path: Path) -> RememberingLinks:
    return RememberingLinks(tmp_path / "store")


@pytest.fixture
async def client(aiohttp_client, settings, seen, store):
    app = make_app(settings, storage=store)

    @web.middleware
    async def remember(request, handler):  # what arrived, as the server saw it
        seen.append(request)
        return await handler(request)

    app.middlewares.append(remember)
    return await aiohttp_client(app)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    root = make_model_dir(tmp_path / "model")
    (root / "weights").mkdir()
    (root / "weights" / "a.bin").write_bytes(os.urandom(5 * MiB + 1))
    (root / "weights" / "b.bin").write_bytes(os.urandom(3 * MiB))
    return root


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    names: list[str] = []
    original = PackageArchive.open_member

    def counted(self, name):
        names.append(name)
        return original(self, name)

    monkeypatch.setattr(PackageArchive, "open_member", counted)
    return names


async def build(client, root: Path) -> list[dict]:
    async with RegistryClient(str(client.make_url(""))) as registry:
        plan = await asyncio.to_thread(plan_package, root)
        return [event async for event in registry.upload_package(plan)]


def package_id_of(root: Path) -> tuple[str, int]:
    out = io.BytesIO()
    package_id = write_package(root, out)
    return package_id, len(out.getvalue())


async def test_the_package_arrives_whole_with_its_length_announced(
    client, model, seen, reads, spool, store, tmp_path
):
    package_id, size = package_id_of(model)
    events = await build(client, model)
    assert events[-1]["type"] == "package", events
    assert events[-1]["package"]["ID"] == package_id
    assert events[-1]["package"]["Size"] == size
    upload = seen[0]
    assert upload.content_length is not None and upload.content_length > size
    assert "Transfer-Encoding" not in upload.headers  # a length, not chunks
    # Checked as it streamed in: only what inspection reads, the config and the model's
    # source, was read from the spool again; not the weights.
    assert sorted(set(reads)) == ["cog.yaml", "infer.py"]
    # Committed by a link (the spool and the store share a file system): the stored zip
    # is the spooled file itself, now under its one remaining name.
    assert store.linked == [f"packages/{package_id}.zip"]
    stored = tmp_path / "store" / "packages" / f"{package_id}.zip"
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == package_id
    assert stored.stat().st_nlink == 1
    await nothing_spooled(spool)


async def test_a_file_that_changes_mid_upload_leaves_nothing(client, model, spool):
    """The length was announced: a file that grew after planning ends the upload with a
    readable error; the server, which saw the body stop short, keeps nothing."""
    async with RegistryClient(str(client.make_url(""))) as registry:
        plan = await asyncio.to_thread(plan_package, model)
        with open(model / "weights" / "b.bin", "ab") as f:  # sent after a.bin
            f.write(b"grown")
        with pytest.raises(CLIError, match=r"b\.bin changed while it was being packaged"):
            async for _ in registry.upload_package(plan):
                pass
    assert await stored_keys(client.app[STORAGE]) == []
    await until(lambda: spooled(spool) == [], "removed: the spooled upload")


async def test_two_uploads_of_the_same_package_at_once(client, model, spool):
    package_id, _ = package_id_of(model)
    one, two = await asyncio.gather(build(client, model), build(client, model))
    assert one[-1]["package"]["ID"] == two[-1]["package"]["ID"] == package_id
    assert await stored_keys(client.app[STORAGE]) == [
        f"packages/{package_id}.zip",
        f"records/{package_id}.json",
    ]
    await nothing_spooled(spool)


async def test_client_and_server_stream_in_bounded_memory(client, tmp_path):
    root = make_model_dir(tmp_path / "big")
    with open(root / "weights.bin", "wb") as f:
        for _ in range(48):
            f.write(os.urandom(MiB))
    tracemalloc.start()
    try:
        events = await build(client, root)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert events[-1]["type"] == "package"
    assert peak < 16 * MiB, f"client and server together peaked at {peak / MiB:.1f} MiB"
