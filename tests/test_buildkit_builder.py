"""The BuildKit builder against a real BuildKit: the one embedded in the local Docker Engine,
reached through its /grpc endpoint (docker-grpc://), and through a real TLS terminator in
front of it for tcp:// with (mutual) TLS. Real registry, real examples, real check.

Not reachable here (no standalone buildkitd): the `image` exporter with push=true and
registry caches; docs/buildkit.md says what was tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import ssl
import subprocess
import uuid
import zipfile
from pathlib import Path

import attrs
import grpc
import pytest
from aiohttp import web

from cog.builders import (
    BuildError,
    BuilderSettings,
    BuilderUnavailable,
    CheckedBuilder,
    ImageLoaded,
)
from cog.builders.buildkit import (
    BuildKitBuilder,
    BuildKitConnection,
    EngineTunnel,
    parse_address,
)
from cog.server.check import check_image
from cog.testing.builder import BuilderContract
from tests.builder_helpers import (
    EXAMPLES,
    collect,
    copy_example,
    iterate,
    lines,
    package_request,
)
from tests.services.docker import registry_digest
from tests.tls_helpers import make_certs

pytestmark = pytest.mark.integration
#: How BuildKit's Dockerfile frontend names step N of a stage: "[N/total]", or with the
#: stage's name ("[cog-base N/total]", "[stage-2 N/total]": cog's Dockerfile has stages)
STEP = r"\[(?:[\w.-]+ )?{}/\d+\]"


# ---- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def engine_addr(docker_engine) -> str:
    """docker-grpc:// address of the test engine's embedded BuildKit."""
    if not docker_engine.startswith("unix://"):
        pytest.skip(f"these tests reach the engine through its socket, not {docker_engine}")
    return "docker-grpc://" + docker_engine.removeprefix("unix://")


@pytest.fixture
def settings(registry, base_images, engine_addr) -> BuilderSettings:
    return BuilderSettings(registry=registry, options={"addr": engine_addr})


@contextlib.asynccontextmanager
async def opened(builder: BuildKitBuilder):
    await builder.open()
    try:
        yield builder
    finally:
        await builder.close()


@pytest.fixture
async def builder(settings):
    async with opened(BuildKitBuilder.from_settings(settings)) as builder:
        yield builder


def model_dir(tmp_path: Path, *, yaml_extra: str = "") -> Path:
    root = tmp_path / "model"
    root.mkdir()
    (root / "cog.yaml").write_text(
        "name: test/bk\nmodel: infer.py:Model\nenvironment:\n  python_version: '3.11'\n"
        + yaml_extra
    )
    (root / "infer.py").write_text(
        "import cog\n\nclass Model(cog.Model):\n    def setup(self):\n        pass\n\n"
        '    @cog.input("text", type=str, default="x")\n'
        "    def run(self, text):\n        return text.upper()\n"
    )
    return root


# ---- talking to BuildKit --------------------------------------------------------------


async def test_lists_the_engines_worker(engine_addr):
    connection = BuildKitConnection(parse_address(engine_addr))
    await connection.open()
    try:
        workers = await connection.list_workers(timeout=10)
    finally:
        await connection.close()
    assert [w.ID for w in workers] == ["moby"]


async def test_probe_picks_the_moby_exporter(builder):
    daemon = await builder.probe()
    assert daemon.workers == ("moby",)
    assert daemon.exporter == "moby"
    assert "Engine API" in daemon.describe()


@pytest.mark.slow
async def test_unix_socket_address(registry, base_images, docker_engine, tmp_path):
    """unix:// as for a buildkitd on this machine: here a socket that speaks plain gRPC to
    the engine's BuildKit (the docker-grpc tunnel, used on its own)."""
    tunnel = EngineTunnel(docker_engine)
    socket = await tunnel.start()
    try:
        settings = BuilderSettings(registry=registry, options={"addr": socket})
        request = package_request(EXAMPLES / "hello", tmp_path / "p.zip", registry)
        async with opened(BuildKitBuilder.from_settings(settings)) as builder:
            assert builder.address.scheme == "unix"
            logs, built = await collect(builder.build(request))
    finally:
        await tunnel.close()
    assert lines(logs)[0].startswith(f"buildkit at {socket}: BuildKit ")
    assert built[0].digest == registry_digest(registry, request.image)


