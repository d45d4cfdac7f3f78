"""The BuildKit builder's parts that need no BuildKit: addresses, options, exporter choice,
progress rendering of real Status messages, the context server (a real HTTP server), and
an engine that answers /grpc without switching protocols (a real HTTP server too)."""

from __future__ import annotations

import asyncio
import io
import re
import sys
import tarfile
import zipfile
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from cog.builders import (
    BuilderConfigError,
    BuilderSettings,
    BuilderUnavailable,
    being_cancelled,
    load_builder,
)
from cog.builders.buildkit import (
    Address,
    BuildKitBuilder,
    ContextServer,
    Progress,
    choose_exporter,
    parse_address,
)
from cog.builders.buildkit.pb import messages as pb
from cog.engine import DEFAULT_ENGINE


def settings(**options: str) -> BuilderSettings:
    return BuilderSettings(registry="127.0.0.1:5000", options=options)


# ---- addresses and options -----------------------------------------------------------


def test_addresses():
    assert parse_address("tcp://buildkitd:1234") == Address(
        "tcp://buildkitd:1234", "tcp", target="buildkitd:1234", host="buildkitd"
    )
    assert parse_address("tcp://[::1]:1234").target == "[::1]:1234"
    assert parse_address("unix:///run/buildkit/buildkitd.sock").target == (
        "unix:///run/buildkit/buildkitd.sock"
    )
    assert parse_address("docker-grpc:///var/run/docker.sock").engine == (
        "unix:///var/run/docker.sock"
    )
    assert parse_address("docker-grpc://10.0.0.5:2375").engine == "tcp://10.0.0.5:2375"
    assert parse_address("docker-grpc://", "unix:///d.sock").engine == "unix:///d.sock"


def test_default_address_follows_docker_host(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///from/env.sock")
    assert parse_address("docker-grpc://").engine == "unix:///from/env.sock"
    builder = BuildKitBuilder.from_settings(settings())
    assert builder.address.engine == "unix:///from/env.sock"


@pytest.mark.parametrize(
    "address, message",
    [
        ("tcp://buildkitd", "tcp://HOST:PORT"),
        ("unix://relative.sock", "ABSOLUTE"),
        ("http://buildkitd:1234", "use tcp://"),
        ("docker-grpc://npipe", "tcp://HOST:PORT"),
    ],
)
def test_bad_addresses(address, message):
    with pytest.raises(BuilderConfigError, match=message):
        parse_address(address)


def test_local_and_remote():
    assert parse_address("tcp://127.0.0.1:1234").is_local
    assert parse_address("tcp://localhost:1234").is_local
    assert parse_address("unix:///x.sock").is_local
    assert not parse_address("tcp://buildkitd:1234").is_local
    assert not parse_address("docker-grpc://10.0.0.5:2375").is_local


def test_entry_point_loads_the_builder():
    builder = load_builder("buildkit", settings(addr="tcp://127.0.0.1:1234"))
    assert isinstance(builder, BuildKitBuilder)
    assert builder.label == "buildkit at tcp://127.0.0.1:1234"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"adr": "tcp://x:1"}, "unknown buildkit option"),
        ({"addr": "tcp://buildkitd:1234"}, "context_host"),
        ({"addr": "unix:///x.sock", "tls_ca": "/etc/hosts"}, "need a tcp://"),
        ({"addr": "tcp://127.0.0.1:1", "tls_ca": "/nonexistent/ca.pem"}, "tls_ca"),
        ({"addr": "tcp://127.0.0.1:1", "tls_cert": "/etc/hosts"}, "go together"),
        ({"exporter": "oci"}, "auto, image or moby"),
        ({"context_url": "ftp://x"}, "not http"),
        ({"context_listen": "0.0.0.0:9"}, "needs context_url"),
        ({"context_url": "http://x:1", "context_listen": "nope"}, "HOST:PORT"),
        ({"connect_timeout": "soon"}, "could not convert"),
        ({"pip_cache": "a b"}, "a cache ID"),
        ({"pip_cache": ""}, "a cache ID"),
    ],
)
def test_bad_options_fail_at_start(options, message):
    with pytest.raises(BuilderConfigError, match=message):
        BuildKitBuilder.from_settings(settings(**options))


