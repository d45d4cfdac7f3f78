"""The ingest service's paths that depend on timing: a package uploaded again while it
builds, here or on another server; a build whose server died; builds waiting for a slot;
changes refused while a build runs; builders that break the contract.

The builders here are small Builder subclasses that the test holds at a step until it
releases them: the timing these paths depend on cannot be had on cue from a real build
(the real builders are tested against a real engine in test_docker_builder.py,
test_buildkit_builder.py and the shipped contract). Storage is real (local files), and
two servers share it as two machines would.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import pytest

from cog.builders import Builder, BuildError, BuildLog, BuiltImage
from cog.events import NDJSON
from cog.server.app import ServerSettings, make_app
from cog.server.keys import INGEST
from cog.server.settings import IngestOptions
from tests.registry_helpers import form, make_model_dir, nothing_spooled, package_bytes

DIGEST = "sha256:" + "0" * 64


class GatedBuilder(Builder):
    """Says one line, then waits at its gate; released, pushes nothing and reports the
    image it was asked for."""

    name = "gated"

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        self.builds: list[str] = []

    @classmethod
    def from_settings(cls, settings):
        return cls()

    async def build(self, request):
        self.builds.append(request.package_id)
        yield BuildLog("build", "Step 1/1 : waiting at the gate")
        self.started.set()
        await self.gate.wait()
        yield BuildLog("build", "through the gate")
        yield BuiltImage(request.image, DIGEST)


@pytest.fixture
def settings(tmp_path) -> ServerSettings:
    return ServerSettings(
        storage_url=f"file://{tmp_path / 'store'}",
        builder=None,  # each test passes its builder
        tmp_dir=tmp_path / "spool",
        ingest=IngestOptions(check_images=False),
        cache_ttl=0.2,
    )


async def server(aiohttp_client, settings, builder, **ingest):
    if ingest:
        settings = ServerSettings(
            storage_url=settings.storage_url,
            tmp_dir=settings.tmp_dir,
            ingest=IngestOptions(check_images=False, **ingest),
            cache_ttl=settings.cache_ttl,
        )
    client = await aiohttp_client(make_app(settings, builder=builder))
    client.app[INGEST].poll_interval = 0.02
    return client


async def events_of(client, data: bytes) -> list[dict]:
    response = await client.post("/v1/packages/upload", data=form(data), headers={"Accept": NDJSON})
    assert response.status == 200
    return [json.loads(line) for line in (await response.read()).splitlines()]


async def read_until(response, words: str) -> list[dict]:
    """A build stream's events up to the status saying words (the rest stays unread)."""
    events = []
    async for line in response.content:
        events.append(json.loads(line))
        if words in events[-1].get("message", ""):
            return events
    raise AssertionError(f"the stream ended without saying {words!r}: {events}")


def statuses(events: list[dict]) -> list[str]:
    return [e["message"] for e in events if e["type"] == "status"]


@pytest.fixture
def hello(tmp_path):
    return package_bytes(make_model_dir(tmp_path / "hello"))


async def test_uploads_of_a_package_while_it_builds_follow_that_one_build(
    aiohttp_client, settings, hello
):
    data, package_id = hello
    builder = GatedBuilder()
    client = await server(aiohttp_client, settings, builder)
    first = asyncio.ensure_future(events_of(client, data))
    await builder.started.wait()
    others = [asyncio.ensure_future(events_of(client, data)) for _ in range(5)]
    # Each of the others is following the build before it is let through.
    for _ in range(200):
        if len(client.app[INGEST].live(package_id)._followers) == 5:
            break
        await asyncio.sleep(0.01)
    builder.gate.set()
    results = await asyncio.gather(first, *others)
    assert builder.builds == [package_id]  # one build for six uploads
    for events in results:
        assert events[-1]["type"] == "package", events
        assert events[-1]["package"]["Status"] == "ready"
        assert any(e.get("line") == "through the gate" for e in events)
    for events in results[1:]:
        assert "This package is being built already; following that build" in statuses(events)


async def test_an_upload_waits_for_another_servers_build(aiohttp_client, settings, hello):
    data, _ = hello
    builder_one, builder_two = GatedBuilder(), GatedBuilder()
    one = await server(aiohttp_client, settings, builder_one)
    two = await server(aiohttp_client, settings, builder_two)
    building = asyncio.ensure_future(events_of(one, data))
    await builder_one.started.wait()
    response = await two.post("/v1/packages/upload", data=form(data), headers={"Accept": NDJSON})
    events = await read_until(response, "Another server is building")
    builder_one.gate.set()
    await building
    events += [json.loads(line) async for line in response.content]
    assert builder_two.builds == []  # server two built nothing
    assert "Another server is building this package; waiting for it" in statuses(events)
    assert events[-1]["type"] == "package" and events[-1]["package"]["Status"] == "ready"