async def test_unreachable_tcp_address(registry, tmp_path):
    settings = BuilderSettings(registry=registry, options={"addr": "tcp://127.0.0.1:1"})
    request = package_request(EXAMPLES / "hello", tmp_path / "p.zip", registry)
    async with opened(BuildKitBuilder.from_settings(settings)) as builder:
        with pytest.raises(BuilderUnavailable) as caught:
            await collect(builder.build(request))
    assert str(caught.value).startswith("buildkit at tcp://127.0.0.1:1 is not reachable")


async def test_unreachable_engine(registry, tmp_path):
    settings = BuilderSettings(
        registry=registry, options={"addr": "docker-grpc:///nonexistent/docker.sock"}
    )
    async with opened(BuildKitBuilder.from_settings(settings)) as builder:
        with pytest.raises(BuilderUnavailable) as caught:
            await builder.probe()
    message = str(caught.value)
    assert message.startswith("buildkit at docker-grpc:///nonexistent/docker.sock")
    assert "cannot connect to the Docker Engine at unix:///nonexistent/docker.sock" in message


async def test_missing_exporter_is_a_missing_feature(registry, base_images, engine_addr, tmp_path):
    # The embedded BuildKit has no `image` exporter: asking for it is an operator error.
    settings = BuilderSettings(
        registry=registry, options={"addr": engine_addr, "exporter": "image"}
    )
    request = package_request(EXAMPLES / "hello", tmp_path / "p.zip", registry)
    async with opened(BuildKitBuilder.from_settings(settings)) as builder:
        with pytest.raises(BuilderUnavailable) as caught:
            await collect(builder.build(request))
    message = str(caught.value)
    assert message.startswith(f"buildkit at {engine_addr} lacks a feature cog needs")
    assert 'exporter "image"' in message and "exporter=moby" in message


async def test_a_missing_base_image_is_the_servers_setup(
    registry, base_images, engine_addr, tmp_path
):
    # The engine has no such image and Docker Hub is unreachable: a 503-class error that
    # names the image and what to do, not the package's fault.
    settings = BuilderSettings(
        registry=registry,
        base_images={"cpu": f"cog-test/no-such-base:{uuid.uuid4().hex[:8]}"},
        options={"addr": engine_addr},
    )
    request = package_request(EXAMPLES / "hello", tmp_path / "p.zip", registry)
    async with opened(BuildKitBuilder.from_settings(settings)) as builder:
        with pytest.raises(BuilderUnavailable) as caught:
            await collect(builder.build(request))
    message = str(caught.value)
    assert message.startswith(
        f"buildkit at {engine_addr}: no base image for Python 3.11: "
        "docker.io/cog-test/no-such-base:"  # as BuildKit names it
    )
    assert "--base-image cpu=IMAGE" in message
    assert caught.value.step.startswith("[internal] load metadata for ")


async def test_a_base_image_of_another_python_fails_naming_both(
    registry, base_images, engine_addr, tmp_path
):
    """The check of the image's Python through BuildKit, as the server runs every builder
    (CheckedBuilder): the failure says both Pythons, and nothing is exported."""
    settings = BuilderSettings(
        registry=registry, base_images={"cpu": base_images["cpu"]}, options={"addr": engine_addr}
    )
    root = model_dir(tmp_path)
    (root / "cog.yaml").write_text((root / "cog.yaml").read_text().replace("'3.11'", "'3.8'"))
    request = package_request(root, tmp_path / "p.zip", registry)
    async with opened(BuildKitBuilder.from_settings(settings)) as builder:
        with pytest.raises(BuildError) as caught:
            await collect(CheckedBuilder(builder).build(request))
    assert re.fullmatch(
        rf"python_version is 3\.8, but the base image {re.escape(base_images['cpu'])} runs "
        r"Python 3\.11\.\d+; give the server a base image with Python 3\.8 "
        r"\(--base-image cpu=IMAGE\)",
        caught.value.message,
    ), caught.value.message
    assert re.match(STEP.format(2), caught.value.step)  # the first step after FROM
    inspected = subprocess.run(["docker", "image", "inspect", request.image], capture_output=True)
    assert inspected.returncode != 0


# ---- TLS: a real TLS listener in front of the embedded BuildKit ------------------------


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Path:
    """A CA, a server cert for 127.0.0.1 and a client cert it signed; a self-signed one."""
    return make_certs(tmp_path_factory.mktemp("certs"))


