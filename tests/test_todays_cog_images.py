"""Models written for today's Cog, unchanged, built by a real `cog server` with `cog build`,
checked, shown, and then run as their clients run them: `/predictions` on the image, and
`cog predict`/`cog infer`. Two images, each built once for the module: the kitchen (every
input type, an object output with files) and the streamer (an async runner whose packages
Cog's own runtime would fight with: aiohttp 3.8.6, pydantic 1.10)."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from cog.engine import Engine
from cog.engine.containers import ModelContainer
from tests.test_cli import COG, cog_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FIXTURES = Path(__file__).resolve().parent / "fixtures"
WAIT = 120.0


@pytest.fixture(scope="module")
def built(tmp_path_factory, registry, base_images):
    """A cog server, and the two fixture models built by it with `cog build`."""
    tmp_path = tmp_path_factory.mktemp("today")
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "NO_COLOR": "1", "PATH": "/usr/bin:/bin"}
    with cog_server(tmp_path, env, "--docker-registry", registry) as url:

        def cog(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
            return subprocess.run(
                [COG, *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=900
            )

        assert cog("remote", "set", url).returncode == 0
        packages = {}
        for name in ("kitchen", "stream"):
            model = tmp_path / name
            shutil.copytree(FIXTURES / name, model)
            result = cog("build", cwd=model)
            assert result.returncode == 0, result.stdout + result.stderr
            package_id = result.stdout.strip().splitlines()[-1].split()[-1]
            shown = json.loads(cog("show", package_id, "--json").stdout)
            packages[name] = {"id": package_id, "log": result.stdout, "doc": shown}
        yield cog, packages, tmp_path


def image(packages, name) -> str:
    return packages[name]["doc"]["Artifacts"][0]["URI"]


async def running(reference):
    engine = Engine()
    await engine.__aenter__()
    model = ModelContainer(engine, reference, role="check", lifetime=600)
    await model.__aenter__()
    async for _ in model.wait_ready(WAIT):
        pass
    return engine, model


async def stop(engine, model):
    await model.__aexit__(None, None, None)
    await engine.__aexit__(None, None, None)


def data_uri(data: bytes, content_type: str) -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode()}"


def test_the_build_reads_stores_and_checks_them(built):
    cog, packages, _ = built
    kitchen, stream = packages["kitchen"], packages["stream"]
    assert "[cpu/test] Prediction with the defaults: ok" in kitchen["log"]
    assert "setting up the kitchen" in kitchen["log"]
    assert (
        "[cpu/test] Required input without a default (prompt): checked that the model sets up"
        in stream["log"]
    )
    doc = kitchen["doc"]
    assert doc["Status"] == "ready"
    assert doc["Config"]["Model"] == "predict.py:Predictor"
    assert doc["Config"]["Format"] == "predict"
    assert doc["Config"]["EnvironmentVariables"] == ["KITCHEN_GREETING=hello"]
    assert doc["Signature"]["kind"] == "predictor"
    assert doc["Signature"]["output"]["name"] == "Output"
    assert stream["doc"]["Config"]["Concurrency"] == 4
    shown = cog("show", stream["id"][:12]).stdout
    assert "Output:   ConcatenateIterator[str]" in shown
    assert "Concurrency: 4" in shown
    assert "prompt (str)  Words to stream back" in shown


def test_the_models_environment_holds_its_packages_and_nothing_of_cogs(built):
    _, packages, _ = built

    def python(reference, code):
        return subprocess.run(
            ["docker", "run", "--rm", "--entrypoint", "python", reference, "-c", code],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    found = (
        "import importlib.util as u; "
        "print([m for m in ('aiohttp', 'attrs', 'yaml', 'pydantic') if u.find_spec(m)])"
    )
    assert python(image(packages, "kitchen"), found) == "[]"
    versions = "import aiohttp, pydantic; print(aiohttp.__version__, pydantic.VERSION)"
    assert python(image(packages, "stream"), versions) == "3.8.6 1.10.13"
    assert (
        python(image(packages, "kitchen"), "print(open('/opt/built-by-run.txt').read())") == "built"
    )
    labels = json.loads(
        subprocess.run(
            [
                "docker",
                "image",
                "inspect",
                "--format",
                "{{json .Config.Labels}}",
                image(packages, "kitchen"),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert labels["run.cog.version"]
    assert json.loads(labels["run.cog.config"])["predict"] == "predict.py:Predictor"
    schema = json.loads(labels["run.cog.openapi_schema"])
    assert schema["components"]["schemas"]["Input"]["properties"]["token"]["x-cog-secret"] is True


async def test_predictions_on_the_kitchen_image(built):
    _, packages, _ = built
    engine, model = await running(image(packages, "kitchen"))
    try:
        async with aiohttp.ClientSession() as client:
            health = await (await client.get(f"{model.url}/health-check")).json()
            assert health["status"] == "READY"
            assert health["setup"]["logs"] == "setting up the kitchen\n"
            response = await client.post(
                f"{model.url}/predictions",
                json={
                    "input": {
                        "text": "img",
                        "image": data_uri(b"\x89PNG1234", "image/png"),
                        "pages": [data_uri(b"one", "text/plain")],
                        "token": "s3cret",
                    }
                },
            )
            body = await response.json()
            assert response.status == 200
            assert body["status"] == "succeeded", body
            assert body["output"]["text"] == "img img|3.0|a,b|**********|file.png:8"
            file = body["output"]["file"]
            assert base64.b64decode(file.split(",", 1)[1]) == b"hello img img plain ab s3cret"
            assert body["logs"] == "predicting img\n"
            invalid = await client.post(f"{model.url}/predictions", json={"input": {"count": 0}})
            assert invalid.status == 422
            failed = await (
                await client.post(f"{model.url}/predictions", json={"input": {"fail": True}})
            ).json()
            assert failed["status"] == "failed" and failed["error"] == "ValueError: asked to fail"
    finally:
        await stop(engine, model)


async def test_the_streamer_streams_concurrently_and_cancels(built):
    _, packages, _ = built
    engine, model = await running(image(packages, "stream"))
    try:
        async with aiohttp.ClientSession() as client:
            body = await (
                await client.post(
                    f"{model.url}/predictions", json={"input": {"prompt": "a b", "repeat": 2}}
                )
            ).json()
            assert body["status"] == "succeeded", body
            assert "".join(body["output"]) == "[aiohttp 3.8.6, pydantic 1.10.13] a b a b"
            waits = [
                asyncio.ensure_future(
                    client.put(
                        f"{model.url}/predictions/w{i}", json={"input": {"prompt": "x", "wait": 60}}
                    )
                )
                for i in range(4)
            ]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT
            while (await (await client.get(f"{model.url}/health-check")).json())[
                "status"
            ] != "BUSY":
                assert loop.time() < deadline, "four predictions never ran at once"
                await asyncio.sleep(0.05)
            for i in range(4):
                assert (await client.post(f"{model.url}/predictions/w{i}/cancel")).status == 200
            answers = [await (await w).json() for w in waits]
            assert [a["status"] for a in answers] == ["canceled"] * 4
    finally:
        await stop(engine, model)


def test_cog_predict_and_infer_as_a_cog_user(built):
    cog, packages, tmp_path = built
    work = tmp_path / "work"
    work.mkdir()
    (work / "a.txt").write_text("first")
    (work / "b.txt").write_text("second")
    kitchen = packages["kitchen"]["id"][:12]
    ran = cog(
        "predict", kitchen, "-i", "text=cli", "-i", "pages=@a.txt", "-i", "pages=@b.txt",
        "-i", "count=2", cwd=work,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    printed = json.loads(ran.stdout)
    assert printed["text"] == "cli cli|3.0|a,b|None"
    assert (work / "output.file.txt").read_text() == "hello cli cli plain ab None"
    assert (work / "output.files.0.txt").read_text() == "first"
    assert (work / "output.files.1.txt").read_text() == "second"
    refused = cog("predict", kitchen, "-i", "count=99", cwd=work)
    assert refused.returncode != 0
    assert refused.stderr.strip() == "cog: error: input count: 99 is above the maximum 5"
    streamed = cog("infer", packages["stream"]["id"][:12], "-i", "prompt=hello world", cwd=work)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.strip() == "[aiohttp 3.8.6, pydantic 1.10.13] hello world"
