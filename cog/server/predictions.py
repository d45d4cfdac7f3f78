"""``POST /v1/packages/<id>/predictions``: one inference of a stored package, run on the
server's Docker Engine in a warm container of its CPU image (:mod:`cog.server.warm`).

Inputs come as the image's own route takes them (a multipart form, streamed through as
it came) or as JSON ``{"input": {...}}`` with files as ``data:`` URIs. A form is answered
as the model answered (text, JSON, or a file to download); JSON is answered with JSON,
``{"status": "succeeded", "output": ..., "metrics": {"predict_time": s}}``, a file output
as a ``data:`` URI; both stream, whatever the size of the output. A model's own error
(bad input, run() raised) is passed on with its status.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import json
import mimetypes
import re
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from cog.engine.containers import ModelContainer
from cog.multipart import MalformedBody, parsing
from cog.package import short_id
from cog.server.auth import Routes, Scope
from cog.server.keys import WARM_POOL
from cog.server.model_api import (
    CHUNK,
    Answer,
    BadInputs,
    FormInputs,
    FormValues,
    Inputs,
    JsonInputs,
    ModelAPI,
    PredictionFailed,
    TooLarge,
    adapter_for,
)
from cog.server.records import PackageRecord, Status
from cog.server.settings import PredictionOptions
from cog.server.views import resolve
from cog.units import format_size

#: the most of a model's error answer read (it is JSON of a line or two)
MAX_ERROR_BYTES = 64 * 1024


def add_routes(app: web.Application) -> None:
    Routes(app).post("/v1/packages/{ref}/predictions", predict, Scope.RUN)


async def predict(request: web.Request) -> web.StreamResponse:
    record = await resolve(request, request.match_info["ref"])
    pool = request.app.get(WARM_POOL)
    if pool is None:
        raise web.HTTPConflict(text="this server runs no models (it has no builder)")
    image = runnable_image(record)
    options = pool.options
    api = adapter_for(record)
    inputs = await read_inputs(request, options, streams_forms=api.streams_forms)
    async with pool.model(record.id, image) as model:
        try:
            return await asyncio.wait_for(_answer(request, model, api, inputs), options.timeout)
        except asyncio.TimeoutError:
            raise PredictionFailed(
                f"the model gave no answer within {options.timeout:g}s; it was stopped",
                504,
                model.log_tail(),
            ) from None
        except aiohttp.ClientError as exc:
            if isinstance(exc.__cause__, TooLarge):
                raise exc.__cause__ from None
            failure = await model.failure("answering the prediction", exc)
            raise PredictionFailed(str(failure), 502, failure.logs) from None


def runnable_image(record: PackageRecord) -> str:
    """The package's CPU image, if it is ready to run (409 otherwise)."""
    images = {a.target: a.uri for a in record.artifacts}
    image = images.get("docker-cpu")
    if record.status is not Status.READY or image is None:
        why = record.status.value if record.status is not Status.READY else "it has no CPU image"
        raise web.HTTPConflict(text=f"package {short_id(record.id)} cannot run: {why}")
    return image


async def read_inputs(
    request: web.Request, options: PredictionOptions, *, streams_forms: bool = True
) -> Inputs:
    """The request's inputs: a form streamed through as it came (``streams_forms``) or
    read whole into FormValues (for a model that takes JSON, within the JSON bound);
    JSON read whole."""
    kind = request.content_type
    declared = request.content_length
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded") and not streams_forms:
        return FormValues(await read_form_values(request, options.max_json_bytes))
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        if declared is not None and declared > options.max_form_bytes:
            raise TooLarge(_too_large("form", options.max_form_bytes))
        return FormInputs(
            request.headers["Content-Type"], _capped(request.content, options.max_form_bytes)
        )
    if kind == "application/json":
        limit = options.max_json_bytes
        if declared is not None and declared > limit:
            raise TooLarge(_too_large("JSON request", limit))
        body = bytearray()
        async for chunk in request.content.iter_chunked(CHUNK):
            body += chunk
            if len(body) > limit:
                raise TooLarge(_too_large("JSON request", limit))
        try:
            document = json.loads(body)
        except ValueError as exc:
            raise BadInputs(f"the body is not valid JSON: {exc}") from None
        values = document.get("input") if isinstance(document, dict) else None
        if not isinstance(values, dict):
            raise BadInputs('expected JSON {"input": {"name": value, ...}}')
        return JsonInputs(values)
    raise web.HTTPUnsupportedMediaType(
        text='send the inputs as a multipart form or as JSON {"input": {...}}, '
        f"not {kind or 'no Content-Type'}"
    )