@contextlib.asynccontextmanager
async def tls_front(engine: str, cert: Path, key: Path, client_ca: Path | None):
    """A TLS listener on 127.0.0.1 passing the plain h2 stream to the engine's BuildKit,
    as a TLS-terminating proxy in front of a build farm's buildkitd would."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca)
    tunnel = EngineTunnel(engine)
    target = (await tunnel.start()).removeprefix("unix://")
    handlers: set[asyncio.Task] = set()

    async def pipe(reader, writer):
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()

    async def handle(reader, writer):
        handlers.add(asyncio.current_task())
        inner_writer = None
        try:
            inner_reader, inner_writer = await asyncio.open_unix_connection(target)
            await asyncio.gather(pipe(reader, inner_writer), pipe(inner_reader, writer))
        except (asyncio.CancelledError, OSError):
            pass  # ending cancelled would be reported by asyncio's stream server
        finally:
            for each in (writer, inner_writer):
                if each is not None:
                    each.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await tunnel.close()


def tls_settings(registry: str, port: int, certs: Path, **tls: str) -> BuilderSettings:
    options = {"addr": f"tcp://127.0.0.1:{port}", **tls}
    return BuilderSettings(registry=registry, options=options)


def mutual_tls_settings(registry: str, port: int, certs: Path) -> BuilderSettings:
    return tls_settings(
        registry, port, certs,
        tls_ca=str(certs / "ca.pem"),
        tls_cert=str(certs / "client.pem"),
        tls_key=str(certs / "client.key"),
    )  # fmt: skip


async def test_mutual_tls_reaches_buildkit(registry, docker_engine, certs):
    async with tls_front(
        docker_engine, certs / "server.pem", certs / "server.key", certs / "ca.pem"
    ) as port:
        settings = mutual_tls_settings(registry, port, certs)
        async with opened(BuildKitBuilder.from_settings(settings)) as builder:
            daemon = await builder.probe()
    assert daemon.workers == ("moby",)
    assert daemon.exporter == "moby"  # found from the worker, the address is plain tcp://


async def test_untrusted_server_certificate_is_a_tls_failure(registry, docker_engine, certs):
    async with tls_front(docker_engine, certs / "self.pem", certs / "self.key", None) as port:
        settings = tls_settings(registry, port, certs, tls_ca=str(certs / "ca.pem"))
        async with opened(BuildKitBuilder.from_settings(settings)) as builder:
            with pytest.raises(BuilderUnavailable) as caught:
                await builder.probe()
    message = str(caught.value)
    assert message.startswith(f"buildkit at tcp://127.0.0.1:{port}: TLS handshake failed")
    assert "CERTIFICATE_VERIFY_FAILED" in message


async def test_server_name_must_match(registry, docker_engine, certs):
    async with tls_front(docker_engine, certs / "server.pem", certs / "server.key", None) as port:
        wrong = tls_settings(
            registry, port, certs, tls_ca=str(certs / "ca.pem"), tls_server_name="elsewhere"
        )
        async with opened(BuildKitBuilder.from_settings(wrong)) as builder:
            with pytest.raises(BuilderUnavailable, match="TLS handshake failed"):
                await builder.probe()
        right = tls_settings(
            registry, port, certs, tls_ca=str(certs / "ca.pem"), tls_server_name="buildkitd"
        )
        async with opened(BuildKitBuilder.from_settings(right)) as builder:
            assert (await builder.probe()).workers == ("moby",)


async def test_missing_client_certificate_is_refused(registry, docker_engine, certs):
    async with tls_front(
        docker_engine, certs / "server.pem", certs / "server.key", certs / "ca.pem"
    ) as port:
        settings = tls_settings(registry, port, certs, tls_ca=str(certs / "ca.pem"))
        async with opened(BuildKitBuilder.from_settings(settings)) as builder:
            with pytest.raises(BuilderUnavailable) as caught:
                await builder.probe()
    message = str(caught.value)
    assert message.startswith(f"buildkit at tcp://127.0.0.1:{port}: TLS handshake failed")
    assert "client certificate" in message


async def test_plain_grpc_to_a_tls_server_says_it_may_want_tls(registry, docker_engine, certs):
    async with tls_front(docker_engine, certs / "server.pem", certs / "server.key", None) as port:
        settings = BuilderSettings(registry=registry, options={"addr": f"tcp://127.0.0.1:{port}"})
        async with opened(BuildKitBuilder.from_settings(settings)) as builder:
            with pytest.raises(BuilderUnavailable) as caught:
                await builder.probe()
    message = str(caught.value)
    assert message.startswith(f"buildkit at tcp://127.0.0.1:{port}: ")
    assert "not reachable" not in message, message
    assert "--buildkit-tls-ca" in message, message


async def test_a_moby_worker_behind_tcp_needs_its_engine_named(
    registry, docker_engine, certs, tmp_path
):
    """A Docker Engine's BuildKit reached over tcp:// (here the local one, behind TLS)
    leaves the image in an engine cog cannot know: refused at the build's start."""
    async with tls_front(
        docker_engine, certs / "server.pem", certs / "server.key", certs / "ca.pem"
    ) as port:
        settings = mutual_tls_settings(registry, port, certs)
        request = package_request(EXAMPLES / "hello", tmp_path / "p.zip", registry)
        async with opened(BuildKitBuilder.from_settings(settings)) as builder:
            seen = []
            with pytest.raises(BuilderUnavailable) as caught:
                async for event in builder.build(request):
                    seen.append(event)
    assert seen == []  # nothing solved
    message = str(caught.value)
    assert message.startswith(f"buildkit at tcp://127.0.0.1:{port}: its worker (moby) ")
    assert "--builder-opt docker_host=" in message


