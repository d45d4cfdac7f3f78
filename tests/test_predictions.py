"""POST /v1/packages/<id>/predictions: real models (examples/hello, examples/thumbnail)
in warm containers on the real Docker Engine, through the real app; `cog infer --remote`
through a real `cog server` process."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import os
import re
import signal
import subprocess

import aiohttp
import pytest

from cog.server.app import make_app
from cog.server.keys import CATALOG, WARM_POOL
from cog.server.model_api import (
    Answer,
    BadInputs,
    InferRoute,
    PredictionsRoute,
    adapter_for,
    decode_data_uri,
    prediction_answer,
    typed_values,
)
from cog.server.predictions import runnable_image
from cog.server.records import PackageRecord, Status
from cog.signature import Signature
from tests.registry_helpers import EXAMPLES
from tests.test_cli import COG, cog_server, free_port, wait_for

THUMBNAIL = EXAMPLES / "thumbnail"


def run_containers() -> dict[str, str]:
    """Name -> image of every model container the servers' predictions run."""
    out = subprocess.run(
        ["docker", "ps", "-a", "--filter", "label=org.cog-models.role=run",
         "--format", "{{.Names}} {{.Image}}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return dict(line.split(" ", 1) for line in out.splitlines())


async def until(condition, what: str, timeout: float = 30.0) -> None:
    """Wait until condition() holds (looked at every 50 ms), or fail saying what."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true after {timeout}s: {what}")
        await asyncio.sleep(0.05)


def hello_form(**values: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in values.items():
        form.add_field(name, value)
    return form


# -- the adapter, without a model -------------------------------------------------------


def test_json_inputs_become_the_form_the_image_takes():
    picture = THUMBNAIL.joinpath("input.png").read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(picture).decode()
    assert decode_data_uri("image", uri) == (picture, "image.png")
    form = InferRoute.form({"image": uri, "width": 40, "contrast": 1.8, "grayscale": True})
    fields = [(f[0]["name"], f[2]) for f in form._fields]
    assert fields == [("image", picture), ("width", "40"), ("contrast", "1.8"),
                      ("grayscale", "true")]  # fmt: skip
    with pytest.raises(BadInputs, match="input image: the data: URI is not valid base64"):
        InferRoute.form({"image": "data:image/png;base64,@@@"})
    with pytest.raises(
        BadInputs, match=re.escape("input x: a file is sent as a data:...;base64, URI")
    ):
        InferRoute.form({"x": "data:text/plain,hello"})
    with pytest.raises(BadInputs, match="input x: expected text, a number, true/false or a "):
        InferRoute.form({"x": [1, 2]})


PREDICTOR = Signature.from_json(
    {
        "kind": "predictor",
        "arguments": {
            "prompt": {"type": "str"},
            "steps": {"type": "int", "default": 4, "min": 1, "max": 10},
            "loud": {"type": "bool", "default": False},
            "image": {"type": "Path", "default": None},
            "pages": {"type": "Path", "list": True, "default": None},
        },
        "output": {"type": "str", "list": True, "iterator": True, "concatenate": True},
    }
)


def test_a_form_for_a_predictor_becomes_the_json_it_takes():
    """What the page and `cog infer --remote` send as a form, typed as /predictions takes
    it: numbers and booleans converted, a list input a list (of one, too), files kept as
    data: URIs; what cannot be converted is the problem of its input, every one at once."""
    uri = "data:text/plain;base64,aGk="
    values = {"prompt": "hi", "steps": "3", "loud": "true", "image": uri, "pages": uri}
    assert typed_values(PREDICTOR, values) == (
        {"prompt": "hi", "steps": 3, "loud": True, "image": uri, "pages": [uri]},
        [],
    )
    assert typed_values(PREDICTOR, {"pages": [uri, uri], "unknown": "x"})[0] == {
        "pages": [uri, uri],
        "unknown": "x",  # passed on: the model ignores it, as Cog does
    }
    assert typed_values(PREDICTOR, {"steps": "99", "loud": "maybe", "prompt": ["a", "b"]}) == (
        {},
        [
            {"input": "steps", "message": "99 is above the maximum 10"},
            {"input": "loud", "message": "'maybe' is not a boolean (use true, false, 1 or 0)"},
            {"input": "prompt", "message": "takes one value, not a list"},
        ],
    )


async def body_of(answer: Answer) -> bytes:
    return b"".join([chunk async for chunk in answer.body])


async def test_cogs_prediction_becomes_the_routes_answer():
    """Cog's answer to POST /predictions, as the server's route answers: 422's detail as
    the 400 with problems that a 2021 model gives; a failed prediction a 500 with its
    error and logs; the output as it is for JSON requests, and for a form as a 2021
    model answers (a file as itself, a ConcatenateIterator's text joined)."""
    detail = {"detail": [{"loc": ["body", "input", "steps"], "msg": "too big", "type": "x"}]}
    invalid = prediction_answer(422, json.dumps(detail).encode(), PREDICTOR, as_json=False)
    assert invalid.status == 400
    assert json.loads(await body_of(invalid)) == {
        "error": "invalid input: steps: too big",
        "problems": [{"input": "steps", "message": "too big"}],
    }
    failed = {"status": "failed", "error": "ValueError: no", "logs": "a\nb\n", "output": None}
    answer = prediction_answer(200, json.dumps(failed).encode(), PREDICTOR, as_json=True)
    assert answer.status == 500
    assert json.loads(await body_of(answer)) == {"error": "ValueError: no", "logs": ["a", "b"]}
    done = {"status": "succeeded", "output": ["a", " b"], "metrics": {"predict_time": 0.25}}
    as_json = prediction_answer(200, json.dumps(done).encode(), PREDICTOR, as_json=True)
    assert (as_json.status, as_json.content_type) == (200, "application/json")
    assert json.loads(await body_of(as_json)) == ["a", " b"]
    assert as_json.headers["X-Run-Time"] == "0.250000"
    joined = prediction_answer(200, json.dumps(done).encode(), PREDICTOR, as_json=False)
    assert (joined.content_type, await body_of(joined)) == ("text/plain", b"a b")
    picture = {"status": "succeeded", "output": "data:image/png;base64,iVBORw=="}
    file = prediction_answer(200, json.dumps(picture).encode(), PREDICTOR, as_json=False)
    assert (file.content_type, await body_of(file)) == ("image/png", b"\x89PNG")
    assert file.headers["Content-Disposition"] == 'attachment; filename="output.png"'
    gone = prediction_answer(503, b'{"error": "not ready"}', PREDICTOR, as_json=False)
    assert (gone.status, json.loads(await body_of(gone))) == (503, {"error": "not ready"})


def test_the_adapter_is_the_models_kind():
    def record(signature, cog_yaml):
        from cog.config import load_config

        now = datetime.datetime.now(datetime.timezone.utc)
        return PackageRecord(
            "f" * 64, "x", load_config(cog_yaml), now, now, Status.READY, 1, signature=signature
        )

    model = {"arguments": {}}
    predictor = PREDICTOR.to_json()
    assert isinstance(adapter_for(record(model, "model: infer.py:Model\n")), InferRoute)
    chosen = adapter_for(record(predictor, "predict: predict.py:Predictor\n"))
    assert isinstance(chosen, PredictionsRoute) and chosen.signature == PREDICTOR
    # Not read from the source: today's format asks the image; the 2021 one sends its form.
    unknown = adapter_for(record(None, "predict: predict.py:Predictor\n"))
    assert isinstance(unknown, PredictionsRoute) and unknown.signature is None
    assert isinstance(adapter_for(record(None, "model: infer.py:Model\n")), InferRoute)


async def test_a_server_without_builder_runs_no_models(aiohttp_client, tmp_path):
    from cog.server.app import ServerSettings
    from tests.registry_helpers import form, package_bytes

    app = make_app(
        ServerSettings(storage_url=f"file://{tmp_path / 's'}", builder=None, tmp_dir=tmp_path)
    )
    client = await aiohttp_client(app)
    data, package_id = package_bytes(EXAMPLES / "hello")
    assert (await client.post("/v1/packages/upload", data=form(data))).status == 200
    response = await client.post(f"/v1/packages/{package_id}/predictions", data=hello_form())
    assert response.status == 409
    assert (await response.json())["error"] == "this server runs no models (it has no builder)"
    assert (await (await client.get("/ping")).json())["predictions"] is False


# -- real models ------------------------------------------------------------------------


@pytest.fixture
async def client(aiohttp_client, built_examples, tmp_path):
    app = make_app(built_examples.settings(tmp_path, max_warm=2, warm_for=300))
    return await aiohttp_client(app)


@pytest.mark.integration
@pytest.mark.slow
async def test_forms_and_json_run_in_one_warm_container_per_package(client, built_examples):
    hello, thumbnail = built_examples.hello, built_examples.thumbnail
    before = run_containers()
    answer = await client.post(
        f"/v1/packages/{hello[:12]}/predictions", data=hello_form(name="web", times="2")
    )
    assert answer.status == 200
    assert await answer.text() == "Hello, web. Hello, web."
    assert float(answer.headers["X-Run-Time"]) >= 0
    answer = await client.post(
        f"/v1/packages/{hello}/predictions", json={"input": {"name": "json", "shout": True}}
    )
    document = await answer.json()
    assert (document["status"], document["output"]) == ("succeeded", "HELLO, JSON.")
    assert set(document["metrics"]) == {"predict_time"}
    # The model's own refusal, passed on with every problem.
    answer = await client.post(f"/v1/packages/{hello}/predictions", data=hello_form(times="9"))
    assert answer.status == 400
    assert (await answer.json())["problems"] == [
        {"input": "times", "message": "9 is above the maximum 5"}
    ]
    started = set(run_containers()) - set(before)
    assert len(started) == 1, "the same warm container answered all three"

    # A picture in and out, as a form (the file streamed back) and as JSON (data: URIs).
    with open(THUMBNAIL / "input.png", "rb") as picture:
        form = aiohttp.FormData()
        form.add_field("image", picture, filename="input.png")
        answer = await client.post(f"/v1/packages/{thumbnail}/predictions", data=form)
        assert answer.status == 200
        assert answer.content_type == "image/png"
        assert await answer.read() == (THUMBNAIL / "expected-default.png").read_bytes()
    uri = (
        "data:image/png;base64," + base64.b64encode((THUMBNAIL / "input.png").read_bytes()).decode()
    )
    values = {"image": uri, "width": 40, "contrast": 1.8, "resample": "nearest", "grayscale": True}
    answer = await client.post(f"/v1/packages/{thumbnail}/predictions", json={"input": values})
    output = (await answer.json())["output"]
    assert output.startswith("data:image/png;base64,")
    expected = (THUMBNAIL / "expected-gray.png").read_bytes()
    assert base64.b64decode(output.split(",", 1)[1]) == expected
    assert len(set(run_containers()) - set(before)) == 2

    # Requests the server refuses before any model runs.
    for body, kwargs, status, message in [
        ("{", {"headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
        ('{"name": "x"}', {"headers": {"Content-Type": "application/json"}}, 400,
         'expected JSON {"input": {"name": value, ...}}'),
        ("name=x", {"headers": {"Content-Type": "text/plain"}}, 415, "not text/plain"),
    ]:  # fmt: skip
        answer = await client.post(f"/v1/packages/{hello}/predictions", data=body, **kwargs)
        assert answer.status == status, await answer.text()
        assert message in (await answer.json())["error"]

    # The server stops: its containers go with it.
    await client.close()
    assert set(run_containers()) - set(before) == set()


@pytest.mark.integration
@pytest.mark.slow
async def test_requests_wait_their_turn_up_to_a_bound_then_503(
    aiohttp_client, built_examples, tmp_path
):
    app = make_app(built_examples.settings(tmp_path, max_warm=1, max_queue=2))
    client = await aiohttp_client(app)
    hello = built_examples.hello
    pool = app[WARM_POOL]
    image = runnable_image(await app[CATALOG].get(hello))
    # The test takes the model's turn itself, so that requests must wait for it.
    async with pool.model(hello, image):
        waiting = [
            asyncio.ensure_future(
                client.post(f"/v1/packages/{hello}/predictions", data=hello_form(name=str(n)))
            )
            for n in range(2)
        ]
        await until(lambda: pool._waiting == 2, "two requests wait for the model")
        refused = await client.post(f"/v1/packages/{hello}/predictions", data=hello_form())
        assert refused.status == 503
        assert "2 requests are waiting for a model already" in (await refused.json())["error"]
        # Another package needs the only slot, which is busy: it waits too (and is the
        # third waiting request: refused).
        other = await client.post(
            f"/v1/packages/{built_examples.thumbnail}/predictions", data=hello_form()
        )
        assert other.status == 503
    answers = await asyncio.gather(*waiting)
    assert sorted([await a.text() for a in answers]) == ["Hello, 0.", "Hello, 1."]


@pytest.mark.integration
@pytest.mark.slow
async def test_idle_models_go_and_max_warm_makes_room(aiohttp_client, built_examples, tmp_path):
    app = make_app(built_examples.settings(tmp_path, max_warm=1, warm_for=1))
    client = await aiohttp_client(app)
    before = set(run_containers())
    hello, thumbnail = built_examples.hello, built_examples.thumbnail
    assert (await client.post(f"/v1/packages/{hello}/predictions", data=hello_form())).status == 200
    (first,) = set(run_containers()) - before
    with open(THUMBNAIL / "input.png", "rb") as picture:
        form = aiohttp.FormData()
        form.add_field("image", picture, filename="input.png")
        answer = await client.post(f"/v1/packages/{thumbnail}/predictions", data=form)
    assert answer.status == 200
    # One model at most: hello's container made room for thumbnail's.
    (second,) = set(run_containers()) - before
    assert second != first
    # Unused for a second: removed.
    await until(lambda: not set(run_containers()) - before, "the idle container is removed")
    assert app[WARM_POOL].warm == {}


@pytest.mark.integration
@pytest.mark.slow
def test_cog_infer_remote_and_a_killed_servers_containers(built_examples, tmp_path):
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "config"))
    before = set(run_containers())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [COG, "server", "--host", "127.0.0.1", "--port", str(port), "--storage",
         f"file://{built_examples.store}", "--docker-registry", built_examples.registry],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        wait_for(f"{url}/ping")
        result = subprocess.run(
            [COG, "--remote", url, "infer", "--remote", built_examples.hello[:12],
             "-i", "name=cli"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert (result.returncode, result.stdout) == (0, "Hello, cli.\n"), result.stderr
        out = tmp_path / "thumb.png"
        result = subprocess.run(
            [COG, "--remote", url, "infer", "--remote", built_examples.thumbnail,
             "-i", f"@{THUMBNAIL / 'input.png'}", "-i", "width=40", "-i", "contrast=1.8",
             "-i", "resample=nearest", "-i", "grayscale=true", "-o", str(out)],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert out.read_bytes() == (THUMBNAIL / "expected-gray.png").read_bytes()
        result = subprocess.run(
            [COG, "--remote", url, "infer", "--remote", built_examples.hello, "-i", "times=9"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert result.returncode == 1
        assert result.stderr.startswith("cog: error: invalid input: times: 9 is above")
        assert "Traceback" not in result.stderr
        left = set(run_containers()) - before
        assert len(left) == 2
    finally:
        # Killed outright: its containers stay behind...
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
    assert left <= set(run_containers())
    # ...until the next server runs a model: it removes them.
    (tmp_path / "next").mkdir()
    (tmp_path / "next" / "store").symlink_to(built_examples.store)
    with cog_server(tmp_path / "next", env, "--docker-registry", built_examples.registry) as url:
        request = aiohttp_post(f"{url}/v1/packages/{built_examples.hello}/predictions")
        assert request == "Hello, world."
        assert not left & set(run_containers())
    assert set(run_containers()) - before == set()


def aiohttp_post(url: str) -> str:
    async def post() -> str:
        async with aiohttp.ClientSession() as session, session.post(
            url, data=hello_form()
        ) as response:
            return await response.text()

    return asyncio.run(post())
