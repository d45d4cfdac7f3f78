"""Today's Cog HTTP contract (/health-check, /predictions), driven as a Cog client drives
it, against the real runtime: the model in its worker process, real HTTP servers for
file URLs, uploads and webhooks."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pathlib
import textwrap

import pytest
from aiohttp import web

from cog.runtime import InferenceServer

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
WAIT = 20.0  # a bound for the test to give up, not a timing


async def eventually(condition, what):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not await condition():
        if loop.time() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        await asyncio.sleep(0.01)


async def serve(aiohttp_client, directory, **settings):
    server = InferenceServer.from_directory(str(directory), **settings)
    client = await aiohttp_client(server.app)
    await server.runner.wait_started()
    return server, client


def data_uri(data: bytes, content_type="application/octet-stream") -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode()}"


def decoded(uri: str) -> bytes:
    header, _, payload = uri.partition(",")
    assert header.endswith(";base64"), uri[:50]
    return base64.b64decode(payload)


def model_dir(tmp_path, source, config='predict: "predict.py:Predictor"\n'):
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "cog.yaml").write_text(config)
    (directory / "predict.py").write_text(textwrap.dedent(source))
    return directory


@pytest.fixture
async def kitchen(aiohttp_client):
    return await serve(aiohttp_client, FIXTURES / "kitchen")


# --- health and the happy path ----------------------------------------------------------


async def test_health_check_tells_the_setup_and_its_logs(kitchen):
    _, client = kitchen
    response = await client.get("/health-check")
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "READY"
    setup = body["setup"]
    assert setup["status"] == "succeeded"
    assert setup["logs"] == "setting up the kitchen\n"
    assert setup["started_at"] <= setup["completed_at"]


async def test_a_prediction_with_every_input_type(kitchen):
    _, client = kitchen
    response = await client.post(
        "/predictions",
        json={
            "input": {
                "text": "hi",
                "count": 3,
                "scale": 2,
                "loud": True,
                "flavour": "spicy",
                "image": data_uri(b"\x89PNG...", "image/png"),
                "pages": [data_uri(b"page one", "text/plain"), "data:,page%20two"],
                "blob": data_uri(b"0123456789"),
                "token": "hunter2",
                "tags": ["x", "y"],
            }
        },
    )
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "succeeded", body
    assert body["error"] is None
    assert body["input"]["token"] == "**********"  # echoed as Cog does once it is sent
    output = body["output"]
    assert output["text"] == "HI HI HI|6.0|x,y|**********|file.png:7"
    assert output["number"] == 6.0
    assert output["missing"] is None
    assert decoded(output["file"]) == b"hello HI HI HI spicy ab hunter2"
    assert output["file"].startswith("data:text/plain;base64,")
    assert [decoded(f) for f in output["files"]] == [b"page one", b"page two", b"0123456789"]
    assert body["logs"] == "predicting hi\n"
    assert body["metrics"]["predict_time"] > 0
    assert body["created_at"] <= body["started_at"] <= body["completed_at"]


async def test_defaults_fill_what_is_not_given_and_unknown_names_are_ignored(kitchen):
    _, client = kitchen
    body = await (await client.post("/predictions", json={"input": {"nope": 1}})).json()
    assert body["status"] == "succeeded"
    assert body["output"]["text"] == "world world|3.0|a,b|None"
    body = await (await client.post("/predictions", json={})).json()  # no input at all
    assert body["status"] == "succeeded"


async def test_invalid_input_is_422_with_every_problem(kitchen):
    _, client = kitchen
    response = await client.post(
        "/predictions",
        json={"input": {"text": 5, "count": 9, "flavour": "sweet", "image": "/etc/passwd"}},
    )
    assert response.status == 422
    assert await response.json() == {
        "detail": [
            {"loc": ["body", "input", "text"], "msg": "5 is not a string", "type": "value_error"},
            {
                "loc": ["body", "input", "count"],
                "msg": "9 is above the maximum 5",
                "type": "value_error",
            },
            {
                "loc": ["body", "input", "flavour"],
                "msg": "'sweet' is not one of 'plain', 'spicy'",
                "type": "value_error",
            },
            {
                "loc": ["body", "input", "image"],
                "msg": "'/etc/passwd' is not a file URL (use a data: URI or an http(s) URL)",
                "type": "value_error",
            },
        ]
    }
    response = await client.post(
        "/predictions", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status == 422
    assert (await response.json())["detail"][0]["type"] == "value_error.jsondecode"
    response = await client.post("/predictions", json={"input": [1], "webhook": "ftp://x"})
    assert response.status == 422
    locs = [d["loc"] for d in (await response.json())["detail"]]
    assert locs == [["body", "input"], ["body", "webhook"]]


async def test_a_required_input_missing_is_422(aiohttp_client, tmp_path):
    directory = model_dir(
        tmp_path,
        """
        from cog import BasePredictor, Input

        class Predictor(BasePredictor):
            def predict(self, prompt: str = Input(description="required")) -> str:
                return prompt
        """,
    )
    _, client = await serve(aiohttp_client, directory)
    response = await client.post("/predictions", json={"input": {}})
    assert response.status == 422
    assert await response.json() == {
        "detail": [
            {
                "loc": ["body", "input", "prompt"],
                "msg": "field required",
                "type": "value_error.missing",
            }
        ]
    }


async def test_a_prediction_that_raises_is_200_and_failed(kitchen):
    _, client = kitchen
    response = await client.post("/predictions", json={"input": {"fail": True}})
    assert response.status == 200
    body = await response.json()
    assert body["status"] == "failed"
    assert body["error"] == "ValueError: asked to fail"
    assert "Traceback (most recent call last):" in body["logs"]
    assert body["output"] is None
    # The model goes on serving.
    assert (await (await client.post("/predictions", json={})).json())["status"] == "succeeded"


async def test_a_2021_model_answers_predictions_too(aiohttp_client):
    _, client = await serve(aiohttp_client, FIXTURES.parent.parent / "examples" / "hello")
    body = await (
        await client.post("/predictions", json={"input": {"name": "cog", "times": 2}})
    ).json()
    assert body["status"] == "succeeded"
    assert body["output"] == "Hello, cog. Hello, cog."
    assert (await (await client.get("/health-check")).json())["status"] == "READY"


# --- files: URLs in, uploads out --------------------------------------------------------


async def test_file_inputs_from_http_urls(kitchen, aiohttp_server):
    _, client = kitchen

    async def photo(request):
        return web.Response(body=b"pixels" * 1000, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/photos/cat.jpg", photo)
    files = await aiohttp_server(app)
    url = str(files.make_url("/photos/cat.jpg"))
    body = await (await client.post("/predictions", json={"input": {"image": url}})).json()
    assert body["status"] == "succeeded", body
    assert body["output"]["text"].endswith("|cat.jpg:6000")

    missing = str(files.make_url("/photos/none.jpg"))
    body = await (await client.post("/predictions", json={"input": {"image": missing}})).json()
    assert body["status"] == "failed"
    assert body["error"] == f"input image: {missing} answered HTTP 404"


async def test_file_outputs_are_uploaded_with_an_upload_url(aiohttp_client, aiohttp_server):
    received = {}

    async def put(request):
        received[request.match_info["name"]] = (request.content_type, await request.read())
        return web.Response(
            status=201, headers={"Location": f"/stored/{request.match_info['name']}?sig=1"}
        )

    app = web.Application()
    app.router.add_put("/upload/{name}", put)
    store = await aiohttp_server(app)
    upload = str(store.make_url("/upload/"))
    _, client = await serve(aiohttp_client, FIXTURES / "kitchen", upload_url=upload)
    body = await (await client.post("/predictions", json={"input": {"text": "up"}})).json()
    assert body["status"] == "succeeded", body
    url = body["output"]["file"]
    assert url.startswith(str(store.make_url("/stored/"))) and "?" not in url
    name = url.rsplit("/", 1)[1]
    assert received[name] == ("text/plain", b"hello up up plain ab None")


# --- asynchronous predictions and webhooks ----------------------------------------------


async def test_respond_async_is_202_and_the_webhook_hears_every_event(kitchen, aiohttp_server):
    _, client = kitchen
    events: list[dict] = []
    completed = asyncio.Event()

    async def hook(request):
        body = await request.json()
        events.append(body)
        if body["status"] in ("succeeded", "failed", "canceled"):
            completed.set()
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", hook)
    receiver = await aiohttp_server(app)
    response = await client.post(
        "/predictions",
        json={
            "id": "async-1",
            "input": {"text": "later"},
            "webhook": str(receiver.make_url("/hook")),
        },
        headers={"Prefer": "respond-async"},
    )
    assert response.status == 202
    accepted = await response.json()
    assert accepted["id"] == "async-1"
    assert accepted["status"] == "starting"
    await asyncio.wait_for(completed.wait(), WAIT)
    assert events[0]["status"] == "starting"
    final = events[-1]
    assert final["status"] == "succeeded"
    assert final["output"]["text"].startswith("later later")
    assert final["logs"] == "predicting later\n"


async def test_the_webhook_filter_keeps_only_the_events_asked_for(kitchen, aiohttp_server):
    _, client = kitchen
    statuses: list[str] = []
    done = asyncio.Event()

    async def hook(request):
        statuses.append((await request.json())["status"])
        done.set()
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", hook)
    receiver = await aiohttp_server(app)
    await client.post(
        "/predictions",
        json={
            "input": {},
            "webhook": str(receiver.make_url("/hook")),
            "webhook_events_filter": ["completed"],
        },
        headers={"Prefer": "respond-async"},
    )
    await asyncio.wait_for(done.wait(), WAIT)
    assert statuses == ["succeeded"]


# --- idempotency and cancellation -------------------------------------------------------


async def test_put_is_idempotent(kitchen):
    _, client = kitchen
    body = {"input": {"text": "once", "sleep": 0.3}}
    # Two clients race with the same ID: one prediction, both get it.
    first, second = await asyncio.gather(
        client.put("/predictions/same-id", json=body), client.put("/predictions/same-id", json=body)
    )
    one, two = await first.json(), await second.json()
    assert one == two
    assert one["id"] == "same-id" and one["status"] == "succeeded"
    assert one["logs"] == "predicting once\n"  # it ran once
    # A retry after it finished is answered with the same prediction.
    again = await (await client.put("/predictions/same-id", json=body)).json()
    assert again == one
    # Another input under a running ID is refused; a mismatched body ID is invalid.
    running = asyncio.ensure_future(
        client.put("/predictions/busy-id", json={"input": {"sleep": 1.0}})
    )
    await eventually(lambda: _running(client), "the prediction to start")
    other = await client.put("/predictions/busy-id", json={"input": {"text": "other"}})
    assert other.status == 409
    mismatch = await client.put("/predictions/a", json={"id": "b", "input": {}})
    assert mismatch.status == 422
    assert (await running).status == 200


async def _running(client) -> bool:
    return (await (await client.get("/health-check")).json())["status"] == "BUSY"


async def test_cancel_stops_a_running_synchronous_prediction(kitchen):
    _, client = kitchen
    response = await client.post(
        "/predictions",
        json={"id": "long", "input": {"sleep": 60}},
        headers={"Prefer": "respond-async"},
    )
    assert response.status == 202
    await eventually(lambda: _running(client), "the prediction to start")
    cancel = await client.post("/predictions/long/cancel")
    assert cancel.status == 200
    assert await cancel.json() == {}
    # The retry of the same request is answered with its end: canceled, well before 60s.
    body = await (await client.put("/predictions/long", json={"input": {"sleep": 60}})).json()
    assert body["status"] == "canceled"
    assert body["metrics"]["predict_time"] < WAIT
    assert (await client.post("/predictions/nothing-here/cancel")).status == 404
    # The model took the next one.
    assert (await (await client.post("/predictions", json={})).json())["status"] == "succeeded"


STREAMER = """
import asyncio
import os