def test_remote_buildkitd_with_a_context_host():
    builder = BuildKitBuilder.from_settings(
        settings(addr="tcp://buildkitd:1234", context_host="10.0.0.7", context_port="8911")
    )
    assert (builder._context.listen_host, builder._context.listen_port) == ("10.0.0.7", 8911)


# ---- exporter choice and the Solve request -----------------------------------------


def _worker(id: str, **labels: str):
    return pb.WorkerRecord(ID=id, Labels=labels)


def test_exporter_choice():
    grpc_addr = parse_address("docker-grpc://")
    tcp = parse_address("tcp://127.0.0.1:1234")
    assert choose_exporter("auto", grpc_addr, [_worker("abc")]) == "moby"
    assert choose_exporter("auto", tcp, [_worker("moby")]) == "moby"
    newer_moby = {"org.mobyproject.buildkit.worker.moby.host-gateway-ip": "172.17.0.1"}
    assert choose_exporter("auto", tcp, [_worker("x", **newer_moby)]) == "moby"
    executor = {"org.mobyproject.buildkit.worker.executor": "oci"}
    assert choose_exporter("auto", tcp, [_worker("wk1", **executor)]) == "image"
    assert choose_exporter("moby", tcp, [_worker("wk1")]) == "moby"


def test_solve_request_fills_the_single_exporter_fields():
    builder = BuildKitBuilder.from_settings(
        settings(cache_from="r/cache:a, r/cache:b", cache_to="r/cache:a", registry_insecure="true")
    )
    request = builder.solve_request("ref1", "http://127.0.0.1:1/context/t", "r/img:1", "image")
    assert request.Frontend == "dockerfile.v0"
    assert dict(request.FrontendAttrs) == {
        "context": "http://127.0.0.1:1/context/t",
        "filename": "Dockerfile",
    }
    assert request.Exporter == "image"
    assert dict(request.ExporterAttrs) == {
        "name": "r/img:1",
        "push": "true",
        "registry.insecure": "true",
    }
    assert [dict(i.Attrs) for i in request.Cache.Imports] == [
        {"ref": "r/cache:a"},
        {"ref": "r/cache:b"},
    ]
    assert [(e.Type, dict(e.Attrs)) for e in request.Cache.Exports] == [
        ("registry", {"ref": "r/cache:a", "mode": "max"})
    ]
    moby = builder.solve_request("ref2", "http://x/context/t", "r/img:1", "moby")
    assert (moby.Exporter, dict(moby.ExporterAttrs)) == ("moby", {"name": "r/img:1"})


def test_a_no_cache_build_asks_the_frontend_for_no_cache():
    builder = BuildKitBuilder.from_settings(settings())
    cold = builder.solve_request("r", "http://x/context/t", "r/img:1", "moby", no_cache=True)
    assert dict(cold.FrontendAttrs) == {
        "context": "http://x/context/t",
        "filename": "Dockerfile",
        "no-cache": "",  # the dockerfile frontend's "every stage", as buildx --no-cache sends
    }