async def test_a_build_whose_server_died_is_taken_over(aiohttp_client, settings, hello):
    """Server one dies mid-build (its record stays "building", never refreshed again);
    once the record is older than stale_after, server two builds the package itself."""
    data, package_id = hello
    dying = GatedBuilder()
    one = await server(aiohttp_client, settings, dying)
    abandoned = asyncio.ensure_future(events_of(one, data))
    await dying.started.wait()
    record = await (await one.get(f"/v1/packages/{package_id}")).json()
    assert record["Status"] == "building"

    builder = GatedBuilder()
    builder.gate.set()
    two = await server(aiohttp_client, settings, builder, stale_after=120)
    service = two.app[INGEST]
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=121)
    service.clock = lambda: later.replace(microsecond=0)
    events = await events_of(two, data)
    assert builder.builds == [package_id]
    assert events[-1]["type"] == "package" and events[-1]["package"]["Status"] == "ready"
    assert events[-1]["package"]["Created"] == record["Created"]  # the package's, kept
    abandoned.cancel()
    await asyncio.gather(abandoned, return_exceptions=True)


async def test_a_fresh_build_of_another_server_is_not_taken_over(aiohttp_client, settings, hello):
    data, package_id = hello
    slow = GatedBuilder()
    one = await server(aiohttp_client, settings, slow)
    building = asyncio.ensure_future(events_of(one, data))
    await slow.started.wait()
    builder = GatedBuilder()
    two = await server(aiohttp_client, settings, builder, stale_after=120)
    service = two.app[INGEST]
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=119)
    service.clock = lambda: later.replace(microsecond=0)
    assert service.busy(await service.catalog.get(package_id))
    slow.gate.set()
    await building
    assert builder.builds == []


async def test_the_heartbeat_keeps_a_long_build_fresh(aiohttp_client, settings, hello):
    data, package_id = hello
    ticks = iter(range(10_000))
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)

    builder = GatedBuilder()
    client = await server(aiohttp_client, settings, builder, heartbeat=0)
    client.app[INGEST].clock = lambda: start + dt.timedelta(minutes=next(ticks))
    building = asyncio.ensure_future(events_of(client, data))
    await builder.started.wait()
    held = await client.app[INGEST].catalog.get(package_id)
    assert held.status.value == "building"
    assert held.updated > held.created  # refreshed after the build's first lines
    builder.gate.set()
    events = await building
    assert events[-1]["package"]["Status"] == "ready"


async def test_builds_wait_for_a_free_slot(aiohttp_client, settings, tmp_path):
    first, first_id = package_bytes(make_model_dir(tmp_path / "a", name="test/a"))
    second, second_id = package_bytes(make_model_dir(tmp_path / "b", name="test/b"))
    builder = GatedBuilder()
    client = await server(aiohttp_client, settings, builder, max_concurrent_builds=1)
    one = asyncio.ensure_future(events_of(client, first))
    await builder.started.wait()
    response = await client.post(
        "/v1/packages/upload", data=form(second), headers={"Accept": NDJSON}
    )
    said = await read_until(response, "Waiting for a free build slot")
    assert said[-1]["message"] == "Waiting for a free build slot"
    assert builder.builds == [first_id]  # the second waits for the slot
    builder.gate.set()
    assert (await one)[-1]["package"]["Status"] == "ready"
    rest = [json.loads(line) async for line in response.content]
    assert rest[-1]["package"]["Status"] == "ready"
    assert builder.builds == [first_id, second_id]


async def test_delete_and_rebuild_while_building_are_409(aiohttp_client, settings, hello):
    data, package_id = hello
    builder = GatedBuilder()
    client = await server(aiohttp_client, settings, builder)
    building = asyncio.ensure_future(events_of(client, data))
    await builder.started.wait()
    deleted = await client.delete(f"/v1/packages/{package_id[:10]}")
    assert deleted.status == 409
    assert "being built" in (await deleted.json())["error"]
    rebuilt = await client.post(f"/v1/packages/{package_id[:10]}/build")
    assert rebuilt.status == 409
    assert "being built already" in (await rebuilt.json())["error"]
    builder.gate.set()
    assert (await building)[-1]["package"]["Status"] == "ready"
    assert builder.builds == [package_id]
    assert (await client.delete(f"/v1/packages/{package_id}")).status == 200


