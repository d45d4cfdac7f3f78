"""Deletes racing builds, across two servers sharing one store: never a record without
its zip, and never a delete that leaves a build's container running.

The rule: a record is only ever written with its zip stored. A server that writes a
record (a build's heartbeat or outcome) looks for the zip after writing, and takes the
record back if the zip is gone; a delete removes the record, the zip, then the record
again (in case a build wrote it meanwhile). Whichever order the two servers' steps come
in, either both are gone or both are there.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import uuid

import aiodocker
import pytest

from cog.engine import Engine
from cog.engine.containers import LABEL, OWNER_LABEL, PACKAGE_LABEL, pid_namespace
from cog.server.app import ServerSettings
from cog.server.catalog import package_key, record_key
from cog.server.keys import INGEST, STORAGE
from cog.server.records import Status, encode_record, record_from_json
from cog.server.settings import IngestOptions
from tests.registry_helpers import make_model_dir, package_bytes
from tests.services.docker import CPU_BASE
from tests.test_ingest import GatedBuilder, events_of, server


@pytest.fixture
def settings(tmp_path) -> ServerSettings:
    return ServerSettings(
        storage_url=f"file://{tmp_path / 'store'}",
        builder=None,  # each test passes its builder
        tmp_dir=tmp_path / "spool",
        ingest=IngestOptions(check_images=False),
        cache_ttl=0.2,
    )


@pytest.fixture
def hello(tmp_path):
    return package_bytes(make_model_dir(tmp_path / "hello"))


def open_gate() -> GatedBuilder:
    builder = GatedBuilder()
    builder.gate.set()
    return builder


def later(seconds: float):
    moment = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds)
    return lambda: moment.replace(microsecond=0)


async def test_a_delete_through_another_server_during_a_build_leaves_no_record(
    aiohttp_client, settings, hello
):
    """Server two takes server one's build for dead (its clock is ahead) and deletes the
    package while it builds: the build's outcome does not bring the record back."""
    data, package_id = hello
    builder = GatedBuilder()
    one = await server(aiohttp_client, settings, builder, stale_after=120)
    building = asyncio.ensure_future(events_of(one, data))
    await builder.started.wait()
    two = await server(aiohttp_client, settings, GatedBuilder(), stale_after=120)
    two.app[INGEST].clock = later(121)
    assert (await two.delete(f"/v1/packages/{package_id}")).status == 200

    builder.gate.set()
    events = await building
    assert events[-1]["type"] == "error", events[-1]
    assert events[-1]["status"] == 410
    assert events[-1]["message"] == (
        f"package {package_id[:12]} was deleted while it was being built; upload it again "
        "to keep it"
    )
    store = one.app[STORAGE]
    assert not await store.exists(record_key(package_id))
    assert not await store.exists(package_key(package_id))
    for client in (one, two):
        assert (await client.get(f"/v1/packages/{package_id}")).status == 404


async def test_a_record_written_between_a_deletes_steps_is_deleted_too(
    aiohttp_client, settings, hello
):
    """The other order: the build's record lands after the delete took the record away but
    before it took the zip; the delete's last step takes the record again. The other
    server's write is made on cue, from inside the store's delete: two real servers
    cannot be made to interleave there on purpose."""
    data, package_id = hello
    client = await server(aiohttp_client, settings, open_gate())
    client_store = client.app[STORAGE]
    assert (await events_of(client, data))[-1]["type"] == "package"
    record = await client.app[INGEST].catalog.get(package_id)

    real_delete = client_store.delete
    written = []

    async def delete_then_a_build_writes(key: str) -> None:
        await real_delete(key)
        if key == record_key(package_id) and not written:  # a build's outcome lands now
            written.append(await client_store.write_bytes(key, encode_record(record)))

    client_store.delete = delete_then_a_build_writes
    try:
        assert (await client.delete(f"/v1/packages/{package_id}")).status == 200
    finally:
        client_store.delete = real_delete
    assert written  # the write came between the delete's steps
    assert not await client_store.exists(record_key(package_id))
    assert not await client_store.exists(package_key(package_id))


