"""The whole flow with real parts: upload -> store -> build -> push -> check -> record,
through the real app (and through real `cog` processes), on a real Docker engine and
registry."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest

from cog.builders import BuilderSettings
from cog.builders.docker import DockerBuilder
from cog.events import NDJSON
from cog.server.app import ServerSettings, make_app
from cog.server.settings import IngestOptions
from tests.registry_helpers import (
    EXAMPLES,
    form,
    nothing_spooled,
    package_bytes,
    upload_then_hang_up,
)
from tests.services.docker import containers
from tests.test_cli import COG, cog_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def server_settings(
    tmp_path: Path, registry: str, builder: BuilderSettings | None = None, **build
) -> ServerSettings:
    return ServerSettings(
        storage_url=f"file://{tmp_path / 'store'}",
        builder="docker",
        builder_settings=builder or BuilderSettings(registry=registry),
        ingest=IngestOptions(check_timeout=120, **build),
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


def model_dir(
    tmp_path: Path,
    *,
    output: str = "HI",
    setup: str = "pass",
    extra: str = "",
    run: str = "return text.upper()",
    examples: bool = True,
) -> Path:
    root = tmp_path / "model"
    root.mkdir(parents=True, exist_ok=True)
    (root / "cog.yaml").write_text(
        "name: test/upper\nmodel: infer.py:Model\n"
        f"environment:\n  python_version: '3.11'\n{extra}"
        + (f"examples:\n  - input: {{text: hi}}\n    output: {output}\n" if examples else "")
    )
    (root / "infer.py").write_text(
        "import cog\n\nclass Model(cog.Model):\n"
        f"    def setup(self):\n        {setup}\n\n"
        '    @cog.input("text", type=str)\n'
        f"    def run(self, text):\n        {run}\n"
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
    build_lines = [e["line"].strip() for e in rebuilt if e.get("stage") == "build"]
    # The same package, so every step is cached: the runtime's pip install and the model's
    # files too (the context tar is byte-for-byte the same).
    for step in ("pip install", "COPY package/"):
        at = next(
            i for i, line in enumerate(build_lines) if line.startswith("Step ") and step in line
        )
        assert build_lines[at + 1] == "---> Using cache", build_lines[at : at + 3]
    assert not any(line.startswith("---> Running in") for line in build_lines)
    assert rebuilt[-1]["type"] == "package" and rebuilt[-1]["package"]["Status"] == "ready"


async def test_failing_example_keeps_the_package_failed(client, tmp_path, no_leaked_containers):
    data, package_id = package_bytes(model_dir(tmp_path, output="nope"))
    events = await stream_upload(client, data)
    final = events[-1]
    assert final["type"] == "error" and final["status"] == 422
    assert "example 1" in final["message"] and "'HI'" in final["message"]
    assert final["package"]["Status"] == "failed"
    failed = [e for e in events if e.get("stage") == "error" and "Build failed" in e["line"]]
    assert failed and failed[0]["target"] == "cpu"  # the check of the CPU image failed

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


async def assert_failed_at(client, package_id: str, step: str, *needles: str) -> dict:
    """The package is kept as failed, its Error names the step, and its build log (read
    back from storage) has the failure's words."""
    doc = await (await client.get(f"/v1/packages/{package_id}")).json()
    assert doc["Status"] == "failed", doc
    assert f"(step: {step}" in doc["Error"], doc["Error"]
    response = await client.get(f"/v1/packages/{package_id}/log")
    assert response.status == 200
    log = [json.loads(line) for line in (await response.read()).splitlines()]
    text = json.dumps(log)
    assert log[-1]["type"] == "error" and log[-1]["package"]["Status"] == "failed"
    for needle in needles:
        assert needle in text, needle
    return doc


async def test_setup_failure_is_reported_with_the_models_error(
    client, tmp_path, no_leaked_containers
):
    data, package_id = package_bytes(
        model_dir(tmp_path, setup="raise ValueError('no weights here')")
    )
    events = await stream_upload(client, data)
    assert events[-1]["type"] == "error" and events[-1]["status"] == 422
    everything = json.dumps(events)
    assert "setup failed" in everything and "no weights here" in everything
    await assert_failed_at(client, package_id, "test: setup", "no weights here")
    # The traceback went out live as the model printed it: not a second time after it.
    # (The runtime tags what the model's setup writes to stderr: "... [setup] stderr: ".)
    lines = [e["line"] for e in events if e["type"] == "log"]
    written = [line.rsplit("stderr: ", 1)[-1] for line in lines if line.startswith("model: ")]
    assert written.count("ValueError: no weights here") == 1, lines
    assert "Last lines of its output:" not in lines