class NoImage(Builder):
    """Ends without the image it was asked for: a broken builder plugin."""

    name = "no-image"

    @classmethod
    def from_settings(cls, settings):
        return cls()

    async def build(self, request):
        yield BuildLog("build", "all done, honestly")


async def test_a_builder_that_yields_no_image_fails_the_build(aiohttp_client, settings, hello):
    data, package_id = hello
    client = await server(aiohttp_client, settings, NoImage())
    events = await events_of(client, data)
    assert events[-1]["type"] == "error"
    assert events[-1]["status"] == 422
    assert "no-image ended without reporting an image" in events[-1]["message"]
    document = await (await client.get(f"/v1/packages/{package_id}")).json()
    assert document["Status"] == "failed" and document["Artifacts"] == []


async def test_the_build_log_says_when_the_default_python_is_used(
    aiohttp_client, settings, tmp_path
):
    """One line, in the build's log and again when it is rebuilt; none when the package
    names its Python."""
    builder = GatedBuilder()
    builder.gate.set()
    client = await server(aiohttp_client, settings, builder)
    note = "python_version not set: using 3.8, Cog's default"
    unset = make_model_dir(tmp_path / "unset")
    (unset / "cog.yaml").write_text("name: test/unset\nmodel: infer.py:Model\n")
    data, package_id = package_bytes(unset)
    events = await events_of(client, data)
    assert events[-1]["type"] == "package", events[-1]
    assert events[-1]["package"]["Config"]["Environment"]["PythonVersion"] == "3.8"
    said = statuses(events)
    assert said.count(note) == 1
    building = next(i for i, s in enumerate(said) if s.startswith("Building CPU image "))
    assert said.index(note) < building
    log = await client.get(f"/v1/packages/{package_id}/log")
    assert statuses([json.loads(line) for line in (await log.read()).splitlines()]).count(note) == 1
    response = await client.post(f"/v1/packages/{package_id}/build", headers={"Accept": NDJSON})
    rebuilt = [json.loads(line) for line in (await response.read()).splitlines()]
    assert statuses(rebuilt).count(note) == 1

    named = package_bytes(make_model_dir(tmp_path / "named"))[0]  # python_version: '3.11'
    assert note not in statuses(await events_of(client, named))


# -- a cold build on request (no_cache) ---------------------------------------------------


class RecordingBuilder(Builder):
    """Builds at once, remembering each request: what the server asked the builder for."""

    name = "recording"

    def __init__(self) -> None:
        self.requests = []

    @classmethod
    def from_settings(cls, settings):
        return cls()

    async def build(self, request):
        self.requests.append(request)
        yield BuildLog("build", "Step 1/1 : built")
        yield BuiltImage(request.image, DIGEST)


async def test_no_cache_reaches_the_builder_on_upload_and_rebuild(aiohttp_client, settings, hello):
    """?no_cache=1 asks the builder for a cold build, and builds a package that is built
    already again (without it, an upload of a built package builds nothing)."""
    data, package_id = hello
    builder = RecordingBuilder()
    client = await server(aiohttp_client, settings, builder)
    first = await events_of(client, data)
    assert first[-1]["type"] == "package"
    assert [r.no_cache for r in builder.requests] == [False]

    again = await events_of(client, data)
    assert any("already stored and built" in e.get("message", "") for e in again)
    assert len(builder.requests) == 1

    response = await client.post(
        "/v1/packages/upload?no_cache=1", data=form(data), headers={"Accept": NDJSON}
    )
    cold = [json.loads(line) for line in (await response.read()).splitlines()]
    assert cold[-1]["type"] == "package" and cold[-1]["package"]["Status"] == "ready"
    assert any(e.get("message", "").endswith("without the build cache") for e in cold), cold
    assert [r.no_cache for r in builder.requests] == [False, True]
    assert cold[-1]["package"]["Created"] == first[-1]["package"]["Created"]

    for query, expected in (("?no_cache=1", True), ("", False), ("?no_cache=0", False)):
        response = await client.post(
            f"/v1/packages/{package_id[:12]}/build{query}", headers={"Accept": NDJSON}
        )
        events = [json.loads(line) for line in (await response.read()).splitlines()]
        assert events[-1]["type"] == "package", events
        assert builder.requests[-1].no_cache is expected


async def test_a_no_cache_value_that_is_no_yes_or_no_is_400_before_the_body(
    aiohttp_client, settings, hello, tmp_path
):
    data, package_id = hello
    builder = RecordingBuilder()
    client = await server(aiohttp_client, settings, builder)
    response = await client.post("/v1/packages/upload?no_cache=maybe", data=form(data))
    assert response.status == 400
    assert "no_cache='maybe'" in (await response.json())["error"]
    assert builder.requests == []
    await nothing_spooled(tmp_path / "spool")
    assert (await client.post(f"/v1/packages/{package_id}/build?no_cache=x")).status == 400


