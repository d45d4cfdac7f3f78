"""A model cannot reach what it should not: its container (the check after a build, and
`cog infer`) has no network, and cog reaches it through a socket it will not be tricked
out of.

The proof is a model whose setup() tries the cog server, the Docker Engine's addresses,
the host's gateway, the host's other address and another container, and whose run()
answers with what it reached; its example expects nothing. The same probe, run in a
container on Docker's default bridge, reaches the server and the other container: the
probe works, so nothing reached means nothing could be.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from cog.builders import BuilderSettings
from cog.engine import Engine
from cog.engine.model_socket import ModelSocketConnector, SocketDirectory
from cog.events import NDJSON
from cog.server.app import ServerSettings, make_app
from cog.server.settings import IngestOptions
from tests.registry_helpers import form, package_bytes
from tests.services.docker import CPU_BASE
from tests.test_auth import other_address

PROBE = """
import json, socket

def reached(targets):
    found = []
    for name, kind, address in targets:
        try:
            if kind == "unix":
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(3)
                s.connect(address)
            else:
                s = socket.create_connection(tuple(address), timeout=3)
            s.close()
            found.append(name)
        except OSError:
            pass
    return found

def gateway():
    with open("/proc/net/route") as routes:
        for line in routes.read().splitlines()[1:]:
            fields = line.split()
            if fields[1] == "00000000":
                return socket.inet_ntoa(bytes.fromhex(fields[2])[::-1])
    return None
"""


def probe_targets(server_port: int, helper_ip: str) -> list:
    host = other_address()
    return [
        ["the cog server on docker0", "tcp", ["172.17.0.1", server_port]],
        ["the cog server on the host's address", "tcp", [host, server_port]],
        ["the engine's socket", "unix", "/var/run/docker.sock"],
        ["the engine's TCP port", "tcp", ["172.17.0.1", 2375]],
        ["the registry", "tcp", ["172.17.0.1", 5000]],
        ["another container", "tcp", [helper_ip, 8000]],
    ]


def model_source(targets: list, server_port: int) -> str:
    return (
        f"import cog\n{PROBE}\nTARGETS = {json.dumps(targets)}\nPORT = {server_port}\n\n"
        "class Model(cog.Model):\n"
        "    def setup(self):\n"
        "        targets = list(TARGETS)\n"
        "        via = gateway()\n"
        "        if via:\n"
        "            gateway_target = ['the host through its gateway', 'tcp', [via, PORT]]\n"
        "            targets.append(gateway_target)\n"
        "        self.found = reached(targets)\n"
        "        print('reached:', self.found)\n\n"
        '    @cog.input("anything", type=str, default="")\n'
        "    def run(self, anything):\n"
        "        return self.found\n"
    )


@pytest.fixture
async def helper_container(docker_engine, base_images):
    """Another container on Docker's default bridge, serving HTTP on port 8000: its IP."""
    async with Engine(docker_engine) as engine:
        container = await engine.docker.containers.create(
            {"Image": CPU_BASE, "Cmd": ["python3", "-m", "http.server", "8000"]},
            name=f"cog-test-helper-{uuid.uuid4().hex[:8]}",
        )
        try:
            await container.start()
            ip = (await container.show())["NetworkSettings"]["IPAddress"]
            deadline = time.monotonic() + 30
            while True:  # the host reaches the bridge: wait until it serves
                try:
                    _, writer = await asyncio.open_connection(ip, 8000)
                    writer.close()
                    await writer.wait_closed()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the helper container did not serve"
                    await asyncio.sleep(0.1)
            yield ip
        finally:
            await container.delete(force=True)


async def run_on_the_bridge(docker_engine: str, targets: list) -> list[str]:
    """The probe in a plain container on Docker's default bridge: what it reaches."""
    script = PROBE + f"\nimport json\nprint(json.dumps(reached({json.dumps(targets)})))\n"
    async with Engine(docker_engine) as engine:
        container = await engine.docker.containers.run(
            {"Image": CPU_BASE, "Cmd": ["python3", "-c", script]},
            name=f"cog-test-probe-{uuid.uuid4().hex[:8]}",
        )
        try:
            assert (await container.wait(timeout=120))["StatusCode"] == 0
            output = "".join(await container.log(stdout=True))
        finally:
            await container.delete(force=True)
    return json.loads(output.strip().splitlines()[-1])


