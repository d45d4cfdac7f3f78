"""The Builder contract, written once; every builder's test module subclasses it::

    from cog.builders import BuilderSettings
    from cog.testing.builder import BuilderContract

    class TestMyBuilder(BuilderContract):
        @pytest.fixture
        def registry(self):
            return "127.0.0.1:5000"         # where the builder may push test images

        @pytest.fixture
        async def builder(self, registry):
            builder = MyBuilder.from_settings(BuilderSettings(registry=registry))
            await builder.open()
            yield builder
            await builder.close()

Each test drives the builder through a real build of a tiny package (a stdlib model on
the base image for ``python_version``). Its one dependency is a wheel served by the test
itself, from a small HTTP server on an address the build's steps can reach: so the test
sees when a step runs, makes it fail, and holds it until it sees the live log or a
cancellation. That address is the Docker bridge's gateway by default; a builder whose
steps run elsewhere overrides ``step_host``. The tests are async (pytest-asyncio, auto
mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import json
import re
import secrets
import urllib.request
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest

from cog.builders import (
    BuildError,
    BuilderUnavailable,
    BuildEvent,
    BuildLog,
    BuildRequest,
    BuiltImage,
    ImageLoaded,
)
from cog.config import DirectoryFiles, check_config
from cog.package import short_id, write_package

#: How long a step may take to show up, or to stop once the build is cancelled
STEP_TIMEOUT = 300.0

MODEL = """\
import cog


class Model(cog.Model):
    @cog.input("text", type=str, default="world")
    def run(self, text):
        import gate

        return gate.greet(text)