from cog import BaseRunner, ConcatenateIterator, Input


class Runner(BaseRunner):
    async def run(self, prompt: str, wait: float = Input(default=0.0)) -> ConcatenateIterator[str]:
        for word in prompt.split():
            yield word + " "
        if wait:
            open(os.path.join(os.environ["COG_TEST_MARKERS"], prompt), "w").close()
            try:
                await asyncio.sleep(wait)
            except asyncio.CancelledError:
                print("cancelled, cleaning up")
                raise
            yield "(waited)"
"""


async def test_async_predictors_run_up_to_concurrency_max_and_cancel(
    aiohttp_client, tmp_path, monkeypatch
):
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("COG_TEST_MARKERS", str(markers))
    directory = model_dir(tmp_path, STREAMER, 'run: "predict.py:Runner"\nconcurrency:\n  max: 3\n')
    server, client = await serve(aiohttp_client, directory, max_queue=1)
    body = await (await client.post("/predictions", json={"input": {"prompt": "a b c"}})).json()
    assert body["output"] == ["a ", "b ", "c "]  # ConcatenateIterator: the pieces, in order
    waits = [
        asyncio.ensure_future(
            client.post(
                "/predictions", json={"id": f"w{i}", "input": {"prompt": f"w{i}", "wait": 60}}
            )
        )
        for i in range(3)
    ]

    async def three_running():
        return len(os.listdir(markers)) == 3

    await eventually(three_running, "three predictions at once")
    assert (await (await client.get("/health-check")).json())["status"] == "BUSY"
    queued = asyncio.ensure_future(client.post("/predictions", json={"input": {"prompt": "q"}}))
    await eventually(lambda: _admitted(server, 4), "the fourth to queue")
    refused = await client.post("/predictions", json={"input": {"prompt": "no"}})
    assert refused.status == 409
    assert await refused.json() == {"detail": "Already running a prediction"}
    for i in range(3):
        assert (await client.post(f"/predictions/w{i}/cancel")).status == 200
    bodies = [await (await w).json() for w in waits]
    assert [b["status"] for b in bodies] == ["canceled"] * 3
    assert all(b["logs"] == "cancelled, cleaning up\n" for b in bodies)
    assert (await (await queued).json())["output"] == ["q "]


async def _admitted(server, n):
    return server.runner.admitted == n


# --- a model that misbehaves ------------------------------------------------------------

STUBBORN = """
import os
import time