def test_pip_downloads_go_to_a_shared_cache_mount_but_never_in_a_cold_build(tmp_path):
    """Every pip install from an index runs with the cache mount (so a second package
    gets the downloads of the first); a build without the cache has none (BuildKit keeps
    a cache mount's contents through no-cache), nor has the Docker builder's Dockerfile."""
    import attrs

    from cog.builders.docker import DockerBuilder
    from tests.builder_helpers import package_request

    root = tmp_path / "model"
    root.mkdir()
    (root / "cog.yaml").write_text(
        "model: infer.py:Model\nenvironment:\n  python_version: '3.11'\n"
        "  python_packages: [pillow==11.3.0]\n  python_requirements: requirements.txt\n"
    )
    (root / "requirements.txt").write_text("numpy==2.1.0\n")
    (root / "infer.py").write_text(
        "import cog\nclass Model(cog.Model):\n  def run(self):\n    pass\n"
    )
    request = package_request(root, tmp_path / "p.zip", "r:5000")
    mount = "RUN --mount=type=cache,id=cog-pip,target=/var/cache/cog/pip "
    pip = "python -m pip install --cache-dir /var/cache/cog/pip"

    warm = BuildKitBuilder.from_settings(settings()).dockerfile(request)
    installs = [line for line in warm.splitlines() if "pip install" in line]
    from_index = [line for line in installs if "/tmp/cog/server/" not in line]
    assert len(from_index) == 3  # the server's environment, the requirements, the packages
    assert all(line.startswith(mount + pip) for line in from_index), from_index
    assert "--no-cache-dir" not in " ".join(from_index)

    cold = BuildKitBuilder.from_settings(settings()).dockerfile(
        attrs.evolve(request, no_cache=True)
    )
    off = BuildKitBuilder.from_settings(settings(pip_cache="off")).dockerfile(request)
    classic = DockerBuilder.from_settings(settings()).dockerfile(request)
    for text in (cold, off, classic):
        assert "--mount" not in text and "/var/cache/cog" not in text
        assert text.count("pip install --no-cache-dir") == len(installs)
    named = BuildKitBuilder.from_settings(settings(pip_cache="site.pip")).dockerfile(request)
    assert "RUN --mount=type=cache,id=site.pip,target=/var/cache/cog/pip " in named


# ---- progress --------------------------------------------------------------------------


def ts(seconds: float) -> dict:
    whole = int(seconds)
    return {"seconds": whole, "nanos": round((seconds - whole) * 1e9)}


def status(vertexes=(), logs=(), statuses=()):
    return pb.StatusResponse(vertexes=list(vertexes), logs=list(logs), statuses=list(statuses))


def vertex(digest, name, started=None, completed=None, **extra):
    fields = {"digest": digest, "name": name, **extra}
    if started is not None:
        fields["started"] = ts(started)
    if completed is not None:
        fields["completed"] = ts(completed)
    return pb.Vertex(**fields)


def log(digest, msg: bytes, stream=1):
    return pb.VertexLog(vertex=digest, msg=msg, stream=stream)


def test_progress_reads_like_plain_docker_build_output():
    progress = Progress()
    lines = []
    lines += progress.feed(status([vertex("a", "[1/3] FROM base", 1, 1, cached=True)]))
    lines += progress.feed(status([vertex("b", "[2/3] RUN pip install x", started=2)]))
    lines += progress.feed(status(logs=[log("b", b"Collecting x\nDownl"), log("b", b"oading\n")]))
    lines += progress.feed(status(logs=[log("b", b"10%\r50%\r100%\n", stream=2)]))
    lines += progress.feed(status([vertex("b", "[2/3] RUN pip install x", 2, 5.25)]))
    lines += progress.feed(
        status(
            [vertex("c", "exporting to image", started=6)],
            statuses=[
                pb.VertexStatus(ID="exporting layers", vertex="c", completed=ts(6.5)),
                pb.VertexStatus(ID="sha256:ab", vertex="c", current=2_500_000, total=5_000_000),
            ],
        )
    )
    assert lines == [
        "#1 [1/3] FROM base",
        "#1 CACHED",
        "#2 [2/3] RUN pip install x",
        "#2 Collecting x",
        "#2 Downloading",
        "#2 100%",
        "#2 DONE 3.2s",
        "#3 exporting to image",
        "#3 exporting layers done",
    ]
    assert progress.failed_step() == (None, ())


def test_progress_names_the_failing_step_with_its_last_lines():
    progress = Progress()
    progress.feed(status([vertex("a", "[2/4] RUN apt-get install nope", started=1)]))
    progress.feed(status([vertex("b", "[3/4] RUN pip install y", started=1)]))
    progress.feed(status(logs=[log("a", b"".join(b"line %d\n" % i for i in range(30)))]))
    progress.feed(status(logs=[log("a", b"E: Unable to locate package nope")]))  # no newline
    lines = progress.feed(
        status(
            [
                vertex("b", "[3/4] RUN pip install y", 1, 2, error="context canceled"),
                vertex("a", "[2/4] RUN apt-get install nope", 1, 2, error="exit code: 100"),
            ]
        )
    )
    assert lines == [
        "#2 ERROR: context canceled",
        "#1 E: Unable to locate package nope",
        "#1 ERROR: exit code: 100",
    ]
    step, output = progress.failed_step()
    assert step == "[2/4] RUN apt-get install nope"
    assert output[-1] == "E: Unable to locate package nope"
    assert len(output) == 20 and output[0] == "line 11"


