"""Models written for today's Cog, unchanged, built by a real `cog server` with `cog build`,
checked, shown, and then run as their clients run them: `/predictions` on the image, and
`cog predict`/`cog infer`. Two images, each built once for the module: the kitchen (every
input type, an object output with files) and the streamer (an async runner whose packages
Cog's own runtime would fight with: aiohttp 3.8.6, pydantic 1.10). The images run as cog
runs every model, with no network: requests reach them through their socket
(ModelContainer.request)."""

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
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
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
        for name, where in (("kitchen", FIXTURES), ("stream", FIXTURES), ("wordcount", EXAMPLES)):
            model = tmp_path / name
            shutil.copytree(where / name, model)
            result = cog("build", cwd=model)
            assert result.returncode == 0, result.stdout + result.stderr
            package_id = result.stdout.strip().splitlines()[-1].split()[-1]
            shown = json.loads(cog("show", package_id, "--json").stdout)
            packages[name] = {"id": package_id, "log": result.stdout, "doc": shown}
        packages["url"] = url
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
        health = await (await model.request("GET", "/health-check")).json()
        assert health["status"] == "READY"
        assert health["setup"]["logs"] == "setting up the kitchen\n"
        response = await model.request(
            "POST",
            "/predictions",
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
        invalid = await model.request("POST", "/predictions", json={"input": {"count": 0}})
        assert invalid.status == 422
        failed = await (
            await model.request("POST", "/predictions", json={"input": {"fail": True}})
        ).json()
        assert failed["status"] == "failed" and failed["error"] == "ValueError: asked to fail"
    finally:
        await stop(engine, model)


async def test_the_streamer_streams_concurrently_and_cancels(built):
    _, packages, _ = built
    engine, model = await running(image(packages, "stream"))
    try:
        body = await (
            await model.request(
                "POST", "/predictions", json={"input": {"prompt": "a b", "repeat": 2}}
            )
        ).json()
        assert body["status"] == "succeeded", body
        assert "".join(body["output"]) == "[aiohttp 3.8.6, pydantic 1.10.13] a b a b"
        waits = [
            asyncio.ensure_future(
                model.request(
                    "PUT", f"/predictions/w{i}", json={"input": {"prompt": "x", "wait": 60}}
                )
            )
            for i in range(4)
        ]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while (await (await model.request("GET", "/health-check")).json())["status"] != "BUSY":
            assert loop.time() < deadline, "four predictions never ran at once"
            await asyncio.sleep(0.05)
        for i in range(4):
            assert (await model.request("POST", f"/predictions/w{i}/cancel")).status == 200
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


def test_the_wordcount_example_as_its_readme_runs_it(built):
    """examples/wordcount, built unchanged: checked with its defaults, then `cog predict`
    with a file of the package, its object output printed as JSON."""
    cog, packages, tmp_path = built
    wordcount = packages["wordcount"]
    assert "[cpu/test] Prediction with the defaults: ok" in wordcount["log"]
    assert wordcount["doc"]["Name"] == "examples/wordcount"
    work = tmp_path / "wordcount-work"
    work.mkdir()
    shutil.copy(EXAMPLES / "wordcount" / "poem.txt", work)
    ran = cog(
        "predict", wordcount["id"][:12], "-i", "document=@poem.txt", "-i", "top=2", cwd=work
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout) == {"words": 21, "distinct": 18, "top": ["cat", "city"]}


async def test_todays_models_run_through_the_server(built):
    """POST /v1/packages/<id>/predictions on a predictor (the web's route, which the page's
    Try it and `cog infer --remote` use): a form as the page sends it is typed from the
    signature and answered as a 2021 model's is; JSON is answered with Cog's output; the
    model's refusal and its failure come back as a 2021 model's do."""
    _, packages, _ = built
    route = f"{packages['url']}/v1/packages/{packages['kitchen']['id']}/predictions"
    async with aiohttp.ClientSession() as client:
        form = aiohttp.FormData()
        for name, value in (("text", "web"), ("count", "3"), ("loud", "true")):
            form.add_field(name, value)
        form.add_field("pages", b"page one", filename="one.txt", content_type="text/plain")
        async with client.post(route, data=form) as answer:
            assert answer.status == 200, await answer.text()
            assert answer.content_type == "application/json"
            output = await answer.json()
        assert output["text"] == "WEB WEB WEB|4.5|a,b|None"
        assert decoded(output["file"]) == b"hello WEB WEB WEB plain ab None"
        assert [decoded(f) for f in output["files"]] == [b"page one"]
        async with client.post(route, data={"count": "99", "flavour": "sour"}) as answer:
            assert answer.status == 400
            refusal = await answer.json()
        assert refusal["problems"] == [{"input": "count", "message": "99 is above the maximum 5"}]
        async with client.post(route, json={"input": {"flavour": "sour"}}) as answer:
            assert answer.status == 400
            assert [p["input"] for p in (await answer.json())["problems"]] == ["flavour"]
        async with client.post(route, json={"input": {"text": "json"}}) as answer:
            document = await answer.json()
        assert document["status"] == "succeeded"
        assert document["output"]["text"] == "json json|3.0|a,b|None"
        assert set(document["metrics"]) == {"predict_time"}
        async with client.post(route, json={"input": {"fail": True}}) as answer:
            assert answer.status == 500
            failure = await answer.json()
        assert failure["error"] == "ValueError: asked to fail"
        assert "predicting world" in failure["logs"]


async def test_a_prediction_its_client_abandons_stops_its_container(built):
    """A client that hangs up mid-prediction through the server: the warm container that
    was running it is removed (its model may still be busy), and the next request gets a
    fresh one."""
    _, packages, _ = built
    route = f"{packages['url']}/v1/packages/{packages['kitchen']['id']}/predictions"

    def containers() -> list[str]:
        listed = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"ancestor={image(packages, 'kitchen')}"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return listed.stdout.split()

    def logs(container: str) -> str:
        shown = subprocess.run(["docker", "logs", container], capture_output=True, text=True)
        return shown.stdout + shown.stderr

    async def eventually(condition, what: str) -> None:
        deadline = asyncio.get_running_loop().time() + WAIT
        while not condition():
            assert asyncio.get_running_loop().time() < deadline, f"gave up waiting: {what}"
            await asyncio.sleep(0.2)

    async with aiohttp.ClientSession() as client:
        body = {"input": {"text": "abandoned", "sleep": 60}}
        request = asyncio.create_task(client.post(route, json=body))
        await eventually(
            lambda: any("predicting abandoned" in logs(c) for c in containers()),
            "the model to start the prediction",
        )
        [busy] = [c for c in containers() if "predicting abandoned" in logs(c)]
        request.cancel()  # the client hangs up
        with pytest.raises(asyncio.CancelledError):
            await request
        await eventually(lambda: busy not in containers(), "the busy container to go")
        async with client.post(route, json={"input": {"text": "after"}}) as answer:
            assert answer.status == 200, await answer.text()
            assert (await answer.json())["output"]["text"] == "after after|3.0|a,b|None"


def test_cog_infer_remote_on_todays_models(built):
    """`cog infer --remote` writes a predictor's outputs as `cog predict` does locally, and
    joins what a ConcatenateIterator streamed."""
    cog, packages, tmp_path = built
    work = tmp_path / "remote"
    work.mkdir()
    (work / "a.txt").write_text("first")
    kitchen = packages["kitchen"]["id"][:12]
    ran = cog(
        "infer", "--remote", kitchen, "-i", "text=far", "-i", "pages=@a.txt", "-i", "count=1",
        cwd=work,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["text"] == "far|1.5|a,b|None"
    assert (work / "output.file.txt").read_text() == "hello far plain ab None"
    assert (work / "output.files.0.txt").read_text() == "first"
    assert "Written to output.files.0.txt" in ran.stderr
    refused = cog("predict", "--remote", kitchen, "-i", "count=99", cwd=work)
    assert refused.returncode == 1
    assert refused.stderr.strip() == "cog: error: input count: 99 is above the maximum 5"
    stream = packages["stream"]["id"][:12]
    streamed = cog("infer", "--remote", stream, "-i", "prompt=over the server", cwd=work)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == "[aiohttp 3.8.6, pydantic 1.10.13] over the server\n"


def decoded(uri: str) -> bytes:
    return base64.b64decode(uri.split(",", 1)[1])