import cog
from cog import BasePredictor


class Predictor(BasePredictor):
    def predict(self, mode: str) -> str:
        if mode == "crash":
            os._exit(3)
        if mode == "stubborn":
            while True:
                try:
                    time.sleep(60)
                except cog.CancelationException:
                    print("not stopping")
        return f"pid {os.getpid()}"
"""


async def crash_and_wait_for_restart(client) -> str:
    """Crash STUBBORN's worker with a prediction (which fails, saying how it exited), wait
    until a new worker is ready; what a prediction answers then ("pid N": its process)."""
    body = await (await client.post("/predictions", json={"input": {"mode": "crash"}})).json()
    assert body["status"] == "failed"
    assert body["error"] == "the model's process exited (code 3)"

    async def ready():
        return (await (await client.get("/health-check")).json())["status"] == "READY"

    await eventually(ready, "the worker to be started again")
    body = await (await client.post("/predictions", json={"input": {"mode": "ok"}})).json()
    return body["output"]


async def test_a_crashed_worker_fails_its_prediction_and_is_started_again(aiohttp_client, tmp_path):
    directory = model_dir(tmp_path, STUBBORN)
    _, client = await serve(aiohttp_client, directory)
    first = (await (await client.post("/predictions", json={"input": {"mode": "ok"}})).json())[
        "output"
    ]
    assert first != await crash_and_wait_for_restart(client)  # another process


async def cancel_a_stubborn_prediction(client) -> None:
    """Start STUBBORN's prediction that ignores its cancel, cancel it: it ends canceled
    (its worker killed after the grace), having said it was not stopping."""
    running = asyncio.ensure_future(
        client.put("/predictions/stuck", json={"input": {"mode": "stubborn"}})
    )
    await eventually(lambda: _running(client), "the prediction to start")
    assert (await client.post("/predictions/stuck/cancel")).status == 200
    body = await (await running).json()
    assert body["status"] == "canceled"
    assert "not stopping" in body["logs"]


async def test_a_prediction_that_ignores_cancel_gets_its_worker_restarted(aiohttp_client, tmp_path):
    directory = model_dir(tmp_path, STUBBORN)
    _, client = await serve(aiohttp_client, directory, cancel_grace=0.5)
    await cancel_a_stubborn_prediction(client)
    health = await (await client.get("/health-check")).json()
    assert health["status"] in ("DEFUNCT", "READY")

    async def ready():
        return (await (await client.get("/health-check")).json())["status"] == "READY"

    await eventually(ready, "the worker to be started again")
    assert (await (await client.post("/predictions", json={"input": {"mode": "ok"}})).json())[
        "status"
    ] == "succeeded"


async def test_a_setup_that_fails_is_setup_failed(aiohttp_client, tmp_path):
    directory = model_dir(
        tmp_path,
        """
        from cog import BasePredictor

        class Predictor(BasePredictor):
            def setup(self):
                print("loading")
                raise RuntimeError("no weights")

            def predict(self) -> str:
                return "never"
        """,
    )
    _, client = await serve(aiohttp_client, directory)
    body = await (await client.get("/health-check")).json()
    assert body["status"] == "SETUP_FAILED"
    assert body["setup"]["status"] == "failed"
    assert "loading\n" in body["setup"]["logs"]
    assert "RuntimeError: no weights" in body["setup"]["logs"]
    response = await client.post("/predictions", json={})
    assert response.status == 503


# --- the schema -------------------------------------------------------------------------


async def test_openapi_is_in_cogs_shape(kitchen):
    _, client = kitchen
    document = await (await client.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    inputs = schemas["Input"]
    assert inputs["title"] == "Input"
    assert [p["x-order"] for p in inputs["properties"].values()] == list(range(14))
    assert inputs["properties"]["count"] == {
        "x-order": 1,
        "title": "Count",
        "type": "integer",
        "default": 2,
        "minimum": 1,
        "maximum": 5,
    }
    assert inputs["properties"]["flavour"]["allOf"] == [{"$ref": "#/components/schemas/flavour"}]
    assert schemas["flavour"]["enum"] == ["plain", "spicy"]
    assert inputs["properties"]["image"]["format"] == "uri"
    assert inputs["properties"]["image"]["nullable"] is True
    assert inputs["properties"]["pages"]["items"] == {"type": "string", "format": "uri"}
    assert inputs["properties"]["token"]["x-cog-secret"] is True
    assert inputs["properties"]["old"]["deprecated"] is True
    assert inputs["properties"]["code"]["pattern"] == r"[a-z]+\Z"
    assert schemas["Output"]["properties"]["files"] == {
        "title": "Files",
        "type": "array",
        "items": {"type": "string", "format": "uri"},
    }
    assert schemas["Output"]["required"] == ["text", "number", "file", "files"]
    assert set(document["paths"]) >= {
        "/health-check",
        "/predictions",
        "/predictions/{prediction_id}",
        "/predictions/{prediction_id}/cancel",
        "/infer",
    }
    json.dumps(document)


async def test_a_worker_that_dies_during_setup_is_setup_failed_not_restarted(
    aiohttp_client, tmp_path
):
    directory = model_dir(
        tmp_path,
        """
        import os

        from cog import BasePredictor

        class Predictor(BasePredictor):
            def setup(self):
                os._exit(7)

            def predict(self) -> str:
                return "never"
        """,
    )
    _server, client = await serve(aiohttp_client, directory)
    body = await (await client.get("/health-check")).json()
    assert body["status"] == "SETUP_FAILED"
    assert body["error"] == "the model's process exited (code 7) during setup"
    assert (await client.post("/predictions", json={})).status == 503


OUTPUT_KINDS = {
    "list[Path]": (
        "List[Path]",
        "[write(f'{i}.txt', str(i)) for i in range(2)]",
        lambda out: [decoded(u) for u in out] == [b"0", b"1"],
    ),
    "Iterator[Path]": (
        "Iterator[Path]",
        "(write(f'{i}.txt', str(i)) for i in range(3))",
        lambda out: [decoded(u) for u in out] == [b"0", b"1", b"2"],
    ),
    "Iterator[int] empty": ("Iterator[int]", "iter(())", lambda out: out == []),
    "File": (
        "File",
        "io.BytesIO(b'bytes out')",
        lambda out: decoded(out) == b"bytes out",
    ),
    "dict": ("dict", "{'a': [1, {'b': None}]}", lambda out: out == {"a": [1, {"b": None}]}),
    "pydantic-like": (
        "Any",
        "Dumps()",
        lambda out: out == {"dumped": True},
    ),
}


@pytest.mark.parametrize("kind", OUTPUT_KINDS)
async def test_output_kinds(aiohttp_client, tmp_path, kind):
    annotation, expression, check = OUTPUT_KINDS[kind]
    directory = model_dir(
        tmp_path,
        f"""
        import io
        import tempfile
        from typing import Any, Iterator, List

        from cog import BasePredictor, File, Path


        def write(name, text):
            path = Path(tempfile.mkdtemp()) / name
            path.write_text(text)
            return path


        class Dumps:  # what a pydantic model offers
            def model_dump(self):
                return {{"dumped": True}}


        class Predictor(BasePredictor):
            def predict(self) -> {annotation}:
                return {expression}
        """,
    )
    _, client = await serve(aiohttp_client, directory)
    body = await (await client.post("/predictions", json={})).json()
    assert body["status"] == "succeeded", body
    assert check(body["output"]), body["output"]


async def test_an_output_that_cannot_be_sent_fails_the_prediction(aiohttp_client, tmp_path):
    directory = model_dir(
        tmp_path,
        """
        from cog import BasePredictor

        class Predictor(BasePredictor):
            def predict(self) -> float:
                return float("nan")
        """,
    )
    _, client = await serve(aiohttp_client, directory)
    body = await (await client.post("/predictions", json={})).json()
    assert body["status"] == "failed"
    assert body["error"] == "the output holds nan, which JSON cannot carry"


async def test_setup_gets_its_weights_as_cog_passes_them(aiohttp_client, tmp_path, monkeypatch):
    directory = model_dir(
        tmp_path,
        """
        from cog import BasePredictor

        class Predictor(BasePredictor):
            async def setup(self, weights):
                self.weights = f"{type(weights).__name__}:{weights}"

            def predict(self) -> str:
                return self.weights
        """,
    )
    _, client = await serve(aiohttp_client, directory)
    assert (await (await client.post("/predictions", json={})).json())["output"] == "NoneType:None"
    (directory / "weights").mkdir()
    _, client = await serve(aiohttp_client, directory)
    assert (await (await client.post("/predictions", json={})).json())["output"] == "Path:weights"
    monkeypatch.setenv("COG_WEIGHTS", "https://example.com/w.bin")
    _, client = await serve(aiohttp_client, directory)
    body = await (await client.post("/predictions", json={})).json()
    assert body["output"] == "str:https://example.com/w.bin"