def test_progress_keeps_no_unbounded_partial_line():
    progress = Progress()
    progress.feed(status([vertex("a", "[2/2] RUN pip install", started=1)]))
    for percent in range(100):
        assert progress.feed(status(logs=[log("a", b"%d%%\r" % percent)])) == []
    assert progress.flush() == ["#1 99%"]
    long = progress.feed(status(logs=[log("a", b"x" * 70_000)]))
    assert long == ["#1 " + "x" * 70_000]


def test_progress_shows_logs_of_a_vertex_seen_only_through_them():
    progress = Progress()
    progress.feed(status([vertex("a", "[2/2] RUN echo", started=None)]))
    assert progress.feed(status(logs=[log("a", b"hi")])) == ["#1 [2/2] RUN echo"]
    assert progress.flush() == ["#1 hi"]


# ---- the context server ---------------------------------------------------------------


@pytest.fixture
def package_zip(tmp_path) -> Path:
    path = tmp_path / "p.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("cog.yaml", "name: x\n")
        archive.writestr("infer.py", "print('hi')\n" * 1000)
    return path


async def test_context_server_serves_each_build_once_and_forgets_it(package_zip):
    server = ContextServer("127.0.0.1", 0, None)
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with server.offer(package_zip, "FROM scratch\n") as url:
                assert url.startswith(f"{server.base_url}/context/")
                assert len(url.rsplit("/", 1)[1]) >= 43  # 256 random bits
                async with http.get(url) as response:
                    assert response.status == 200
                    assert response.headers["Content-Type"] == "application/x-tar"
                    body = await response.read()
                guess = url[:-4] + "AAAA"
                async with http.get(guess) as response:
                    assert response.status == 404
            async with http.get(url) as response:
                assert response.status == 404  # gone with the build
    finally:
        await server.close()
    with tarfile.open(fileobj=io.BytesIO(body)) as archive:
        names = archive.getnames()
        assert archive.extractfile("Dockerfile").read() == b"FROM scratch\n"
        assert archive.extractfile("package/infer.py").read() == b"print('hi')\n" * 1000
    assert names[0] == "Dockerfile" and names[1].startswith("cog/server/cog-")
    assert names[2].startswith("cog/model/cog-")


async def test_context_url_is_what_the_operator_set(package_zip):
    server = ContextServer("127.0.0.1", 0, "https://cog.example:8443/bk/")
    await server.start()
    try:
        async with server.offer(package_zip, "FROM scratch\n") as url:
            assert url.startswith("https://cog.example:8443/bk/context/")
    finally:
        await server.close()


async def test_busy_context_port_is_a_config_error(package_zip):
    first = ContextServer("127.0.0.1", 0, None)
    await first.start()
    try:
        port = int(first.base_url.rsplit(":", 1)[1])
        second = ContextServer("127.0.0.1", port, None)
        with pytest.raises(BuilderConfigError, match=f"127.0.0.1:{port}"):
            await second.start()
    finally:
        await first.close()


async def test_closing_the_server_during_a_build_keeps_the_builds_own_error(package_zip):
    # Server shutdown closes the context server while a build still holds its offer: the
    # build's own error must come out, not a KeyError for its forgotten token.
    server = ContextServer("127.0.0.1", 0, None)
    await server.start()
    with pytest.raises(RuntimeError, match="the build's own error"):
        async with server.offer(package_zip, "FROM scratch\n"):
            await server.close()
            raise RuntimeError("the build's own error")
    await server.start()
    try:
        async with server.offer(package_zip, "FROM scratch\n") as url:
            await server.close()  # and a build ending normally after the close
    finally:
        await server.close()
    assert url.startswith("http://127.0.0.1:")


# ---- cancellation ----------------------------------------------------------------------