async def test_the_cli_client_asks_for_no_cache(aiohttp_client, settings, tmp_path):
    from cog.cli.client import RegistryClient
    from cog.package import plan_package

    builder = RecordingBuilder()
    client = await server(aiohttp_client, settings, builder)
    root = make_model_dir(tmp_path / "cold")
    async with RegistryClient(str(client.make_url(""))) as registry:
        events = [e async for e in registry.upload_package(plan_package(root), no_cache=True)]
        package_id = events[-1]["package"]["ID"]
        assert [r.no_cache for r in builder.requests] == [True]
        events = [e async for e in registry.rebuild(package_id, no_cache=True)]
        assert events[-1]["type"] == "package"
    assert [r.no_cache for r in builder.requests] == [True, True]


# -- a package's architectures, built at once ---------------------------------------------


class PairedBuilder(Builder):
    """Each target's build says it started, then waits until the other target's has
    started too (when `paired`): two builds run one after the other never get there, and
    the test fails on its timeout instead. `fail` names a target whose build then fails;
    every build's end (finished or stopped) is recorded."""

    name = "paired"

    def __init__(self, *, paired: bool = True, fail: str | None = None) -> None:
        self.paired = paired
        self.fail = fail
        self.started = {"cpu": asyncio.Event(), "gpu": asyncio.Event()}
        self.ended: dict[str, str] = {}

    @classmethod
    def from_settings(cls, settings):
        return cls()

    async def build(self, request):
        target = request.target
        other = "gpu" if target == "cpu" else "cpu"
        try:
            yield BuildLog("build", f"{target}: first step")
            self.started[target].set()
            if self.paired:
                await asyncio.wait_for(self.started[other].wait(), 30)
            if target == self.fail:
                raise BuildError(f"{target} step failed", step="RUN false", output=("boom",))
            if self.fail:
                await asyncio.Event().wait()  # the other one fails meanwhile
            yield BuildLog("build", f"{target}: last step")
            yield BuiltImage(request.image, DIGEST)
            self.ended[target] = "finished"
        finally:
            self.ended.setdefault(target, "stopped")


@pytest.fixture
def two_targets(tmp_path):
    root = make_model_dir(tmp_path / "two")
    with open(root / "cog.yaml", "a") as out:
        out.write("  architectures: [cpu, gpu]\n")
    return package_bytes(root)


def build_lines(events: list[dict]) -> list[str]:
    return [e["line"] for e in events if e["type"] == "log" and e.get("stage") == "build"]


async def test_a_packages_cpu_and_gpu_images_build_at_once(aiohttp_client, settings, two_targets):
    """Both builds are under way before either ends: each waits for the other's start."""
    builder = PairedBuilder()
    client = await server(aiohttp_client, settings, builder)
    events = await events_of(client, two_targets[0])
    assert events[-1]["type"] == "package", events
    assert {a["Target"] for a in events[-1]["package"]["Artifacts"]} == {"docker-cpu", "docker-gpu"}
    lines = build_lines(events)
    first_ends = min(lines.index("cpu: last step"), lines.index("gpu: last step"))
    assert max(lines.index("cpu: first step"), lines.index("gpu: first step")) < first_ends
    assert builder.ended == {"cpu": "finished", "gpu": "finished"}


async def test_targets_in_turn_builds_one_after_the_other(aiohttp_client, settings, two_targets):
    builder = PairedBuilder(paired=False)
    client = await server(aiohttp_client, settings, builder, concurrent_targets=False)
    events = await events_of(client, two_targets[0])
    assert events[-1]["type"] == "package", events
    lines = build_lines(events)
    assert lines == ["cpu: first step", "cpu: last step", "gpu: first step", "gpu: last step"]


@pytest.mark.parametrize("failing", ["cpu", "gpu"])
async def test_a_target_that_fails_stops_the_other(aiohttp_client, settings, two_targets, failing):
    """The other build is stopped (not left running), the package fails with the failing
    one's error, and its lines are that target's."""
    builder = PairedBuilder(fail=failing)
    client = await server(aiohttp_client, settings, builder)
    events = await events_of(client, two_targets[0])
    assert events[-1]["type"] == "error", events
    assert f"{failing} step failed" in events[-1]["message"]
    other = "gpu" if failing == "cpu" else "cpu"
    assert builder.ended == {failing: "stopped", other: "stopped"}
    errors = [e for e in events if e["type"] == "log" and e.get("stage") == "error"]
    assert errors and {e.get("target") for e in errors} == {failing}, errors
