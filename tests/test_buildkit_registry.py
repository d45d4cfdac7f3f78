"""The whole flow with the BuildKit builder: the real app (and real `cog` processes) building
through the Docker Engine's embedded BuildKit, pushing to a real registry, checking."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from cog.builders import BuilderSettings
from cog.events import NDJSON
from cog.server.app import ServerSettings, make_app
from cog.server.settings import IngestOptions
from tests.registry_helpers import EXAMPLES, form, package_bytes, upload_then_hang_up
from tests.test_buildkit_builder import (
    SlowBuilder,
    engine_addr,
    eventually,
    model_dir,
    registry_digest,
    running,
)
from tests.test_cli import COG, cog_server

__all__ = ["engine_addr"]  # a fixture shared with the builder tests
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def server_settings(tmp_path: Path, registry: str, addr: str) -> ServerSettings:
    return ServerSettings(
        storage_url=f"file://{tmp_path / 'store'}",
        builder="buildkit",
        builder_settings=BuilderSettings(registry=registry, options={"addr": addr}),
        ingest=IngestOptions(check_timeout=120),
        tmp_dir=tmp_path / "spool",
    )


async def upload(client, data: bytes) -> list[dict]:
    response = await client.post("/v1/packages/upload", data=form(data), headers={"Accept": NDJSON})
    assert response.status == 200
    return [json.loads(line) async for line in response.content if line.strip()]


@pytest.fixture
async def client(aiohttp_client, tmp_path, registry, base_images, engine_addr):
    app = make_app(server_settings(tmp_path, registry, engine_addr))
    return await aiohttp_client(app, server_kwargs={"handler_cancellation": True})


async def test_upload_builds_with_buildkit_pushes_and_checks(
    client, registry, engine_addr, no_leaked_containers
):
    data, package_id = package_bytes(EXAMPLES / "hello")
    events = await upload(client, data)
    logs = [e for e in events if e["type"] == "log"]
    assert {("cpu", "build"), ("cpu", "push"), ("cpu", "test")} <= {
        (e.get("target"), e["stage"]) for e in logs
    }
    build_lines = [e["line"] for e in logs if e["stage"] == "build"]
    assert build_lines[0].startswith(f"buildkit at {engine_addr}: BuildKit ")
    # "[stage-2 N/M]": BuildKit names the stage of a Dockerfile with several
    step = r"\[(?:[\w.-]+ )?\d+/\d+\]"
    assert any(re.fullmatch(rf"#\d+ {step} COPY package/ /src/", line) for line in build_lines)
    assert any(re.match(r"Example 3: ok", e["line"]) for e in logs)
    final = events[-1]
    assert final["type"] == "package", final
    doc = final["package"]
    assert doc["Status"] == "ready"
    [artifact] = doc["Artifacts"]
    assert artifact["Target"] == "docker-cpu"
    assert artifact["URI"] == f"{registry}/examples/hello:{package_id[:12]}"
    assert artifact["Digest"] == registry_digest(registry, artifact["URI"])


async def test_failing_step_keeps_the_package_failed_with_its_log(client, engine_addr, tmp_path):
    root = model_dir(tmp_path, yaml_extra="  system_packages: [no-such-package-cog-test]\n")
    data, package_id = package_bytes(root)
    events = await upload(client, data)
    final = events[-1]
    assert final["type"] == "error" and final["status"] == 422
    assert final["message"].startswith(f"buildkit at {engine_addr}: ")
    assert "apt-get install" in final["message"]  # the step, named
    assert final["package"]["Status"] == "failed"

    doc = await (await client.get(f"/v1/packages/{package_id}")).json()
    assert doc["Status"] == "failed" and "exit code: 100" in doc["Error"]
    log = (await (await client.get(f"/v1/packages/{package_id}/log")).read()).decode()
    assert "Unable to locate package no-such-package-cog-test" in log


async def test_a_build_the_client_left_says_in_its_log_which_step_was_cancelled(
    aiohttp_client, tmp_path, registry, base_images, engine_addr, caplog
):
    settings = server_settings(tmp_path, registry, engine_addr)
    builder = SlowBuilder.from_settings(settings.builder_settings)
    builder.marker = uuid.uuid4().hex
    app = make_app(settings, builder=builder)
    client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
    data, package_id = package_bytes(EXAMPLES / "hello")
    await upload_then_hang_up(client, data, f"start-{builder.marker}".encode())
    await eventually(lambda: not running(builder.marker), "stopped in BuildKit")
    for _ in range(100):
        doc = await (await client.get(f"/v1/packages/{package_id}")).json()
        if doc["Status"] != "building":
            break
        await asyncio.sleep(0.2)
    assert doc["Status"] == "failed"
    stored = await (await client.get(f"/v1/packages/{package_id}/log")).read()
    log = [json.loads(line) for line in stored.splitlines()]
    [cancelled] = [e["line"] for e in log if "build cancelled" in e.get("line", "")]
    assert cancelled.startswith(f"buildkit at {engine_addr}: build cancelled during step #")
    assert f"RUN echo start-{builder.marker}" in cancelled
    assert doc["Error"] == cancelled  # the builder's own account is the stored error
    # The request ended as the cancellation it was (499), not an error aiohttp logs.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_unreachable_buildkit_is_503(aiohttp_client, tmp_path, registry):
    # The server starts without BuildKit; a build then says which BuildKit it could not reach.
    app = make_app(server_settings(tmp_path, registry, "tcp://127.0.0.1:1"))
    client = await aiohttp_client(app)
    data, package_id = package_bytes(EXAMPLES / "hello")
    response = await client.post("/v1/packages/upload", data=form(data))
    assert response.status == 503
    assert (await response.json())["error"].startswith(
        "buildkit at tcp://127.0.0.1:1 is not reachable"
    )
    doc = await (await client.get(f"/v1/packages/{package_id}")).json()
    assert doc["Status"] == "failed"


def test_cog_build_through_a_buildkit_server(tmp_path, registry, base_images, engine_addr):
    """As an operator and a user would: `cog server --builder buildkit`, `cog build`."""
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "NO_COLOR": "1", "PATH": "/usr/bin:/bin"}
    options = ["--docker-registry", registry, "--builder", "buildkit"]
    with cog_server(tmp_path, env, *options, "--buildkit-addr", engine_addr) as url:

        def cog(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
            return subprocess.run(
                [COG, *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
            )

        assert cog("remote", "set", url, cwd=tmp_path).returncode == 0
        built = cog("build", str(EXAMPLES / "hello"), cwd=tmp_path)
        assert built.returncode == 0, built.stdout + built.stderr
        step = r"\[(?:[\w.-]+ )?\d+/\d+\]"
        assert re.search(rf"\[cpu/build\] #\d+ {step} COPY package/", built.stdout)
        assert built.stdout.strip().splitlines()[-1].startswith("--> Built and pushed ")

        broken = model_dir(tmp_path, yaml_extra="  system_packages: [no-such-package-cog-x]\n")
        failed = cog("build", str(broken), cwd=tmp_path)
        assert failed.returncode != 0
        assert "Unable to locate package no-such-package-cog-x" in failed.stdout
        assert f"buildkit at {engine_addr}" in failed.stdout + failed.stderr
