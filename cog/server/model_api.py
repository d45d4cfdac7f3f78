"""How the server talks to a running model image: one adapter per kind of model.

A prediction's inputs reach the server as a form (multipart, passed through as it came,
streamed, or read whole for a model that takes JSON) or as JSON (``{"input": {...}}``,
files as ``data:`` URIs); the adapter sends them the way the image takes them, and hands
back the image's answer as an :class:`Answer`, in the shape the server's route gives it.

A 2021 ``cog.Model`` is served by ``POST /infer``, with a form: :class:`InferRoute`. A
predictor of today's Cog is served by ``POST /predictions``, with JSON:
:class:`PredictionsRoute`, which translates Cog's prediction into the same answers (the
output as text, a file or JSON; an error with its status). :func:`adapter_for` picks one
from the package's record.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import mimetypes
import re
from collections.abc import AsyncIterator, Mapping
from http import HTTPStatus
from typing import Any, AsyncContextManager, Protocol

import aiohttp
import attrs

from cog.config_formats import PREDICT_FORMAT
from cog.engine.containers import ModelContainer
from cog.server.answers import PREDICTION_BYTES, read_at_most
from cog.server.records import PackageRecord
from cog.signature import InputError, Signature
from cog.units import format_size

#: headers of the model's answer passed on to the client
PASSED_ON = ("Content-Type", "Content-Disposition", "X-Run-Time", "X-Setup-Time", "Retry-After")
CHUNK = 256 * 1024


class BadInputs(ValueError):
    """Inputs the server cannot pass on (400)."""


class PredictionFailed(Exception):
    """The model could not answer: it died, or took too long (502/504)."""

    def __init__(self, message: str, status: int, logs: tuple[str, ...] = ()):
        super().__init__(message)
        self.http_status = status
        self.logs = logs


class TooLarge(Exception):
    """A request over the size this server takes (413)."""


@attrs.frozen
class FormInputs:
    """A form as the client sent it: its Content-Type (with the boundary) and its body."""

    content_type: str
    body: AsyncIterator[bytes]


@attrs.frozen
class FormValues:
    """A form read whole, for a model that takes JSON: input name -> its text, or a file
    as a ``data:`` URI; a name given more than once -> a list of them."""

    values: dict[str, Any]


@attrs.frozen
class JsonInputs:
    """Input name -> value; a file as a ``data:`` URI."""

    values: dict[str, Any]


Inputs = FormInputs | FormValues | JsonInputs


@attrs.frozen
class Answer:
    """The model's answer as the server passes it on: for a form, the output as it is
    (text, JSON, or a file); for JSON inputs, the output as JSON; an error as JSON with
    its status."""

    status: int
    content_type: str
    body: AsyncIterator[bytes]
    #: of PASSED_ON
    headers: Mapping[str, str] = attrs.field(factory=dict)
    content_length: int | None = None
    charset: str | None = None

    @property
    def reason(self) -> str:
        return HTTPStatus(self.status).phrase if self.status in HTTPStatus else str(self.status)


class ModelAPI(Protocol):
    #: whether a form goes to the model as the client sent it (else the server reads it
    #: whole first, as FormValues)
    streams_forms: bool

    def send(self, model: ModelContainer, inputs: Inputs) -> AsyncContextManager[Answer]:
        """The request to the model: ``async with api.send(model, inputs) as answer``."""


_DATA_URI = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.I)


def decode_data_uri(name: str, value: str) -> tuple[bytes, str]:
    """The bytes of a ``data:...;base64,`` URI and a file name for them."""
    data, kind = _decode(name, value)
    return data, f"{name}{mimetypes.guess_extension(kind) or '.bin'}"


def _decode(name: str, value: str) -> tuple[bytes, str]:
    match = _DATA_URI.match(value)
    if match is None:
        raise BadInputs(f"input {name}: a file is sent as a data:...;base64, URI")
    try:
        data = base64.b64decode(value[match.end() :], validate=True)
    except (binascii.Error, ValueError):
        raise BadInputs(f"input {name}: the data: URI is not valid base64") from None
    return data, (match.group("type") or "application/octet-stream").lower()


class InferRoute:
    """Images with the 2021 routes: ``POST /infer`` takes a form."""

    streams_forms = True

    @contextlib.asynccontextmanager
    async def send(self, model: ModelContainer, inputs: Inputs) -> AsyncIterator[Answer]:
        if isinstance(inputs, FormInputs):
            request = model.request(
                "POST", "/infer", data=inputs.body, headers={"Content-Type": inputs.content_type}
            )
        else:
            request = model.request("POST", "/infer", data=self.form(inputs.values))
        async with request as response:
            yield Answer(
                response.status,
                response.content_type,
                response.content.iter_chunked(CHUNK),
                {k: response.headers[k] for k in PASSED_ON if k in response.headers},
                response.content_length,
                response.charset,
            )

    @staticmethod
    def form(values: dict[str, Any]) -> aiohttp.FormData:
        form = aiohttp.FormData()
        for name, value in values.items():
            if isinstance(value, bool):
                form.add_field(name, "true" if value else "false")
            elif isinstance(value, (int, float)):
                form.add_field(name, repr(value))
            elif isinstance(value, str) and value[:5].lower() == "data:":
                data, filename = decode_data_uri(name, value)
                form.add_field(name, data, filename=filename)
            elif isinstance(value, str):
                form.add_field(name, value)
            else:
                raise BadInputs(
                    f"input {name}: expected text, a number, true/false or a data: URI, "
                    f"got {type(value).__name__}"
                )
        return form


class PredictionsRoute:
    """Predictors of today's Cog: ``POST /predictions`` takes JSON and answers Cog's
    prediction, read up to PREDICTION_BYTES (data: URIs included) to be translated.

    ``signature``: the predictor's, as read from its source; None asks the image
    (``/help``), and an image that serves a 2021 model after all gets its form.
    """

    streams_forms = False

    def __init__(self, signature: Signature | None = None):
        self.signature = signature

    @contextlib.asynccontextmanager
    async def send(self, model: ModelContainer, inputs: Inputs) -> AsyncIterator[Answer]:
        assert not isinstance(inputs, FormInputs), "a predictor's form is read whole first"
        signature = self.signature
        if signature is None:
            signature = Signature.from_json(await model.help())
            if signature.kind != "predictor":
                async with InferRoute().send(model, inputs) as answer:
                    yield answer
                return
        values = inputs.values
        if isinstance(inputs, FormValues):
            values, problems = typed_values(signature, values)
            if problems:
                yield _json_answer(400, _invalid(problems))
                return
        async with model.request("POST", "/predictions", json={"input": values}) as response:
            body, more = await read_at_most(response, PREDICTION_BYTES)
            status = response.status
        if more:
            raise PredictionFailed(
                f"the model's answer is larger than {format_size(PREDICTION_BYTES)}, the most "
                "this server reads of a prediction",
                502,
                model.log_tail(),
            )
        yield prediction_answer(status, body, signature, as_json=isinstance(inputs, JsonInputs))


def typed_values(
    signature: Signature, values: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """A form's texts as the JSON values the predictor's inputs take (files stay data:
    URIs, a list input gets a list); and the problems, as ``{"input", "message"}``."""
    typed: dict[str, Any] = {}
    problems: list[dict[str, str]] = []
    for name, value in values.items():
        argument = signature.argument(name)
        items = value if isinstance(value, list) else [value]
        if argument is None or argument.is_file or argument.type in ("str", "Secret"):
            converted = items  # passed on: the model says what it makes of them
        else:
            try:
                converted = [argument.convert(item) for item in items]
            except InputError as exc:
                problems.append({"input": name, "message": str(exc)})
                continue
        if argument is not None and argument.is_list:
            typed[name] = converted
        elif len(converted) == 1:
            typed[name] = converted[0]
        else:
            problems.append({"input": name, "message": "takes one value, not a list"})
    return typed, problems


def prediction_answer(status: int, body: bytes, signature: Signature, *, as_json: bool) -> Answer:
    """Cog's answer to ``POST /predictions`` as the server's route gives it."""
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if status == 422:
        detail = document.get("detail") if isinstance(document, dict) else None
        problems = [
            {"input": str((d.get("loc") or ["?"])[-1]), "message": str(d.get("msg"))}
            for d in (detail if isinstance(detail, list) else [])
            if isinstance(d, dict)
        ]
        return _json_answer(400, _invalid(problems))
    if status != 200 or not isinstance(document, dict):
        message = ""
        if isinstance(document, dict):
            message = document.get("error") or document.get("detail") or ""
        text = str(message) or body[:300].decode(errors="replace").strip()
        return _json_answer(status if status != 200 else 502, {"error": text or "no answer"})
    headers = {}
    predict_time = (document.get("metrics") or {}).get("predict_time")
    if isinstance(predict_time, (int, float)):
        headers["X-Run-Time"] = f"{predict_time:.6f}"
    if document.get("status") != "succeeded":
        logs = str(document.get("logs") or "").splitlines()[-20:]
        error = document.get("error") or f"the prediction {document.get('status')}"
        return _json_answer(500, {"error": str(error), "logs": logs}, headers)
    output = document.get("output")
    if as_json:
        return _json_answer(200, output, headers)
    kind = signature.output
    if kind is not None and kind.concatenate and isinstance(output, list):
        output = "".join(str(piece) for piece in output)
    if isinstance(output, str) and output[:5].lower() == "data:":
        data, content_type = _decode("output", output)
        name = f"output{mimetypes.guess_extension(content_type) or '.bin'}"
        headers["Content-Disposition"] = f'attachment; filename="{name}"'
        return _bytes_answer(200, content_type, data, headers)
    if isinstance(output, str):
        return _bytes_answer(200, "text/plain", output.encode(), headers, "utf-8")
    return _json_answer(200, output, headers)


def _invalid(problems: list[dict[str, str]]) -> dict[str, Any]:
    shown = "; ".join(f"{p['input']}: {p['message']}" for p in problems)
    return {"error": f"invalid input: {shown}", "problems": problems}


def _json_answer(status: int, value: Any, headers: Mapping[str, str] | None = None) -> Answer:
    return _bytes_answer(status, "application/json", json.dumps(value).encode(), headers)


def _bytes_answer(
    status: int,
    content_type: str,
    data: bytes,
    headers: Mapping[str, str] | None = None,
    charset: str | None = None,
) -> Answer:
    async def body() -> AsyncIterator[bytes]:
        for start in range(0, len(data), CHUNK):
            yield data[start : start + CHUNK]

    return Answer(status, content_type, body(), dict(headers or {}), len(data), charset)


def adapter_for(record: PackageRecord) -> ModelAPI:
    """The adapter for the package's kind of model: its signature says; when it could not
    be read from the source, today's cog.yaml format says a predictor (whose image then
    tells), else a 2021 model."""
    if record.signature is not None:
        if record.signature.get("kind") == "predictor":
            return PredictionsRoute(Signature.from_json(record.signature))
        return InferRoute()
    if record.config.format == PREDICT_FORMAT:
        return PredictionsRoute()
    return InferRoute()