@pytest.mark.parametrize("burst", [900, 3000])
async def test_every_line_the_model_printed_is_in_the_build_log_or_counted(
    client, tmp_path, no_leaked_containers, burst
):
    """The model's output is a stream of its own, read beside /health-check: a burst at
    the end of setup() arrives after the model says it is ready. The check reads that
    stream to its end (the container stopped) before it ends, so no line is lost; more
    lines than are kept between two reads (1,000) are counted, in a line that says so."""
    setup = f"[print(f'line {{n}} of the burst', flush=True) for n in range({burst})]"
    data, _ = package_bytes(model_dir(tmp_path, setup=setup, examples=False))
    events = await stream_upload(client, data)
    assert events[-1]["type"] == "package", events[-1]
    lines = [e["line"] for e in events if e["type"] == "log" and e.get("stage") == "test"]
    # Walk the log: each burst line is shown, or falls in a gap that a "not shown" line
    # counts. The count is of every line the model's container printed there, so it may
    # also take in a few of the inference server's own lines (it logs its start while
    # the model's worker, started first, sets up): at least the burst lines missing, at
    # most a handful more.
    shown, gaps, last, counted = 0, [], -1, None
    for line in lines:
        if "output not shown" in line:
            counted = int(line.split("(", 1)[1].split()[0])
        elif match := re.search(r"line (\d+) of the burst", line):
            number = int(match[1])
            missing = number - last - 1
            assert missing == 0 or counted is not None, f"lines {last + 1}-{number - 1} lost"
            if counted is not None:
                gaps.append((missing, counted))
                counted = None
            shown, last = shown + 1, number
    assert last == burst - 1, "the last line of the burst is shown"
    assert all(missing <= counted <= missing + 10 for missing, counted in gaps), gaps
    assert shown + sum(missing for missing, _ in gaps) == burst
    assert bool(gaps) == (burst > 1000)


@pytest.mark.parametrize(
    ("extra", "step", "needle"),
    [
        # Steps 1-7 are the base stage (the Python check, the image settings, the
        # inference server's environment), 8-10 the cog stage, 11 the image's FROM: the
        # same for every package. The package's own steps begin at 12.
        ("  system_packages: [no-such-package-cog-test]\n", "Step 12/", "no-such-package-cog-test"),
        (
            "  python_packages: ['cog-no-such-dist-xyz==0.0.1']\n",
            "Step 12/",
            "cog-no-such-dist-xyz",
        ),
    ],
    ids=["system-package", "pip-requirement"],
)
async def test_bad_packages_fail_the_build_naming_the_step(
    client, tmp_path, no_leaked_containers, extra, step, needle
):
    data, package_id = package_bytes(model_dir(tmp_path, extra=extra))
    events = await stream_upload(client, data)
    final = events[-1]
    assert final["type"] == "error" and final["status"] == 422, final
    doc = await assert_failed_at(client, package_id, step, needle)
    assert ("apt-get install" if "system" in extra else "pip install") in doc["Error"]


async def test_unreachable_docker_engine_is_503_and_failed(
    aiohttp_client, tmp_path, registry, no_leaked_containers
):
    builder = BuilderSettings(registry=registry, docker_host="unix:///nonexistent/docker.sock")
    client = await aiohttp_client(make_app(server_settings(tmp_path, registry, builder)))
    data, package_id = package_bytes(model_dir(tmp_path))
    events = await stream_upload(client, data)
    assert events[-1]["type"] == "error" and events[-1]["status"] == 503
    await assert_failed_at(client, package_id, "base image", "unix:///nonexistent/docker.sock")


async def test_a_base_image_the_engine_lacks_is_the_servers_problem(
    aiohttp_client, tmp_path, registry, no_leaked_containers
):
    """Not the package's fault (503, not 422), and it says what to do."""
    base = f"{registry}/cog-test/no-such-base:{uuid.uuid4().hex[:8]}"
    builder = BuilderSettings(registry=registry, base_images={"cpu": base})
    client = await aiohttp_client(make_app(server_settings(tmp_path, registry, builder)))
    data, package_id = package_bytes(model_dir(tmp_path))
    events = await stream_upload(client, data)
    final = events[-1]
    assert final["type"] == "error" and final["status"] == 503
    assert final["message"].startswith(
        f"no base image for Python 3.11: {base} is not on the Docker Engine (pulling it failed: "
    )
    assert final["message"].endswith(
        "; build it (contrib/setup-machine.sh builds python:3.9-slim, python:3.11-slim and "
        "python:3.13-slim) or give the server one with --base-image cpu=IMAGE (step: base image)"
    )
    await assert_failed_at(client, package_id, "base image", base)