async def stale_building_record(client, data: bytes, package_id: str) -> None:
    """The record a server killed mid-build leaves: "building", never refreshed."""
    assert (await events_of(client, data))[-1]["type"] == "package"
    store = client.app[STORAGE]
    document = json.loads(await store.read_bytes(record_key(package_id)))
    record = record_from_json(document)
    old = record.updated - dt.timedelta(hours=1)
    stale = record.evolve(updated=old, status=Status.BUILDING)
    await store.write_bytes(record_key(package_id), encode_record(stale))


@pytest.mark.integration
async def test_deleting_a_dead_servers_build_stops_its_check_container(
    aiohttp_client, settings, hello, docker_engine, base_images, no_leaked_containers
):
    """The killed server's check container still runs: a delete removes it first, and
    refuses (409) while a live server's container of that package runs."""
    data, package_id = hello
    client = await server(aiohttp_client, settings, open_gate(), stale_after=120)
    await stale_building_record(client, data, package_id)
    here = f"{os.uname().nodename}/{pid_namespace()}"
    gone = await asyncio.create_subprocess_exec("true")
    await gone.wait()
    async with Engine(docker_engine) as engine:

        async def check_container(owner_pid: int):
            container = await engine.docker.containers.create(
                {
                    "Image": CPU_BASE,
                    "Cmd": ["sleep", "300"],
                    "Labels": {
                        LABEL: "check",
                        PACKAGE_LABEL: package_id,
                        OWNER_LABEL: f"{here}/{owner_pid}/{uuid.uuid4().hex[:12]}",
                    },
                },
                name=f"cog-test-check-{uuid.uuid4().hex[:8]}",
            )
            await container.start()
            return container

        alive = await check_container(os.getpid())  # a server still checking it
        dead = await check_container(gone.pid)
        try:
            refused = await client.delete(f"/v1/packages/{package_id}")
            assert refused.status == 409
            assert (await refused.json())["error"] == (
                "a check of this package still runs (a container of another cog server on "
                "this Docker Engine); delete it when that ends"
            )
            await alive.delete(force=True)
            assert (await client.delete(f"/v1/packages/{package_id}")).status == 200
            left = await engine.docker.containers.list(
                all=True, filters=json.dumps({"label": [f"{PACKAGE_LABEL}={package_id}"]})
            )
            assert left == []
        finally:
            for container in (alive, dead):
                with contextlib.suppress(aiodocker.DockerError):  # removed already
                    await container.delete(force=True)


async def test_a_build_left_by_a_dead_server_ends_failed(aiohttp_client, settings, hello, tmp_path):
    """No record stays "building" for ever: once stale, a server marks it failed."""
    data, package_id = hello
    first = await server(aiohttp_client, settings, open_gate(), stale_after=120)
    await stale_building_record(first, data, package_id)
    # A fresh "building" record (a live build elsewhere) is left alone.
    second_data, second_id = package_bytes(make_model_dir(tmp_path / "b", name="test/b"))
    assert (await events_of(first, second_data))[-1]["type"] == "package"
    store = first.app[STORAGE]
    fresh = record_from_json(json.loads(await store.read_bytes(record_key(second_id))))
    await store.write_bytes(record_key(second_id), encode_record(fresh.evolve(
        updated=fresh.updated, status=Status.BUILDING
    )))  # fmt: skip

    await first.app[INGEST].catalog.refresh()  # it looks at the index, refreshed in turn
    assert await first.app[INGEST].fail_abandoned() == [package_id]
    document = await (await first.get(f"/v1/packages/{package_id}")).json()
    assert document["Status"] == "failed"
    assert document["Error"] == (
        "the server building this package stopped before the build ended; rebuild it or "
        "upload it again"
    )
    assert (await (await first.get(f"/v1/packages/{second_id}")).json())["Status"] == "building"
    # A server starting looks at once.
    await stale_building_record(first, data, package_id)
    later_server = await server(aiohttp_client, settings, open_gate(), stale_after=120)
    deadline = asyncio.get_running_loop().time() + 10
    while (await later_server.app[INGEST].catalog.get(package_id)).status is Status.BUILDING:
        assert asyncio.get_running_loop().time() < deadline, "still building"
        await asyncio.sleep(0.01)