async def test_being_cancelled_tells_a_cancelled_task_and_is_false_where_python_cannot():
    seen = []

    async def body() -> None:
        seen.append(being_cancelled())
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen.append(being_cancelled())
            raise

    task = asyncio.ensure_future(body())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == [False, sys.version_info >= (3, 11)]  # 3.10 cannot tell

    class Python310Task:
        """A fake: Python 3.10's tasks have no cancelling() (3.11 added it), and the
        tests run on an interpreter whose tasks all have it."""

    assert being_cancelled(Python310Task()) is False  # type: ignore[arg-type]


# ---- the engine that pushes a moby export ----------------------------------------------


@pytest.mark.parametrize(
    "options, docker_host, engine",
    [
        ({"addr": "docker-grpc:///run/e.sock"}, "unix:///local.sock", "unix:///run/e.sock"),
        ({"addr": "docker-grpc://10.0.0.5:2375", "context_host": "10.0.0.7"}, None,
         "tcp://10.0.0.5:2375"),
        ({"addr": "unix:///run/buildkit/bk.sock"}, "unix:///local.sock", "unix:///local.sock"),
        ({"addr": "unix:///run/buildkit/bk.sock"}, None, DEFAULT_ENGINE),  # no DOCKER_HOST
        ({"addr": "unix:///b.sock", "docker_host": "tcp://10.0.0.5:2375"}, None,
         "tcp://10.0.0.5:2375"),
        ({"addr": "tcp://127.0.0.1:1234", "docker_host": "tcp://10.0.0.5:2375"},
         "unix:///local.sock", "tcp://10.0.0.5:2375"),
    ],
)  # fmt: skip
def test_a_moby_export_is_pushed_by_the_engine_that_holds_it(
    monkeypatch, options, docker_host, engine
):
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    builder = BuildKitBuilder.from_settings(
        BuilderSettings(registry="127.0.0.1:5000", docker_host=docker_host, options=options)
    )
    assert builder.push_engine == engine


def test_a_tcp_buildkit_has_no_known_engine_without_docker_host():
    # The local engine would not have the image ("no such image"): the build refuses at
    # its start if the worker turns out to be moby (tests/test_buildkit_builder.py).
    builder = BuildKitBuilder.from_settings(
        BuilderSettings(
            registry="127.0.0.1:5000",
            docker_host="unix:///var/run/docker.sock",
            options={"addr": "tcp://127.0.0.1:1234"},
        )
    )
    assert builder.push_engine is None


@pytest.mark.parametrize(
    "options, message",
    [
        ({"addr": "tcp://127.0.0.1:1234", "exporter": "moby"}, "set --builder-opt docker_host="),
        ({"addr": "docker-grpc://", "docker_host": "tcp://h:2375"}, "names its Docker Engine"),
        ({"addr": "unix:///b.sock", "docker_host": "h:2375"}, "expected unix:///PATH"),
    ],
)
def test_bad_push_engine_options_fail_at_start(options, message):
    with pytest.raises(BuilderConfigError, match=re.escape(message)):
        BuildKitBuilder.from_settings(settings(**options))


# ---- an engine without /grpc: a real HTTP server that does not switch protocols --------


@pytest.mark.parametrize("status", [200, 404])
async def test_an_engine_that_does_not_upgrade_is_named_with_its_answer(tmp_path, status):
    async def grpc_endpoint(request: web.Request) -> web.Response:
        assert request.headers["Upgrade"] == "h2c"
        return web.Response(status=status, text="no BuildKit here")

    app = web.Application()
    app.router.add_post("/grpc", grpc_endpoint)
    runner = web.AppRunner(app)
    await runner.setup()
    socket = tmp_path / "engine.sock"
    await web.UnixSite(runner, str(socket)).start()
    builder = BuildKitBuilder.from_settings(settings(addr=f"docker-grpc://{socket}"))
    try:
        await builder.open()
        with pytest.raises(BuilderUnavailable) as caught:
            await builder.probe()
    finally:
        await builder.close()
        await runner.cleanup()
    reason = "OK" if status == 200 else "Not Found"
    assert str(caught.value) == (
        f"buildkit at docker-grpc://{socket} is not reachable: the Docker Engine at "
        f"unix://{socket} answered 'HTTP/1.1 {status} {reason}' to the /grpc upgrade "
        "(an engine without BuildKit, or an Engine API older than 1.31?)"
    )