async def test_an_image_never_runs_another_python_than_its_package_asks_for(
    aiohttp_client, tmp_path, registry, base_images, no_leaked_containers
):
    """A base image of the wrong Python (a template without {python_version}): the build
    fails at once naming both Pythons, and no image is tagged or pushed with a label that
    says 3.8 over a Python 3.11."""
    builder = BuilderSettings(registry=registry, base_images={"cpu": base_images["cpu"]})
    client = await aiohttp_client(make_app(server_settings(tmp_path, registry, builder)))
    root = model_dir(tmp_path)
    (root / "cog.yaml").write_text((root / "cog.yaml").read_text().replace("'3.11'", "'3.8'"))
    data, package_id = package_bytes(root)
    events = await stream_upload(client, data)
    final = events[-1]
    assert final["type"] == "error" and final["status"] == 422, final
    assert re.fullmatch(
        rf"python_version is 3\.8, but the base image {re.escape(base_images['cpu'])} runs "
        r"Python 3\.11\.\d+; give the server a base image with Python 3\.8 "
        r"\(--base-image cpu=IMAGE\) \(step: Step 3/\d+ : RUN python -c .*\.\.\.\)",
        final["message"],
    ), final["message"]
    assert not any("pip install" in e.get("line", "") for e in events)  # it failed first
    # The engine's red around the step's stderr is not in the log; nor is the output again.
    lines = [e["line"] for e in events if e["type"] == "log"]
    assert not any("\x1b" in line for line in lines)
    assert "Last lines of its output:" not in lines
    doc = await assert_failed_at(client, package_id, "Step 3/", "runs Python 3.11")
    assert doc["Artifacts"] == []
    image = f"{registry}/test/upper:{package_id[:12]}"
    assert subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode
    with urllib.request.urlopen(f"http://{registry}/v2/test/upper/tags/list") as response:
        assert package_id[:12] not in (json.load(response).get("tags") or [])


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
    await upload_then_hang_up(client, data, b"apt-get")
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

        # A package whose build fails: non-zero exit, the failing step and its output.
        broken = model_dir(
            tmp_path / "broken", extra="  system_packages: [no-such-package-cog-test]\n"
        )
        built = cog("build", cwd=broken)
        assert built.returncode == 1, built.stdout + built.stderr
        assert "no-such-package-cog-test" in built.stdout
        assert built.stderr.startswith("cog: error: docker build failed")
        assert "apt-get install" in built.stderr and "Traceback" not in built.stderr

        # Built and pushed, then its example failed: `cog infer` runs it, with a warning.
        wrong = model_dir(tmp_path / "wrong", output="nope")
        built = cog("build", cwd=wrong)
        assert built.returncode == 1
        _, package_id = package_bytes(wrong)  # the same zip as `cog build` made
        ran = cog("infer", package_id[:12], "-i", "text=hi", cwd=elsewhere)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout == "HI\n"
        assert ran.stderr.startswith(f"cog: warning: package {package_id[:12]} failed: example 1")
        assert ran.stderr.endswith("; running its image anyway\n")
        assert len(ran.stderr.splitlines()) == 1

        # A model whose process dies during run(): one error, exit 1, no container left.
        dying = model_dir(tmp_path / "dying", run="import os; os._exit(3)", examples=False)
        built = cog("build", cwd=dying)
        assert built.returncode == 0, built.stdout + built.stderr
        before = containers()
        died = cog("infer", built.stdout.split()[-1][:12], "-i", "hi", cwd=elsewhere)
        assert died.returncode == 1
        assert died.stderr.startswith("cog: error: ") and "Traceback" not in died.stderr
        assert "the model's process exited (code 3)" in died.stderr
        assert containers() <= before


class CountingDockerBuilder(DockerBuilder):
    """The real Docker builder, counting the builds it is asked for."""

    builds = 0

    def build(self, request):
        CountingDockerBuilder.builds += 1
        return super().build(request)


async def test_ten_parallel_uploads_of_a_new_package_make_one_build(
    aiohttp_client, tmp_path, registry, base_images, no_leaked_containers
):
    """The sweep's reproduction: ten at once, with build streams. One build; the nine
    others follow it and end with the same package event; nothing left in the spool."""
    settings = server_settings(tmp_path, registry)
    builder = CountingDockerBuilder(settings.builder_settings)
    CountingDockerBuilder.builds = 0
    client = await aiohttp_client(make_app(settings, builder=builder))
    data, _ = package_bytes(model_dir(tmp_path, extra=f"# {uuid.uuid4().hex}\n"))
    results = await asyncio.gather(*(stream_upload(client, data) for _ in range(10)))
    finals = [events[-1] for events in results]
    assert all(final["type"] == "package" for final in finals), finals
    assert {json.dumps(final, sort_keys=True) for final in finals} == {
        json.dumps(finals[0], sort_keys=True)
    }
    assert finals[0]["package"]["Status"] == "ready"
    assert CountingDockerBuilder.builds == 1
    following = [
        e for events in results for e in events if "following that build" in e.get("message", "")
    ]
    assert len(following) == 9
    await nothing_spooled(tmp_path / "spool")