# ---- real builds ---------------------------------------------------------------------


@pytest.mark.slow
async def test_hello_builds_pushes_and_passes_the_check(
    builder, registry, tmp_path, no_leaked_containers
):
    request = package_request(EXAMPLES / "hello", tmp_path / "hello.zip", registry)
    events = [event async for event in builder.build(request)]
    logs, built = await collect(iterate(events))
    text = lines(logs)
    assert text[0].startswith(f"{builder.label}: BuildKit ")
    # The image is in the engine the server checks on (the test's) before its push: the
    # builder says so, once, so that the check may run during the push.
    loaded = [i for i, event in enumerate(events) if isinstance(event, ImageLoaded)]
    assert [events[i].image for i in loaded] == [request.image]
    assert loaded[0] < events.index(built[0])
    assert any(
        re.fullmatch(r"#\d+ " + STEP.format(1) + r" FROM docker.io/library/python:3.11-slim", t)
        for t in text
    )
    assert any(
        re.fullmatch(r"#\d+ " + STEP.format(r"\d+") + " COPY package/ /src/", t) for t in text
    )
    assert any(re.fullmatch(r"#\d+ naming to .*examples/hello:\w+ done", t) for t in text)
    assert [e.stage for e in logs].index("push") > max(
        i for i, e in enumerate(logs) if e.stage == "build"
    )
    assert [b.image for b in built] == [request.image]
    assert built[0].digest == registry_digest(registry, request.image)

    signature = json.loads(request.signature_json)
    checked = [
        e.line
        async for e in check_image(request.image, request.package_zip, request.config, signature)
    ]
    assert sum(bool(re.match(r"Example \d: ok ", line)) for line in checked) == 3


@pytest.mark.slow
async def test_code_only_change_reuses_cached_steps(builder, registry, tmp_path):
    model = copy_example("hello", tmp_path)
    await collect(builder.build(package_request(model, tmp_path / "one.zip", registry)))
    # Unique per run, so no earlier run can have cached the COPY of the code.
    (model / "infer.py").write_text((model / "infer.py").read_text() + f"# {uuid.uuid4()}\n")
    second = package_request(model, tmp_path / "two.zip", registry)
    logs, built = await collect(builder.build(second))
    text = lines(logs)

    def outcome(step: str) -> str:
        vertex = r"#\d+ " + STEP.format(r"\d+") + f" {step}"
        number = next(t.split()[0] for t in text if re.match(vertex, t))
        return next(t for t in text if t.startswith(f"{number} ") and t.split()[1].isupper())

    assert outcome(
        "RUN --mount=type=cache,id=cog-pip,target=/var/cache/cog/pip python -m pip"
    ).endswith(" CACHED")
    assert outcome("COPY cog/").endswith(" CACHED")
    assert outcome("COPY package/").split()[1] == "DONE"
    assert built[0].digest == registry_digest(registry, second.image)