@pytest.mark.integration
@pytest.mark.slow
async def test_a_model_reaches_nothing_in_the_check_or_cog_infer(
    aiohttp_client, tmp_path, registry, base_images, docker_engine, helper_container,
    no_leaked_containers,
):  # fmt: skip
    settings = ServerSettings(
        storage_url=f"file://{tmp_path / 'store'}",
        builder="docker",
        builder_settings=BuilderSettings(registry=registry),
        ingest=IngestOptions(check_timeout=120),
        tmp_dir=tmp_path / "spool",
    )
    # On every address, as a server people reach over the network listens.
    client = await aiohttp_client(make_app(settings), server_kwargs={"host": "0.0.0.0"})
    port = client.port
    targets = probe_targets(port, helper_container)

    # The probe works: from a container on the default bridge it reaches the server and
    # the other container.
    seen = await run_on_the_bridge(docker_engine, targets)
    assert {"the cog server on docker0", "another container"} <= set(seen), seen

    model = tmp_path / "probe"
    model.mkdir()
    (model / "cog.yaml").write_text(
        "name: cog-test/probe\nmodel: infer.py:Model\nenvironment:\n  python_version: '3.11'\n"
        "examples:\n  - input: {}\n    output: '[]'\n"
    )
    (model / "infer.py").write_text(model_source(targets, port))
    data, _ = package_bytes(model)
    response = await client.post("/v1/packages/upload", data=form(data), headers={"Accept": NDJSON})
    events = [json.loads(line) async for line in response.content if line.strip()]
    lines = [e.get("line", "") for e in events]
    assert any(line.endswith("reached: []") for line in lines), events[-6:]
    assert events[-1]["type"] == "package", events[-1]

    # `cog infer` runs it the same way.
    from cog.cli.infer import run_inference

    image = events[-1]["package"]["Artifacts"][0]["URI"]
    output = await run_inference(image, [], docker_host=docker_engine)
    assert json.loads(output.text) == []
    subprocess.run(["docker", "rmi", image], capture_output=True)
    # No socket directory is left behind by either.
    assert not list((tmp_path / "spool").rglob("cog-model-*"))


# -- the socket cog talks to the model through ------------------------------------------


async def serve_on(path: Path) -> web.AppRunner:
    app = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="the model")

    app.router.add_get("/ping", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    return runner


async def test_cog_connects_to_the_models_socket_and_never_through_a_link(tmp_path):
    directory = SocketDirectory(tmp_path)
    elsewhere = tmp_path / "host-service.sock"
    runner = await serve_on(directory.socket)
    other = await serve_on(elsewhere)
    try:
        # A new connection each request, as a later request of the check may need.
        connector = ModelSocketConnector(directory.socket, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as s:
            async with s.get("http://model/ping") as response:
                assert await response.text() == "the model"
            # The model's code puts a link to a socket of the host where its own was.
            os.unlink(directory.socket)
            os.symlink(elsewhere, directory.socket)
            with pytest.raises(aiohttp.ClientConnectorError, match="is not a socket"):
                async with s.get("http://model/ping"):
                    pass
    finally:
        await runner.cleanup()
        await other.cleanup()
    # Only its owner can reach into the directory; the model's part is open to the model.
    assert oct(directory.path.stat().st_mode & 0o777) == "0o700"
    assert oct(directory.shared.stat().st_mode & 0o777) == "0o777"
    directory.remove()
    assert not directory.path.exists()


@pytest.mark.integration
async def test_an_engine_on_another_machine_is_said_so(
    docker_engine, base_images, tmp_path, monkeypatch, no_leaked_containers
):
    """An engine elsewhere cannot see the socket's directory, and refuses its mount. No
    second machine here: the directory's path is made one this engine does not have
    (a stand-in for the one fault a local engine cannot produce)."""
    from cog.engine import EngineError
    from cog.engine.containers import ModelContainer

    mount = SocketDirectory.mount

    def mount_elsewhere(self):
        return {**mount(self), "Source": f"/nonexistent/{uuid.uuid4().hex}"}

    monkeypatch.setattr(SocketDirectory, "mount", mount_elsewhere)
    image = "cog-test/labelled:1"  # cog runs only images it built: one that says it was
    subprocess.run(
        ["docker", "build", "-q", "-t", image, "-"],
        input=f"FROM {CPU_BASE}\nLABEL org.cog-models.cog-version=test\n".encode(),
        check=True,
        capture_output=True,
    )
    async with Engine(docker_engine) as engine:
        with pytest.raises(EngineError) as caught:
            async with ModelContainer(engine, image, role="infer", socket_root=tmp_path):
                pass
    assert str(caught.value).startswith(
        f"the Docker Engine at {docker_engine} is not on this machine: cog runs models with "
        "no network"
    )
    assert list(tmp_path.iterdir()) == []