async def read_form_values(request: web.Request, limit: int) -> dict[str, Any]:
    """A form read into input name -> text, or a file as a data: URI (a name given more
    than once: a list); TooLarge once what it becomes passes ``limit`` bytes."""
    values: dict[str, Any] = {}
    size = 0

    def add(name: str, value: str) -> None:
        previous = values.get(name)
        if previous is None:
            values[name] = value
        else:
            values[name] = [*previous, value] if isinstance(previous, list) else [previous, value]

    def count(more: int) -> None:
        nonlocal size
        size += more
        if size > limit:
            raise TooLarge(_too_large("form (read as the JSON this model takes)", limit))

    if request.content_type == "application/x-www-form-urlencoded":
        body = bytearray()
        async for chunk in request.content.iter_chunked(CHUNK):
            count(len(chunk))
            body += chunk
        for name, value in urllib.parse.parse_qsl(body.decode(errors="replace"), True):
            add(name, value)
        return values
    try:
        reader = await parsing(request.multipart())
        while (part := await parsing(reader.next())) is not None:
            if not isinstance(part, aiohttp.BodyPartReader) or not part.name:
                raise BadInputs("the form has a part without a name, or a nested one")
            data = bytearray()
            while chunk := await parsing(part.read_chunk(CHUNK)):
                # A file grows by a third as base64.
                count(len(chunk) * 4 // 3 + 4 if part.filename is not None else len(chunk))
                data += chunk
            if part.filename is None:
                add(part.name, data.decode(part.get_charset("utf-8"), errors="replace"))
            else:
                kind = part.headers.get("Content-Type", "")
                if not re.fullmatch(r"[\w.+-]+/[\w.+-]+", kind):
                    kind = mimetypes.guess_type(part.filename)[0] or "application/octet-stream"
                add(part.name, f"data:{kind};base64,{base64.b64encode(data).decode()}")
    except MalformedBody as exc:
        raise BadInputs(f"the form cannot be read: {exc}") from None
    return values


def _too_large(what: str, limit: int) -> str:
    return f"the {what} is larger than {format_size(limit)}, the most this server takes"


async def _capped(content: aiohttp.StreamReader, limit: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in content.iter_chunked(CHUNK):
        seen += len(chunk)
        if seen > limit:
            raise TooLarge(_too_large("form", limit))
        yield chunk


async def _answer(
    request: web.Request, model: ModelContainer, api: ModelAPI, inputs: Inputs
) -> web.StreamResponse:
    async with api.send(model, inputs) as answer:
        if answer.status != 200:
            return await _model_error(answer)
        if isinstance(inputs, JsonInputs):
            return await _as_json(request, answer)
        headers = dict(answer.headers)
        charset = f"; charset={answer.charset}" if answer.charset else ""
        headers.setdefault("Content-Type", answer.content_type + charset)
        response = web.StreamResponse(headers=headers)
        if answer.content_length is not None:
            response.content_length = answer.content_length
        await response.prepare(request)
        async for chunk in answer.body:
            await response.write(chunk)
        await response.write_eof()
        return response


async def _model_error(answer: Answer) -> web.Response:
    """The model's error answer, passed on: JSON ``{"error", ...}`` with its status."""
    body = bytearray()
    async for chunk in answer.body:
        body += chunk
        if len(body) >= MAX_ERROR_BYTES:
            del body[MAX_ERROR_BYTES:]
            break
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict) or "error" not in document:
        document = {"error": body.decode(errors="replace").strip() or answer.reason}
    headers = (
        {"Retry-After": answer.headers["Retry-After"]} if "Retry-After" in answer.headers else {}
    )
    return web.json_response(document, status=answer.status, headers=headers)


async def _as_json(request: web.Request, answer: Answer) -> web.StreamResponse:
    """``{"status": "succeeded", "output": ..., "metrics": ...}``, written as the output
    comes: JSON as it is, text as a JSON string, a file as a data: URI."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    await response.write(b'{"status":"succeeded","output":')
    kind = answer.content_type
    if kind == "application/json":
        async for chunk in answer.body:
            await response.write(chunk)
    elif kind.startswith("text/"):
        decoder = codecs.getincrementaldecoder(answer.charset or "utf-8")(errors="replace")
        await response.write(b'"')
        async for chunk in answer.body:
            await response.write(_json_string_body(decoder.decode(chunk)))
        await response.write(_json_string_body(decoder.decode(b"", final=True)) + b'"')
    else:
        await response.write(f'"data:{kind};base64,'.encode())
        pending = b""
        async for chunk in answer.body:
            pending += chunk
            whole = len(pending) - len(pending) % 3  # base64 of whole 3-byte groups only
            await response.write(base64.b64encode(pending[:whole]))
            pending = pending[whole:]
        await response.write(base64.b64encode(pending) + b'"')
    metrics: dict[str, Any] = {}
    if "X-Run-Time" in answer.headers:
        metrics["predict_time"] = float(answer.headers["X-Run-Time"])
    await response.write(b',"metrics":' + json.dumps(metrics).encode() + b"}")
    await response.write_eof()
    return response


def _json_string_body(text: str) -> bytes:
    return json.dumps(text)[1:-1].encode()