@pytest.mark.slow
async def test_failing_run_step_is_named_with_its_output(builder, registry, tmp_path):
    root = model_dir(tmp_path, yaml_extra="  system_packages: [no-such-package-cog-test]\n")
    request = package_request(root, tmp_path / "p.zip", registry)
    seen: list[str] = []
    with pytest.raises(BuildError) as caught:
        async for event in builder.build(request):
            seen.append(event.line)
    error = caught.value
    assert not isinstance(error, BuilderUnavailable)
    assert str(error).startswith(f"{builder.label}: ")
    assert "exit code: 100" in error.message
    # The base stage checks the image's Python and holds the inference server's
    # environment, the same for every package; apt-get is the image's first step.
    assert re.match(STEP.format(r"\d+"), error.step) and "apt-get install" in error.step
    assert any("Unable to locate package no-such-package-cog-test" in line for line in error.output)
    assert any(line.endswith("ERROR: " + error.message.split(": ", 1)[1]) for line in seen)


class ContextURLStep(BuildKitBuilder):
    """The real builder with one more step that names the context server, then fails."""

    def dockerfile(self, request):
        step = f"RUN echo not fetching {self._context.base_url}/context/ && exit 3\n"
        return super().dockerfile(request) + step


@pytest.mark.slow
async def test_a_failing_step_that_names_the_context_server_is_the_steps_failure(
    settings, registry, tmp_path
):
    request = package_request(EXAMPLES / "hello", tmp_path / "p.zip", registry)
    async with opened(ContextURLStep.from_settings(settings)) as builder:
        with pytest.raises(BuildError) as caught:
            await collect(builder.build(request))
    error = caught.value
    assert not isinstance(error, BuilderUnavailable), error
    assert builder._context.base_url in error.message and "exit code: 3" in error.message
    assert error.step and "RUN echo not fetching" in error.step


async def test_a_context_buildkit_cannot_fetch_is_named(
    registry, base_images, engine_addr, tmp_path
):
    # BuildKit is told to fetch from a port where nothing listens.
    options = {
        "addr": engine_addr,
        "context_url": "http://127.0.0.1:9/cog",
        "context_listen": "127.0.0.1:0",
    }
    settings = BuilderSettings(registry=registry, options=options)
    request = package_request(EXAMPLES / "hello", tmp_path / "p.zip", registry)
    async with opened(BuildKitBuilder.from_settings(settings)) as builder:
        with pytest.raises(BuilderUnavailable) as caught:
            await collect(builder.build(request))
    message = str(caught.value)
    assert message.startswith(
        f"buildkit at {engine_addr} could not fetch the build context from http://127.0.0.1:9/cog:"
    )
    assert "connection refused" in message and "context_host" in message


class SlowBuilder(BuildKitBuilder):
    """The real builder with one more step that runs until it is stopped."""

    marker = ""

    def dockerfile(self, request):
        step = f"RUN echo start-{self.marker} && sleep 600 && echo end-{self.marker}\n"
        return super().dockerfile(request) + step


def running(marker: str) -> bool:
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return any(f"start-{marker}" in line and "sleep 600" in line for line in processes.splitlines())


async def eventually(predicate, what: str, timeout: float = 60) -> None:
    for _ in range(int(timeout / 0.25)):
        if predicate():
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"still not {what} after {timeout}s")


@pytest.mark.slow
async def test_closing_the_stream_cancels_the_build_in_buildkit(
    settings, registry, engine_addr, tmp_path
):
    builder = SlowBuilder.from_settings(settings)
    builder.marker = uuid.uuid4().hex
    request = package_request(EXAMPLES / "hello", tmp_path / "p.zip", registry)
    watcher = BuildKitConnection(parse_address(engine_addr))
    await watcher.open()
    try:
        async with opened(builder):
            stream = builder.build(request)
            ref = None
            async for event in stream:
                if event.line.startswith(f"{builder.label}: solving "):
                    ref = event.line.rsplit(" ", 1)[1]
                if re.fullmatch(rf"#\d+ start-{builder.marker}", event.line):
                    break
            assert ref and running(builder.marker)
            # A second Status stream of the same build, as `buildctl debug` would watch it.
            status = watcher.status(ref)
            updates = asyncio.ensure_future(_collect(status))
            # Nothing tells when BuildKit has registered this watcher (a running step sends
            # no update, and the call's headers come with its first one): a pause, so that
            # the watcher sees the cancellation rather than joins after it.
            await asyncio.sleep(0.5)
            await stream.aclose()

            await eventually(lambda: not running(builder.marker), "stopped")
            await eventually(updates.done, "ended: BuildKit's status stream")
        errors = [v.error for r in updates.result() for v in r.vertexes if builder.marker in v.name]
        assert any("context canceled" in e for e in errors), errors
    finally:
        await watcher.close()


