"""The inference server's HTTP routes.

- ``GET /ping``: 200 ``{"status": "ready"}``; 503 ``{"status": "starting"}``,
  ``{"status": "failed", "error": ...}`` or ``{"status": "stopping"}``.
- ``GET /help``: the signature, ``{"arguments": {...}}`` (see :mod:`cog.signature`).
- ``GET /openapi.json``: the same as an OpenAPI 3.0 document (:mod:`cog.openapi`).
- ``POST /infer``: a multipart form (or urlencoded, for text only) of the inputs. The
  response is the output (see :mod:`cog.runtime.outputs`) with ``X-Setup-Time`` and
  ``X-Run-Time`` (seconds) and ``X-Request-ID``. Errors are JSON ``{"error": message}``:
  400 (with ``problems``, every one; or a malformed body), 413 (a urlencoded form over
  4 MiB), 415 (not a form), 500 (run() raised; the traceback is only in the log), 503 (not
  ready, busy, or shutting down; with ``Retry-After`` when busy).

Every other error answer (an unknown route, a wrong method, an unexpected failure) is
JSON ``{"error": message}`` as well.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import sys
import time
from typing import Any, Union

from aiohttp import web

from cog.openapi import openapi_document
from cog.runtime.files import Files
from cog.runtime.inputs import BadBody, InvalidInput, read_inputs
from cog.runtime.model_ref import ModelLoadError, ModelRef
from cog.runtime.outputs import OutputError, from_wire, respond, to_wire
from cog.runtime.predictions import Predictions
from cog.runtime.supervisor import (
    DEFAULT_CANCEL_GRACE,
    DEFAULT_MAX_QUEUE,
    Busy,
    ModelWorker,
    NotReady,
    State,
)
from cog.runtime.worker_process import StartedWorker

logger = logging.getLogger("cog.runtime")

ModelSource = Union[type, str, ModelRef]
#: The largest JSON body of a prediction (its data: URIs included).
MAX_JSON_BODY = 100 * 1024 * 1024
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
_READY = json.dumps({"status": "ready"}).encode()


class InferenceServer:
    """One model behind the routes. ``app`` is the aiohttp application to serve.

    ``model`` is a ModelRef (the cog.yaml of a directory, see :meth:`from_directory`), a
    reference (``"predict.py:Predictor"`` in ``directory``), or a class of an importable
    module (for programs and tests that define one). The model runs in a worker process
    of ``python`` (default: this one), see :mod:`cog.runtime.supervisor`; ``started``
    is that process started already, with the same settings (``python -m cog.runtime``
    starts it before importing this module), ``load_error`` why it cannot be.
    """

    def __init__(
        self,
        model: ModelSource,
        *,
        directory: str = ".",
        concurrency: int | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        python: str | None = None,
        upload_url: str | None = None,
        cancel_grace: float = DEFAULT_CANCEL_GRACE,
        load_error: str | None = None,
        started: StartedWorker | None = None,
    ) -> None:
        env = None
        if isinstance(model, ModelRef):
            reference, directory = model.reference, model.directory
            concurrency = concurrency or model.concurrency
            env = model.worker_env()
        elif isinstance(model, type):
            reference = f"{model.__module__}:{model.__qualname__}"
            # The worker imports the class's module as this process does.
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        else:
            reference = model
        self.runner = ModelWorker(
            reference,
            directory=directory,
            concurrency=concurrency or 1,
            max_queue=max_queue,
            python=python,
            env=env,
            cancel_grace=cancel_grace,
        )
        self._load_error = load_error
        self._started = started
        # Request ids: unique per server process, cheap to make, short in the log.
        self._id_prefix = os.urandom(4).hex()
        self._ids = itertools.count(1)
        self.predictions = Predictions(self.runner, Files(upload_url))
        # client_max_size: a prediction's JSON, data: URIs included (/infer streams forms).
        self.app = web.Application(middlewares=[_json_errors], client_max_size=MAX_JSON_BODY)
        self.app.add_routes(
            [
                web.get("/ping", self.ping),
                web.get("/help", self.help),
                web.get("/openapi.json", self.openapi),
                web.post("/infer", self.infer),
                *self.predictions.routes(),
            ]
        )
        self.app.on_startup.append(self._start)
        self.app.on_cleanup.append(self._close)

    @classmethod
    def from_directory(cls, directory: str = ".", **settings: Any) -> InferenceServer:
        """The model named by ``directory/cog.yaml``; one that cannot be found is reported
        by /ping (and /health-check) as a failed setup."""
        try:
            return cls(ModelRef.from_directory(directory), **settings)
        except ModelLoadError as e:
            return cls("-", directory=directory, load_error=str(e), **settings)

    async def _start(self, app: web.Application) -> None:
        if self._load_error is not None:
            self.runner.fail(self._load_error)
        elif self._started is not None:
            started, self._started = self._started, None
            await self.runner.adopt(started)
        else:
            await self.runner.start()

    async def _close(self, app: web.Application) -> None:
        await self.predictions.close()
        await self.runner.close()

    async def ping(self, request: web.Request) -> web.Response:
        runner = self.runner
        if runner.state is State.READY:
            return web.Response(body=_READY, content_type="application/json")
        status: dict[str, Any] = {"status": runner.state.value}
        if runner.state is State.FAILED:
            status["error"] = runner.error
        return web.json_response(status, status=503)

    async def help(self, request: web.Request) -> web.Response:
        signature = self.runner.signature
        if signature is None:
            return _not_ready(NotReady(self.runner.state, self.runner.error))
        return web.json_response(signature.to_json())

    async def openapi(self, request: web.Request) -> web.Response:
        signature = self.runner.signature
        if signature is None:
            return _not_ready(NotReady(self.runner.state, self.runner.error))
        document = openapi_document(
            signature,
            title=self.runner.model_name,
            description=self.runner.model_doc.strip() or None,
        )
        return web.json_response(document)

    async def infer(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        tag = request.headers.get("X-Request-ID", "")
        if not _REQUEST_ID.match(tag):
            tag = f"{self._id_prefix}-{next(self._ids)}"
        headers = {"X-Request-ID": tag}
        runner = self.runner
        try:
            runner.admit()
        except NotReady as e:
            return _not_ready(e, headers)
        except Busy as e:
            headers["Retry-After"] = "1"
            return _error(503, str(e), headers)
        status = 500
        try:
            response = await self._infer(request, tag, headers)
            status = response.status
            return response
        finally:
            runner.release()
            # DEBUG: a log line costs about as much as the rest of a no-op inference's
            # overhead; `--log-level debug` turns the per-request lines on.
            logger.debug(
                "[%s] POST /infer %d in %.1fms",
                tag,
                status,
                (time.perf_counter() - started) * 1000,
            )

    async def _infer(
        self, request: web.Request, tag: str, headers: dict[str, str]
    ) -> web.StreamResponse:
        runner = self.runner
        assert runner.setup_time is not None
        try:
            inputs = await read_inputs(request, runner.arguments)
        except InvalidInput as e:
            return web.json_response(e.to_json(), status=400, headers=headers)
        except BadBody as e:
            return _error(e.status, str(e), headers)
        owned = True
        try:
            try:
                outcome = await runner.run(
                    to_wire(inputs.values), tag, directory=inputs.path, on_abandon=inputs.cleanup
                )
            except NotReady as e:  # shutdown began while this request waited
                return _not_ready(e, headers)
            except asyncio.CancelledError:
                owned = False  # the runner removes the files once run() is done with them
                raise
            headers["X-Setup-Time"] = f"{runner.setup_time:.6f}"
            headers["X-Run-Time"] = f"{outcome.seconds:.6f}"
            if outcome.error is not None:
                logger.error("[%s] run() failed: %s", tag, outcome.error)
                return _error(500, str(outcome.error), headers)
            try:
                value = from_wire(outcome.value)
                return await respond(request, value, headers, opened=inputs.cleanup)
            except OutputError as e:
                logger.error("[%s] %s", tag, e)
                return _error(500, str(e), headers)
        finally:
            if owned:
                inputs.cleanup()


def create_app(model: ModelSource, **settings: Any) -> web.Application:
    """The aiohttp application serving ``model`` (see InferenceServer)."""
    return InferenceServer(model, **settings).app


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error answer is JSON ``{"error": ...}``: aiohttp's own (404, 405, 413, ...)
    and an unexpected exception (500, logged with its traceback) too."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {k: v for k, v in e.headers.items() if k.lower() not in _ENTITY_HEADERS}
        return _error(e.status, _http_error_message(request, e), headers)
    except ConnectionError:  # the client is gone: nobody to answer
        raise
    except Exception as e:
        if request.writer.output_size > 0:  # a response is half sent: aiohttp drops it
            raise
        logger.error("%s %s failed: %r", request.method, request.path, e, exc_info=e)
        return _error(500, f"internal error: {type(e).__name__}: {e}")


_ENTITY_HEADERS = ("content-type", "content-length", "content-encoding")


def _http_error_message(request: web.Request, error: web.HTTPException) -> str:
    if isinstance(error, web.HTTPNotFound):
        return (
            f"not found: {request.path} (the routes are /health-check, /predictions, "
            "/openapi.json, and the 2021 model's /ping, /help, /infer)"
        )
    if isinstance(error, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(error.allowed_methods))
        return f"{request.method} is not allowed for {request.path}; use {allowed}"
    text = error.text or ""
    if not text or text == f"{error.status}: {error.reason}":  # aiohttp's default body
        return error.reason
    return text


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _not_ready(error: NotReady, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": str(error), "status": error.state.value}
    return web.json_response(body, status=503, headers=headers)
