"""How the server talks to a running model image: one adapter per kind of model.

A prediction's inputs reach the server as a form (multipart, passed through as it came,
streamed) or as JSON (``{"input": {...}}``, files as ``data:`` URIs); the adapter sends
them the way the image takes them, and hands back the image's answer as it comes.

Today's images serve the 2021 routes (``/ping``, ``/help``, ``POST /infer`` with a
form): :class:`InferRoute`. Images that serve today's Cog routes (``/health-check``,
``POST /predictions`` with JSON) get an adapter of their own here, chosen by
:func:`adapter_for` from the package's record.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
import re
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp
import attrs

from cog.engine.containers import ModelContainer
from cog.server.records import PackageRecord


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
class JsonInputs:
    """Input name -> value; a file as a ``data:`` URI."""

    values: dict[str, Any]


Inputs = FormInputs | JsonInputs


class ModelAPI(Protocol):
    def send(self, model: ModelContainer, inputs: Inputs) -> Any:
        """The request to the model: ``async with api.send(model, inputs) as response``;
        the response's status, headers and body are the model's answer."""


_DATA_URI = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.I)


def decode_data_uri(name: str, value: str) -> tuple[bytes, str]:
    """The bytes of a ``data:...;base64,`` URI and a file name for them."""
    match = _DATA_URI.match(value)
    if match is None:
        raise BadInputs(f"input {name}: a file is sent as a data:...;base64, URI")
    try:
        data = base64.b64decode(value[match.end() :], validate=True)
    except (binascii.Error, ValueError):
        raise BadInputs(f"input {name}: the data: URI is not valid base64") from None
    kind = (match.group("type") or "application/octet-stream").lower()
    return data, f"{name}{mimetypes.guess_extension(kind) or '.bin'}"


class InferRoute:
    """Images with the 2021 routes: ``POST /infer`` takes a form."""

    def send(self, model: ModelContainer, inputs: Inputs) -> Any:
        if isinstance(inputs, FormInputs):
            return model.request(
                "POST", "/infer", data=inputs.body, headers={"Content-Type": inputs.content_type}
            )
        return model.request("POST", "/infer", data=self.form(inputs.values))

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


def adapter_for(record: PackageRecord) -> ModelAPI:
    """The adapter for the package's kind of model (today, every one serves /infer)."""
    return InferRoute()