def pending_tasks() -> list[str]:
    current = asyncio.current_task()
    return [repr(t) for t in asyncio.all_tasks() if t is not current and not t.done()]


@pytest.mark.slow
async def test_a_cancelled_build_says_which_step_it_stopped(
    settings, registry, engine_addr, tmp_path
):
    """Cancelled as the server cancels a request (client gone, shutdown): the build's log
    names the builder and the running step, the step stops in BuildKit, and no task of
    the builder is left pending."""
    builder = SlowBuilder.from_settings(settings)
    builder.marker = uuid.uuid4().hex
    request = package_request(EXAMPLES / "hello", tmp_path / "p.zip", registry)
    seen: list[str] = []
    started = asyncio.Event()

    async def consume() -> None:
        async with contextlib.aclosing(builder.build(request)) as stream:
            async for event in stream:
                seen.append(event.line)
                if re.fullmatch(rf"#\d+ start-{builder.marker}", event.line):
                    started.set()

    async with opened(builder):
        build = asyncio.ensure_future(consume())
        await asyncio.wait_for(started.wait(), 600)
        await asyncio.sleep(0)  # one turn: the consumer is back inside the builder
        assert running(builder.marker)
        build.cancel()
        with pytest.raises(asyncio.CancelledError):
            await build
        await eventually(lambda: not running(builder.marker), "stopped")
        # Connections (the tunnel's, BuildKit's keep-alive to the context server) stay
        # open until close(); nothing of the build may.
        build_tasks = ("Queue.get", "_solve.<locals>")
        assert [t for t in pending_tasks() if any(w in t for w in build_tasks)] == []
    assert pending_tasks() == []
    step = next(line for line in seen if f"RUN echo start-{builder.marker}" in line)
    assert seen[-1] == (
        f"{builder.label}: build cancelled during step {step}; "
        "its Solve was cancelled in BuildKit too"
    )


@pytest.mark.slow
async def test_closing_the_builder_mid_build_fails_it_naming_the_step(settings, registry, tmp_path):
    """The server stopping closes the builder (its channel) under a running build."""
    builder = SlowBuilder.from_settings(settings)
    builder.marker = uuid.uuid4().hex
    request = package_request(EXAMPLES / "hello", tmp_path / "p.zip", registry)
    await builder.open()
    try:
        with pytest.raises(BuilderUnavailable) as caught:
            async with contextlib.aclosing(builder.build(request)) as stream:
                async for event in stream:
                    if re.fullmatch(rf"#\d+ start-{builder.marker}", event.line):
                        await builder.close()
    finally:
        await builder.close()
    error = caught.value
    assert error.message == (
        f"{builder.label}: the build was cancelled: the connection to BuildKit was closed "
        "(is the server stopping?)"
    )
    assert error.step and f"RUN echo start-{builder.marker}" in error.step
    await eventually(lambda: not running(builder.marker), "stopped")


async def _collect(call) -> list:
    responses = []
    with contextlib.suppress(grpc.aio.AioRpcError):
        async for response in call:
            responses.append(response)
    return responses


@pytest.mark.slow
async def test_build_over_mutual_tls(registry, docker_engine, base_images, certs, tmp_path):
    """The tcp:// path end to end: TLS to BuildKit, moby export found from the worker,
    push through the engine named by docker_host."""
    async with tls_front(
        docker_engine, certs / "server.pem", certs / "server.key", certs / "ca.pem"
    ) as port:
        settings = mutual_tls_settings(registry, port, certs)
        # That BuildKit is the one of this engine: cog pushes from there.
        options = {**settings.options, "docker_host": docker_engine}
        settings = attrs.evolve(settings, options=options)
        request = package_request(EXAMPLES / "hello", tmp_path / "p.zip", registry)
        async with opened(BuildKitBuilder.from_settings(settings)) as builder:
            logs, built = await collect(builder.build(request))
    push = [e.line for e in logs if e.stage == "push"]
    assert push[0].endswith(f"is in the Docker Engine at {docker_engine}; pushing it from there")
    assert built[0].digest == registry_digest(registry, request.image)


