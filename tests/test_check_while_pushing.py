"""The check runs while the image is pushed (the Docker builder says when its image is on
the engine): the real engine pushes through a relay to the real registry that holds every
byte the engine sends until the test lets it go."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess

import pytest

from cog.builders import BuilderSettings
from cog.events import NDJSON
from cog.server.app import ServerSettings, make_app
from cog.server.settings import IngestOptions
from tests.registry_helpers import form, make_model_dir, package_bytes

pytestmark = [pytest.mark.integration]


class HeldRegistry:
    """A TCP relay in front of a registry: what the engine sends waits until release()."""

    def __init__(self, upstream: str):
        self.upstream_host, port = upstream.rsplit(":", 1)
        self.upstream_port = int(port)
        self.released = asyncio.Event()
        #: set when the engine has sent something that is being held
        self.holding = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._relays: set[asyncio.Task] = set()
        self.gone = False
        #: the test client of the cog server pushing through this relay
        self.client = None
        #: host:port of the relay, once it listens
        self.address = ""

    def release(self) -> None:
        self.released.set()

    def cut(self) -> None:
        """Every connection closed, and each new one at once: the registry is gone."""
        self.gone = True
        for relay in self._relays:
            relay.cancel()

    async def __aenter__(self) -> HeldRegistry:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        """Every connection is cut: a push still held fails in the engine (which goes on
        pushing after the client that asked for it has gone)."""
        assert self._server is not None
        self._server.close()
        for relay in self._relays:
            relay.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        try:
            await self._pipes(reader, writer)
        except asyncio.CancelledError:
            pass  # cut(), or the relay's end: asyncio would log a cancelled callback task
        finally:
            writer.close()
            self._relays.discard(task)

    async def _pipes(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.gone:
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            return

        async def pipe(source, sink, held: bool) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await source.read(65536):
                    if held and not self.released.is_set():
                        self.holding.set()
                        await self.released.wait()
                    sink.write(data)
                    await sink.drain()
            with contextlib.suppress(ConnectionError, OSError):
                sink.close()

        to_registry = asyncio.ensure_future(pipe(reader, up_writer, True))
        to_engine = asyncio.ensure_future(pipe(up_reader, writer, False))
        try:
            # The engine hanging up ends the relay, held bytes or not.
            await asyncio.wait([to_registry, to_engine], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (to_registry, to_engine):
                task.cancel()
            await asyncio.gather(to_registry, to_engine, return_exceptions=True)
            up_writer.close()


def settings(tmp_path, registry: str) -> ServerSettings:
    return ServerSettings(
        storage_url=f"file://{tmp_path / 'store'}",
        builder="docker",
        builder_settings=BuilderSettings(registry=registry),
        ingest=IngestOptions(check_images=True),
        tmp_dir=tmp_path / "spool",
    )


@contextlib.asynccontextmanager
async def server_behind(registry: str, aiohttp_client, tmp_path):
    """A cog server (Docker builder, checks on) pushing through a HeldRegistry."""
    async with HeldRegistry(registry) as held:
        held.client = await aiohttp_client(make_app(settings(tmp_path, held.address)))
        yield held


async def build(held: HeldRegistry, root, on_event=None, within: float = 240) -> list[dict]:
    """Upload the model directory root; the build's events, each shown to on_event as it
    comes (an async callable). The image is removed from the engine after."""
    data, package_id = package_bytes(root)
    image = f"{held.address}/cog-test/pushcheck:{package_id[:12]}"
    events: list[dict] = []

    async def read() -> None:
        response = await held.client.post(
            "/v1/packages/upload", data=form(data), headers={"Accept": NDJSON}
        )
        async for line in response.content:
            events.append(json.loads(line))
            if on_event is not None:
                await on_event(events)

    try:
        await asyncio.wait_for(read(), within)
    finally:
        subprocess.run(["docker", "rmi", "-f", image], capture_output=True)
    return events


def messages(events: list[dict]) -> list[str]:
    return [e.get("message", "") for e in events]


@pytest.mark.slow
async def test_the_model_is_checked_while_its_image_is_pushed(
    aiohttp_client, registry, base_images, tmp_path, no_leaked_containers
):
    async def on_event(events: list[dict]) -> None:
        if "checked that the model boots" in events[-1].get("line", ""):
            # The whole check ran while the engine's push was held.
            assert held.holding.is_set(), "the push had not begun"
            assert not any(m.startswith("Pushed ") for m in messages(events)), events
            held.release()

    async with server_behind(registry, aiohttp_client, tmp_path) as held:
        root = make_model_dir(tmp_path / "model", name="cog-test/pushcheck")
        # Without the check during the push, the push waits for release() forever.
        events = await build(held, root, on_event)
    assert held.released.is_set(), "the check never finished while the push was held"
    final = events[-1]
    assert final["type"] == "package", final
    assert final["package"]["Status"] == "ready"
    [artifact] = final["package"]["Artifacts"]
    image = artifact["URI"]
    assert image.startswith(f"{held.address}/cog-test/pushcheck:")
    assert artifact["Digest"].startswith("sha256:")
    said = messages(events)
    testing = said.index(f"Testing the model in {image}")
    pushed = next(i for i, m in enumerate(said) if m.startswith(f"Pushed {image}"))
    assert testing < pushed


@pytest.mark.slow
async def test_a_failed_check_ends_the_build_without_waiting_for_the_push(
    aiohttp_client, registry, base_images, tmp_path, no_leaked_containers
):
    async with server_behind(registry, aiohttp_client, tmp_path) as held:
        root = make_model_dir(tmp_path / "model", name="cog-test/pushcheck")
        with open(root / "cog.yaml", "a") as config:
            config.write("examples:\n  - input: {text: world}\n    output: goodbye world\n")
        events = await build(held, root)
        # The check failed while the push was held: the build ended then, without
        # waiting for the push (which the engine goes on with; the relay cuts it).
        assert held.holding.is_set(), "the push had begun, and was held"
        assert not held.released.is_set()
    final = events[-1]
    assert final["type"] == "error", final
    assert final["message"].startswith("example 1: "), final
    assert "(step: test: example 1)" in final["message"]
    assert final["package"]["Status"] == "failed"
    assert not any(m.startswith("Pushed ") for m in messages(events))
    assert final["package"]["Artifacts"] in (None, [])


@pytest.mark.slow
async def test_a_failed_push_stops_the_check(
    aiohttp_client, registry, base_images, tmp_path, no_leaked_containers
):
    """The registry goes away while the model is being checked: the build fails as the
    server's problem (503, the push named), and the check's container is removed."""

    async def on_event(events: list[dict]) -> None:
        if events[-1].get("message", "").startswith("Testing the model"):
            await asyncio.wait_for(held.holding.wait(), 60)
            held.cut()  # while the model sets up (for 30 s)

    async with server_behind(registry, aiohttp_client, tmp_path) as held:
        root = make_model_dir(tmp_path / "model", name="cog-test/pushcheck")
        slow_setup = 'self.greeting = "hello"\n        import time; time.sleep(30)'
        model = root / "infer.py"
        model.write_text(model.read_text().replace('self.greeting = "hello"', slow_setup))
        events = await build(held, root, on_event, within=120)
    final = events[-1]
    assert final["type"] == "error" and final["status"] == 503, final
    assert "(step: push)" in final["message"], final
    assert final["package"]["Status"] == "failed"
    assert not any("Model ready" in e.get("line", "") for e in events)
