"""The HTTP contract of today's Cog, for both generations of model.

- ``GET /health-check``: ``{"status": "STARTING" | "READY" | "BUSY" | "SETUP_FAILED" |
  "DEFUNCT", "setup": {started_at, completed_at, status, logs}}``, always 200.
- ``POST /predictions`` with ``{"input": {...}, "id"?, "webhook"?,
  "webhook_events_filter"?}``: the prediction, answered when it is over (200, also when it
  failed: ``status`` says so); with ``Prefer: respond-async``, 202 at once and the
  prediction runs on, telling its ``webhook``. Invalid input: 422 ``{"detail": [{"loc",
  "msg", "type"}]}``. Every slot and queue place taken: 409. A synchronous prediction
  whose client hangs up is cancelled.
- ``PUT /predictions/{id}``: the same, idempotent: a prediction of that ID that runs (or
  has just run) is answered instead of a new one.
- ``POST /predictions/{id}/cancel``: 200 ``{}``, or 404 when no such prediction runs.
- ``GET /``: where the routes are.

File inputs arrive as ``data:`` URIs or ``http(s)`` URLs; file outputs go back as
``data:`` URIs or uploaded (:mod:`cog.runtime.files`).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import datetime as dt
import itertools
import json
import logging
import os
import shutil
import tempfile
import uuid
from typing import Any

import attrs
from aiohttp import web

import cog
from cog.runtime.files import FileError, Files, bytes_uri
from cog.runtime.supervisor import Busy, ModelWorker, NotReady, Outcome, State
from cog.runtime.webhooks import EVENTS, Webhook
from cog.signature import Argument, InputError
from cog.worker.protocol import BYTES, FILE, MARK

logger = logging.getLogger("cog.runtime")

#: Finished predictions kept for PUT retries (the most recent ones).
KEEP_DONE = 256
#: The logs a prediction keeps (characters; the latest ones).
MAX_LOGS = 1 << 20
_JSON = "application/json"
_HEALTH = {
    State.STARTING: "STARTING",
    State.READY: "READY",
    State.FAILED: "SETUP_FAILED",
    State.DEFUNCT: "DEFUNCT",
    State.STOPPING: "BUSY",  # finishing what runs, taking nothing new
}


def _time(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="microseconds")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _answer(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), status=status, content_type=_JSON)


def _detail(problems: list[tuple[list[Any], str, str]]) -> web.Response:
    detail = [{"loc": loc, "msg": msg, "type": kind} for loc, msg, kind in problems]
    return _answer({"detail": detail}, 422)


@attrs.define(eq=False)
class Prediction:
    id: str
    #: the input as the client gave it (secrets masked), echoed in answers
    input: dict[str, Any]
    #: the input as given, to tell a PUT retry from a new prediction
    given: dict[str, Any]
    created_at: dt.datetime
    status: str = "starting"
    started_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    output: Any = None
    #: what an iterator yielded so far, each as the client gets it
    items: list[Any] | None = None
    logs: collections.deque[str] = attrs.field(factory=collections.deque)
    log_size: int = 0
    error: str | None = None
    predict_time: float | None = None
    webhook: Webhook | None = None
    #: done when the prediction is over (its answer is in Predictions._done then)
    finished: asyncio.Future[None] | None = None
    #: encodes yielded items one after another (files may need a read or an upload)
    chain: asyncio.Future[None] | None = None

    def to_json(self) -> dict[str, Any]:
        logs = "\n".join(self.logs)
        return {
            "id": self.id,
            "input": self.input,
            "output": self.items if self.output is None else self.output,
            "logs": logs + "\n" if logs else "",
            "error": self.error,
            "status": self.status,
            "created_at": _time(self.created_at),
            "started_at": _time(self.started_at),
            "completed_at": _time(self.completed_at),
            "metrics": {} if self.predict_time is None else {"predict_time": self.predict_time},
        }

    def log(self, line: str) -> None:
        self.logs.append(line)
        self.log_size += len(line) + 1
        while self.log_size > MAX_LOGS and len(self.logs) > 1:
            self.log_size -= len(self.logs.popleft()) + 1


class Predictions:
    """The routes of today's Cog over one model worker."""

    def __init__(self, runner: ModelWorker, files: Files) -> None:
        self.runner = runner
        self.files = files
        self._live: dict[str, Prediction] = {}
        self._done: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        # IDs of predictions made without one: unique, and cheap to make.
        self._prefix = uuid.uuid4().hex[:16]
        self._ids = itertools.count(1)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.root),
            web.get("/health-check", self.health_check),
            web.post("/predictions", self.create),
            web.put("/predictions/{id}", self.create),
            web.post("/predictions/{id}/cancel", self.cancel),
        ]

    async def close(self) -> None:
        for prediction in list(self._live.values()):
            if prediction.finished is not None:
                await asyncio.wait([prediction.finished])
        await self.files.close()

    # -- routes -------------------------------------------------------------------------

    async def root(self, request: web.Request) -> web.Response:
        return _answer(
            {
                "cog_version": cog.__version__,
                "docs_url": "/docs",
                "openapi_url": "/openapi.json",
                "healthcheck_url": "/health-check",
                "predictions_url": "/predictions",
                "predictions_idempotent_url": "/predictions/{prediction_id}",
                "predictions_cancel_url": "/predictions/{prediction_id}/cancel",
            }
        )

    async def health_check(self, request: web.Request) -> web.Response:
        runner = self.runner
        status = _HEALTH[runner.state]
        if status == "READY" and runner.busy:
            status = "BUSY"
        setup = runner.setup
        body: dict[str, Any] = {
            "status": status,
            "setup": {
                "started_at": _time(setup.started_at),
                "completed_at": _time(setup.completed_at),
                "status": setup.status,
                "logs": "".join(line + "\n" for line in setup.logs),
            },
        }
        if runner.error and runner.state in (State.FAILED, State.DEFUNCT):
            body["error"] = runner.error
        return _answer(body)

    async def cancel(self, request: web.Request) -> web.Response:
        prediction = self._live.get(request.match_info["id"])
        if prediction is None or not self.runner.cancel(prediction.id):
            return _answer({"detail": "Not Found"}, 404)
        return _answer({})

    async def create(self, request: web.Request) -> web.StreamResponse:
        wanted = request.match_info.get("id")
        try:
            body = await request.json(loads=json.loads)
        except ValueError as e:
            return _detail([(["body", 0], f"invalid JSON: {e}", "value_error.jsondecode")])
        if not isinstance(body, dict):
            return _detail([(["body"], "expected an object", "type_error.dict")])
        problems = _request_problems(body, wanted)
        if problems:
            return _detail(problems)
        prediction_id = wanted or body.get("id") or self._new_id()
        respond_async = "respond-async" in request.headers.get("Prefer", "")
        given = body.get("input") or {}

        existing = self._live.get(prediction_id)
        if existing is not None:
            if existing.given != given or wanted is None:
                return _answer({"detail": f"a prediction {prediction_id} is running already"}, 409)
            return await self._answer(request, existing, respond_async)
        if wanted is not None and prediction_id in self._done:
            return _answer(self._done[prediction_id], 202 if respond_async else 200)

        runner = self.runner
        if runner.signature is None or runner.state is not State.READY:
            error = NotReady(runner.state, runner.error)
            return _answer({"detail": str(error)}, 503)
        values, problems = validate_input(runner.arguments, given)
        if problems:
            return _detail(problems)
        try:
            runner.admit()
        except Busy:
            return _answer({"detail": "Already running a prediction"}, 409)
        except NotReady as e:
            return _answer({"detail": str(e)}, 503)
        prediction = Prediction(
            id=prediction_id,
            input=_masked(runner.arguments, given),
            given=given,
            created_at=_now(),
        )
        webhook = body.get("webhook")
        if webhook:
            events = frozenset(body.get("webhook_events_filter") or EVENTS)
            session = await self.files.session()
            prediction.webhook = Webhook(session, webhook, events, prediction.to_json)
        self._live[prediction_id] = prediction
        prediction.finished = asyncio.get_running_loop().create_future()
        if respond_async:
            self._tasks.add(task := asyncio.ensure_future(self._run(prediction, values)))
            task.add_done_callback(self._tasks.discard)
            return _answer(prediction.to_json(), 202)
        # In this handler: a client that hangs up cancels it (see _run).
        await self._run(prediction, values)
        return _answer(self._done.get(prediction.id) or prediction.to_json())

    async def _answer(
        self, request: web.Request, prediction: Prediction, respond_async: bool
    ) -> web.Response:
        """A prediction that runs already, for a retry of the request that made it."""
        if respond_async:
            return _answer(prediction.to_json(), 202)
        assert prediction.finished is not None
        await asyncio.shield(prediction.finished)
        return _answer(self._done.get(prediction.id) or prediction.to_json())

    def _new_id(self) -> str:
        return f"{self._prefix}{next(self._ids):x}"

    # -- one prediction -----------------------------------------------------------------

    async def _run(self, prediction: Prediction, values: dict[str, Any]) -> None:
        runner = self.runner
        directory = os.path.join(tempfile.gettempdir(), f"cog-prediction-{os.urandom(8).hex()}")
        webhook = prediction.webhook
        if webhook is not None:
            webhook.event("start")

        def started() -> None:
            prediction.status = "processing"
            prediction.started_at = _now()

        def on_output(value: Any) -> None:
            if prediction.items is None:
                prediction.items = []
            previous = prediction.chain
            prediction.chain = asyncio.ensure_future(self._append(prediction, previous, value))

        def on_log(line: str) -> None:
            prediction.log(line)
            if webhook is not None:
                webhook.event("logs")

        try:
            inputs = values
            if runner.has_files:
                inputs = await self.files.fetch_inputs(runner.arguments, values, directory)
            outcome = await runner.run(
                inputs,
                prediction.id,
                directory=directory,
                on_output=on_output,
                on_log=on_log,
                on_start=started,
                cancel_on_abandon=True,
            )
            if prediction.chain is not None:
                await prediction.chain
            await self._finish(prediction, outcome)
        except FileError as e:
            prediction.status, prediction.error = "failed", str(e)
        except NotReady as e:
            prediction.status, prediction.error = "failed", str(e)
        except asyncio.CancelledError:
            # The client of a synchronous prediction hung up: it is cancelled (the slot is
            # the worker's until it has stopped).
            logger.info("[%s] the client hung up; cancelled", prediction.id)
            prediction.status = "canceled"
            raise
        except Exception as e:  # a bug of ours: the prediction fails, the server goes on
            logger.error("[%s] failed: %r", prediction.id, e, exc_info=e)
            prediction.status, prediction.error = "failed", f"internal error: {e}"
        finally:
            runner.release()
            prediction.completed_at = _now()
            if prediction.started_at is None:
                prediction.started_at = prediction.completed_at
            self._live.pop(prediction.id, None)
            self._done[prediction.id] = prediction.to_json()
            while len(self._done) > KEEP_DONE:
                self._done.popitem(last=False)
            if os.path.lexists(directory):  # files came in, or the model wrote some
                await asyncio.to_thread(shutil.rmtree, directory, True)
            if prediction.finished is not None and not prediction.finished.done():
                prediction.finished.set_result(None)
            if webhook is not None:
                webhook.event("completed")
                await webhook.close()

    async def _finish(self, prediction: Prediction, outcome: Outcome) -> None:
        prediction.predict_time = outcome.seconds
        if outcome.canceled:
            prediction.status = "canceled"
            return
        if outcome.error is not None:
            prediction.status, prediction.error = "failed", str(outcome.error)
            return
        output = self.runner.signature.output if self.runner.signature else None
        if prediction.items is not None or (output is not None and output.iterator):
            prediction.output = prediction.items or []  # what it yielded, as sent
        else:
            try:
                prediction.output = await self.client_value(outcome.value)
            except FileError as e:
                prediction.status, prediction.error = "failed", str(e)
                return
        prediction.status = "succeeded"
        if prediction.webhook is not None:
            prediction.webhook.event("output")

    async def _append(
        self, prediction: Prediction, previous: asyncio.Future[None] | None, value: Any
    ) -> None:
        if previous is not None:
            await previous
        item = await self.client_value(value)
        assert prediction.items is not None
        prediction.items.append(item)
        if prediction.webhook is not None:
            prediction.webhook.event("output")

    async def client_value(self, value: Any) -> Any:
        """A value from the worker as the client gets it: files as data: URIs (or uploaded)."""
        if isinstance(value, dict):
            mark = value.get(MARK)
            if mark == FILE:
                return await self.files.send(value["path"])
            if mark == BYTES:
                return bytes_uri(base64.b64decode(value["base64"]))
            return {k: await self.client_value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [await self.client_value(v) for v in value]
        return value


def _request_problems(body: dict[str, Any], wanted: str | None) -> list[tuple[list[Any], str, str]]:
    problems: list[tuple[list[Any], str, str]] = []
    given = body.get("input")
    if given is not None and not isinstance(given, dict):
        problems.append((["body", "input"], "value is not a valid dict", "type_error.dict"))
    identifier = body.get("id")
    if identifier is not None and not isinstance(identifier, str):
        problems.append((["body", "id"], "str type expected", "type_error.str"))
    elif wanted is not None and identifier is not None and identifier != wanted:
        problems.append((["body", "id"], "does not match the ID in the path", "value_error"))
    webhook = body.get("webhook")
    if webhook is not None and (
        not isinstance(webhook, str) or not webhook.startswith(("http://", "https://"))
    ):
        problems.append((["body", "webhook"], "invalid or missing URL scheme", "value_error.url"))
    events = body.get("webhook_events_filter")
    if events is not None and (
        not isinstance(events, list) or any(e not in EVENTS for e in events)
    ):
        problems.append(
            (
                ["body", "webhook_events_filter"],
                f"value is not a list of {', '.join(EVENTS)}",
                "type_error.enum",
            )
        )
    return problems


def validate_input(
    arguments: dict[str, Argument], given: dict[str, Any]
) -> tuple[dict[str, Any], list[tuple[list[Any], str, str]]]:
    """The model's inputs from a prediction's ``input``, defaults filled in; and every
    problem, as Cog reports them. Names the model does not have are ignored, as Cog does."""
    values: dict[str, Any] = {}
    problems: list[tuple[list[Any], str, str]] = []
    for name, argument in arguments.items():
        if name not in given:
            if argument.required:
                problems.append((["body", "input", name], "field required", "value_error.missing"))
            else:
                default = argument.default
                values[name] = list(default) if argument.is_list and default else default
            continue
        try:
            values[name] = argument.validate(given[name])
        except InputError as e:
            problems.append((["body", "input", name], str(e), "value_error"))
    return values, problems


def _masked(arguments: dict[str, Argument], given: dict[str, Any]) -> dict[str, Any]:
    """The input to echo: secrets as Cog shows them once sent."""
    secret = [n for n, a in arguments.items() if a.type == "Secret" and given.get(n) is not None]
    if not secret:
        return given
    return {k: ("**********" if k in secret else v) for k, v in given.items()}