"""


def gate_wheel() -> bytes:
    """A tiny pure-Python wheel, ``gate`` 1.0, made here: the package's one dependency."""
    files = {
        "gate/__init__.py": b"def greet(text):\n    return 'hello ' + text\n",
        "gate-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: gate\nVersion: 1.0\n",
        "gate-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: cog-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(f"{name},,\n" for name in files) + "gate-1.0.dist-info/RECORD,,\n"
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr("gate-1.0.dist-info/RECORD", record)
    return out.getvalue()


class Gate:
    """The HTTP server a build's pip step downloads its dependency from.

    ``mode`` decides what a request gets: ``serve`` the wheel; ``missing`` a 404; ``hold``
    nothing until :meth:`release` (or until the client goes away, which ``dropped``
    records: a cancelled build's step is killed and its connection closes).
    """

    def __init__(self, host: str):
        self.host = host
        self.mode = "serve"
        self.token = secrets.token_hex(8)  # a fresh URL per test: no build cache hits
        self.requested = asyncio.Event()
        #: requests for the wheel so far: one per run of the step that installs it
        self.requests = 0
        self.dropped = asyncio.Event()
        self._release = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._wheel = gate_wheel()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://{self.host}:{port}/{self.token}/gate-1.0-py3-none-any.whl"

    async def start(self) -> Gate:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        return self

    async def close(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def release(self) -> None:
        self._release.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            self.requested.set()
            if self.mode == "hold":
                waiting = asyncio.ensure_future(self._release.wait())
                closing = asyncio.ensure_future(reader.read(1))
                done, _ = await asyncio.wait(
                    {waiting, closing}, return_when=asyncio.FIRST_COMPLETED
                )
                for future in (waiting, closing):
                    future.cancel()
                if closing in done:
                    self.dropped.set()
                    return
            if self.mode == "missing":
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            else:
                head = (
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    f"Content-Length: {len(self._wheel)}\r\nConnection: close\r\n\r\n"
                )
                writer.write(head.encode() + self._wheel)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            self.dropped.set()
        finally:
            writer.close()


class Consumer:
    """A build's events, collected by a task of their own as they come."""

    def __init__(self, stream: AsyncIterator[BuildEvent]):
        self.events: list[BuildEvent] = []
        #: set once a log line has arrived
        self.logged = asyncio.Event()
        self.task = asyncio.ensure_future(self._consume(stream))

    async def _consume(self, stream: AsyncIterator[BuildEvent]) -> list[BuildEvent]:
        async with contextlib.aclosing(stream):
            async for event in stream:
                self.events.append(event)
                if isinstance(event, BuildLog):
                    self.logged.set()
        return self.events

    async def until(self, event: asyncio.Event) -> None:
        """Wait for event; the build's own error if it ends first."""
        waiting = asyncio.ensure_future(event.wait())
        done, _ = await asyncio.wait(
            {waiting, self.task}, timeout=STEP_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        if waiting not in done:
            waiting.cancel()
            if self.task.done():
                self.task.result()  # the build's error, if it failed
                pytest.fail("the build ended before its step asked for its dependency")
            pytest.fail(f"nothing happened for {STEP_TIMEOUT:g}s")

    async def result(self) -> list[BuildEvent]:
        return await asyncio.wait_for(self.task, STEP_TIMEOUT)


def registry_digest(registry: str, image: str) -> str:
    """The manifest digest a plain-HTTP registry holds for image (repository:tag)."""
    name = image.removeprefix(f"{registry}/")
    repository, _, tag = name.rpartition(":") if ":" in name else (name, "", "latest")
    request = urllib.request.Request(
        f"http://{registry}/v2/{repository}/manifests/{tag}",
        method="HEAD",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers["Docker-Content-Digest"]


def bridge_gateway() -> str:
    """The Docker bridge's gateway: this machine, as a container on the bridge sees it."""
    import subprocess

    out = subprocess.run(
        ["docker", "network", "inspect", "bridge", "--format", "{{json .IPAM.Config}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    config = json.loads(out)[0]
    if config.get("Gateway"):
        return config["Gateway"]
    # The default bridge may not list its gateway: it is the subnet's first address.
    return str(ipaddress.ip_network(config["Subnet"]).network_address + 1)


class BuilderContract:
    """What every builder does; see the module docstring for how to run it."""

    #: the package's Python: a base image for it must be where the builder looks
    python_version = "3.11"

    # The fixtures `builder` (an opened builder) and `registry` (host:port it pushes to)
    # come from the subclass or the test module: a placeholder here would hide theirs.

    @pytest.fixture
    def step_host(self) -> str:
        """An address of this machine that the build's RUN steps can reach."""
        return bridge_gateway()

    @pytest.fixture
    async def gate(self, step_host) -> AsyncIterator[Gate]:
        gate = await Gate(step_host).start()
        try:
            yield gate
        finally:
            await gate.close()

    def request(self, tmp_path: Path, registry: str, gate: Gate) -> BuildRequest:
        """A tiny package whose requirements file asks for the gate's wheel."""
        root = tmp_path / "model"
        root.mkdir()
        (root / "cog.yaml").write_text(
            "name: cog-contract/gate\nmodel: infer.py:Model\nenvironment:\n"
            f'  python_version: "{self.python_version}"\n'
            "  python_requirements: requirements.txt\n"
            "examples:\n  - input: {text: contract}\n    output: hello contract\n"
        )
        (root / "infer.py").write_text(MODEL)
        (root / "requirements.txt").write_text(f"gate @ {gate.url}\n")
        zip_path = tmp_path / "model.zip"
        with open(zip_path, "wb") as out:
            package_id = write_package(root, out)
        config = check_config((root / "cog.yaml").read_text(), DirectoryFiles(root))
        return BuildRequest(
            package_id=package_id,
            package_zip=zip_path,
            config=config,
            target="cpu",
            image=f"{registry}/cog-contract/gate:{short_id(package_id)}",
        )

    async def test_a_build_streams_its_log_live_then_one_image(
        self, builder, registry, gate, tmp_path
    ):
        """Log lines arrive while a step still runs (held at the gate, the build cannot
        have ended); at the end, exactly one image, the last event, pushed."""
        gate.mode = "hold"
        request = self.request(tmp_path, registry, gate)
        building = Consumer(builder.build(request))
        await building.until(gate.requested)
        await building.until(building.logged)
        lines_while_held = sum(isinstance(e, BuildLog) for e in building.events)
        gate.release()
        events = await building.result()
        assert lines_while_held > 0
        logs = [e for e in events if isinstance(e, BuildLog)]
        images = [e for e in events if isinstance(e, BuiltImage)]
        assert all(isinstance(e.line, str) and isinstance(e.stage, str) for e in logs)
        assert len(images) == 1, images
        assert events[-1] is images[0], "the image is the last event"
        # An ImageLoaded (optional): once, of the image asked for, before the push.
        loaded = [e for e in events if isinstance(e, ImageLoaded)]
        assert len(loaded) <= 1, loaded
        assert all(e.image == request.image for e in loaded), loaded
        assert images[0].image == request.image
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", images[0].digest), images[0].digest
        assert self.registry_digest(registry, request.image) == images[0].digest

    async def test_a_failing_step_is_a_build_error_naming_it(
        self, builder, registry, gate, tmp_path
    ):
        gate.mode = "missing"
        request = self.request(tmp_path, registry, gate)
        events: list[BuildEvent] = []
        with pytest.raises(BuildError) as caught:
            async for event in builder.build(request):
                events.append(event)
        error = caught.value
        assert not isinstance(error, BuilderUnavailable), "the package's fault, not the server's"
        assert gate.requested.is_set()
        assert error.step, "the failing step is named"
        assert any("gate" in line for line in error.output), error.output
        assert not any(isinstance(e, BuiltImage) for e in events)

    async def test_no_cache_runs_every_step_again(self, builder, registry, gate, tmp_path):
        """Built once, then again with ``no_cache``: the step that installs the package's
        dependency runs again (a builder that reused its cached layer would skip it)."""
        request = self.request(tmp_path, registry, gate)
        await Consumer(builder.build(request)).result()
        assert gate.requests == 1
        events = await Consumer(builder.build(attrs.evolve(request, no_cache=True))).result()
        assert gate.requests == 2, "the dependency step came from the cache"
        images = [e for e in events if isinstance(e, BuiltImage)]
        assert [i.image for i in images] == [request.image]
        assert self.registry_digest(registry, request.image) == images[0].digest

    async def test_a_cancelled_build_stops_its_step(self, builder, registry, gate, tmp_path):
        """The task consuming a build is cancelled (its client left) while a step runs:
        the step is stopped (its connection to the gate closes) and nothing is pushed."""
        gate.mode = "hold"
        request = self.request(tmp_path, registry, gate)
        building = Consumer(builder.build(request))
        await building.until(gate.requested)
        building.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await building.task
        try:
            # Well within pip's own 15-second timeout, which would close it too.
            await asyncio.wait_for(gate.dropped.wait(), 10)
        except asyncio.TimeoutError:
            pytest.fail("the build's step still ran 10 seconds after the build was cancelled")
        assert not self.registry_has(registry, request.image)

    # -- what a subclass may replace for a registry that is not plain HTTP -------------

    def registry_digest(self, registry: str, image: str) -> str:
        return registry_digest(registry, image)

    def registry_has(self, registry: str, image: str) -> bool:
        try:
            self.registry_digest(registry, image)
        except OSError:
            return False
        return True
