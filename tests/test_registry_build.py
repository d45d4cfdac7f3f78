"""The whole flow with real parts: upload -> store -> build -> push -> check -> record,
through the real app (and through real `cog` processes), on a real Docker engine and
registry."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from cog.builders import BuilderSettings
from cog.events import NDJSON
from cog.registry.app import ServerSettings, make_app
from cog.registry.builds import BuildOptions
from tests.registry_helpers import EXAMPLES, form, package_bytes
from tests.test_cli import COG, cog_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def server_settings(tmp_path: Path, registry: str, **build) -> ServerSettings:
    return ServerSettings(
        storage_url=f"file://{tmp_path / 'store'}",
        builder="docker",
        builder_settings=BuilderSettings(registry=registry),
        build=BuildOptions(registry=registry, check_timeout=120, **build),
        tmp_dir=tmp_path / "spool",
    )


@pytest.fixture
async def client(aiohttp_client, tmp_path, registry, base_images):
    app = make_app(server_settings(tmp_path, registry))
    return await aiohttp_client(app, server_kwargs={"handler_cancellation": True})


async def stream_upload(client, data: bytes) -> list[dict]:
    response = await client.post("/v1/packages/upload", data=form(data), headers={"Accept": NDJSON})
    assert response.status == 200
    return [json.loads(line) async for line in response.content if line.strip()]


def model_dir(tmp_path: Path, *, output: str = "HI", setup: str = "pass", extra: str = "") -> Path:
    root = tmp_path / "model"
    root.mkdir(exist_ok=True)
    (root / "cog.yaml").write_text(
        "name: test/upper\nmodel: infer.py:Model\n"
        f"environment:\n  python_version: '3.11'\n{extra}"
        f"examples:\n  - input: {{text: hi}}\n    output: {output}\n"
    )
    (root / "infer.py").write_text(
        "import cog\n\nclass Model(cog.Model):\n"
        f"    def setup(self):\n        {setup}\n\n"
        '    @cog.input("text", type=str)\n'
        "    def run(self, text):\n        return text.upper()\n"
    )
    return root


async def test_upload_builds_pushes_and_checks_live(client, registry, no_leaked_containers):
    data, package_id = package_bytes(EXAMPLES / "hello")
    events = await stream_upload(client, data)
    stages = {(e.get("target"), e.get("stage")) for e in events if e["type"] == "log"}
    assert {("cpu", "build"), ("cpu", "push"), ("cpu", "test")} <= stages
    assert any("Example 3: ok" in e.get("line", "") for e in events)
    final = events[-1]
    assert final["type"] == "package", final
    doc = final["package"]
    assert doc["Status"] == "ready"
    assert doc["Artifacts"] == [
        {
            "Target": "docker-cpu",
            "URI": f"{registry}/examples/hello:{package_id[:12]}",
            "Digest": doc["Artifacts"][0]["Digest"],
        }
    ]
    assert doc["Artifacts"][0]["Digest"].startswith("sha256:")
    assert set(doc["Signature"]["arguments"]) == {"name", "punctuation", "times", "shout"}

    # The log is kept, and the same package again is answered at once, without a build.
    log = await client.get(f"/v1/packages/{package_id[:12]}/log")
    kept = [json.loads(line) for line in (await log.read()).splitlines()]
    # Everything from the build on, exactly as streamed (the upload's own statuses before).
    assert len(kept) > 10
    assert kept == events[-len(kept) :]
    again = await stream_upload(client, data)
    assert [e["type"] for e in again] == ["status", "status", "package"]
    assert "already stored and built" in again[1]["message"]

    # Built again on request (e.g. after a registry outage): from storage, cached layers.
    response = await client.post(f"/v1/packages/{package_id[:9]}/build", headers={"Accept": NDJSON})
    rebuilt = [json.loads(line) async for line in response.content if line.strip()]
    assert rebuilt[0]["message"] == "Fetching package from storage"
    assert any("Using cache" in e.get("line", "") for e in rebuilt)
    assert rebuilt[-1]["type"] == "package" and rebuilt[-1]["package"]["Status"] == "ready"


async def test_failing_example_keeps_the_package_failed(client, tmp_path, no_leaked_containers):
    data, package_id = package_bytes(model_dir(tmp_path, output="nope"))
    events = await stream_upload(client, data)
    final = events[-1]
    assert final["type"] == "error" and final["status"] == 422
    assert "example 1" in final["message"] and "'HI'" in final["message"]
    assert final["package"]["Status"] == "failed"
    assert any(e.get("stage") == "error" and "Build failed" in e["line"] for e in events)

    doc = await (await client.get(f"/v1/packages/{package_id}")).json()
    assert doc["Status"] == "failed" and "example 1" in doc["Error"]
    assert (await client.get(f"/v1/packages/{package_id}.zip")).status == 200
    log = await (await client.get(f"/v1/packages/{package_id}/log")).read()
    assert b"example 1" in log

    # Without NDJSON the same failure is a 422 JSON error carrying the record.
    response = await client.post("/v1/packages/upload", data=form(data))
    assert response.status == 422
    body = await response.json()
    assert "example 1" in body["error"] and body["package"]["Status"] == "failed"


async def test_setup_failure_is_reported_with_the_models_error(client, tmp_path):
    data, _ = package_bytes(model_dir(tmp_path, setup="raise ValueError('no weights here')"))
    events = await stream_upload(client, data)
    assert events[-1]["type"] == "error"
    everything = json.dumps(events)
    assert "setup failed" in everything and "no weights here" in everything


async def test_unreachable_registry_is_503_and_failed(
    aiohttp_client, tmp_path, base_images, no_leaked_containers
):
    app = make_app(server_settings(tmp_path, "127.0.0.1:1"))
    client = await aiohttp_client(app)
    data, package_id = package_bytes(EXAMPLES / "hello")
    response = await client.post("/v1/packages/upload", data=form(data))
    assert response.status == 503
    assert "127.0.0.1:1" in (await response.json())["error"]
    doc = await (await client.get(f"/v1/packages/{package_id}")).json()
    assert doc["Status"] == "failed"


async def test_client_going_away_cancels_the_build(client, tmp_path, no_leaked_containers):
    root = model_dir(tmp_path, extra="  system_packages: [cowsay]\n")
    data, package_id = package_bytes(root)
    session = aiohttp.ClientSession()
    try:
        response = await session.post(
            client.make_url("/v1/packages/upload"), data=form(data), headers={"Accept": NDJSON}
        )
        async for line in response.content:
            if b"apt-get" in line:
                break
        response.close()  # the user pressed Ctrl-C
    finally:
        await session.close()
    for _ in range(100):
        await asyncio.sleep(0.2)
        doc = await (await client.get(f"/v1/packages/{package_id}")).json()
        if doc["Status"] != "building":
            break
    assert doc["Status"] == "failed"
    assert doc["Error"].startswith("docker: build cancelled while building the CPU image")


def test_cog_build_and_infer_as_a_user(tmp_path, registry, base_images):
    """The seed's whole story with real processes: server, build, list, infer elsewhere."""
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "NO_COLOR": "1", "PATH": "/usr/bin:/bin"}
    with cog_server(tmp_path, env, "--docker-registry", registry) as url:

        def cog(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
            return subprocess.run(
                [COG, *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
            )

        assert cog("remote", "set", url).returncode == 0
        model = tmp_path / "thumbnail"
        shutil.copytree(EXAMPLES / "thumbnail", model)
        built = cog("build", cwd=model)
        assert built.returncode == 0, built.stdout + built.stderr
        assert "[cpu/build]" in built.stdout and "[cpu/test]" in built.stdout
        last = built.stdout.strip().splitlines()[-1]
        assert last.startswith("--> Built and pushed ")
        package_id = last.split()[-1]

        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        shutil.copy(model / "input.png", elsewhere / "photo.png")
        ran = cog("infer", package_id[:8], "-i", "@photo.png", "-i", "width=40", cwd=elsewhere)
        assert ran.returncode == 0, ran.stderr
        output = elsewhere / "output.png"
        assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        failed = cog("infer", package_id[:8], "-i", "width=5000", cwd=elsewhere)
        assert failed.returncode == 1
        assert "width" in failed.stderr and "Traceback" not in failed.stderr