class TestBuildKitBuilderContract(BuilderContract):
    """The shipped Builder contract (cog.testing) against the BuildKit builder, through
    the Docker Engine's embedded BuildKit."""

    pytestmark = pytest.mark.slow

    @pytest.fixture
    async def builder(self, settings):
        async with opened(BuildKitBuilder.from_settings(settings)) as builder:
            yield builder


# ---- pip's downloads, shared through a cache mount -------------------------------------


def _wheel(name: str, version: str) -> tuple[str, bytes]:
    """A real, minimal pure-Python wheel of one module."""
    module = name.replace("-", "_")
    dist = f"{module}-{version}.dist-info"
    files = {
        f"{module}.py": b"VALUE = 1\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{dist}/RECORD"]).encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return f"{module}-{version}-py3-none-any.whl", out.getvalue()


@contextlib.asynccontextmanager
async def package_index(name: str, version: str):
    """A real package index (PEP 503 pages) on this machine, reachable from build
    containers through the Docker bridge's gateway, serving one wheel with the caching
    headers PyPI's file host sends. It stands in for PyPI because the way to PyPI from
    here strips those headers (so pip caches nothing from it, on any builder); it counts
    the wheel's downloads."""
    filename, data = _wheel(name, version)
    downloads = []

    async def page(request):
        link = f'<a href="/files/{filename}">{filename}</a>'
        return web.Response(text=f"<html><body>{link}</body></html>", content_type="text/html")

    async def wheel(request):
        downloads.append(request.path)
        headers = {"Cache-Control": "max-age=365000000, immutable, public"}
        return web.Response(body=data, headers=headers, content_type="application/zip")

    app = web.Application()
    app.router.add_get(f"/simple/{name}/", page)
    app.router.add_get(f"/files/{filename}", wheel)
    runner = web.AppRunner(app)
    await runner.setup()
    gateway = subprocess.run(
        ["docker", "network", "inspect", "bridge", "-f", "{{(index .IPAM.Config 0).Gateway}}"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    site = web.TCPSite(runner, gateway, 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://{gateway}:{port}/simple/", downloads
    finally:
        await runner.cleanup()


async def test_a_second_package_gets_pips_downloads_from_the_cache_mount(
    registry, base_images, engine_addr, tmp_path
):
    """Two packages pinning the same package: the first downloads it, the second finds it
    in the cache mount (pip says "Using cached"; the index serves it once), the same
    version installed; a build without the cache downloads it again. A mount of its own
    for this test, so the first build cannot find anything there."""
    settings = BuilderSettings(
        registry=registry,
        options={"addr": engine_addr, "pip_cache": f"cog-test-{uuid.uuid4().hex[:12]}"},
    )
    name = f"cog-test-cached-{uuid.uuid4().hex[:8]}"
    logs = {}
    async with package_index(name, "1.0") as (index, downloads):
        host = index.split("//")[1].split(":")[0]
        requests = []
        for build in ("first", "second", "cold"):
            (tmp_path / build).mkdir()
            root = model_dir(
                tmp_path / build, yaml_extra="  python_requirements: requirements.txt\n"
            )
            # A requirements file of its own: its pip step runs, not from the layer cache.
            (root / "requirements.txt").write_text(
                f"# {build} {uuid.uuid4()}\n--index-url {index}\n--trusted-host {host}\n"
                f"{name}==1.0\n"
            )
            requests.append(package_request(root, tmp_path / f"{build}.zip", registry))
        requests[2] = attrs.evolve(requests[2], no_cache=True)
        async with opened(BuildKitBuilder.from_settings(settings)) as builder:
            for build, request in zip(("first", "second", "cold"), requests):
                assert ("--mount=type=cache" in builder.dockerfile(request)) is (build != "cold")
                before = len(downloads)
                logged, built = await collect(builder.build(request))
                assert built, build
                logs[build] = ("\n".join(lines(logged)), len(downloads) - before)
    wheel = name.replace("-", "_") + "-1.0-py3-none-any.whl"

    def said(build: str) -> list[str]:  # pip's line about the wheel: how it got it
        return [line for line in logs[build][0].splitlines() if wheel in line]

    assert "Downloading" in " ".join(said("first")) and logs["first"][1] == 1, said("first")
    assert "Using cached" in " ".join(said("second")), said("second")
    assert logs["second"][1] == 0
    assert "Downloading" in " ".join(said("cold")) and logs["cold"][1] == 1, said("cold")
    for build, (text, _) in logs.items():
        assert f"Successfully installed {name}-1.0" in text, build
