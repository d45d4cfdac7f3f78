"""``cog infer`` (and ``cog predict``) on a predictor of today's Cog: inputs to JSON,
``POST /predictions``, outputs written as Cog writes them.

- ``-i name=value`` is converted to the input's type; ``-i name=@file`` sends the file as
  a ``data:`` URI; an ``http(s)://`` URL for a file input is downloaded here and sent so
  too (the model runs with no network); naming an input more than once builds a list.
- A file output is written to ``output.<ext>`` (or ``-o``), the files of a list output to
  ``output.<n>.<ext>``, those of an object output to ``output.<field>.<ext>``; the text of a
  ``ConcatenateIterator`` is joined; anything else is printed (JSON when not text).
"""

from __future__ import annotations

import base64
import binascii
import json
import mimetypes
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cog.signature import Argument, InputError, OutputType, Signature

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


class PredictionInputError(Exception):
    """An input from the command line that cannot be sent; one line."""


def to_json_value(argument: Argument, raw: str) -> Any:
    """One command-line value as the JSON the input takes."""
    if argument.is_file:
        if raw.startswith("data:"):
            return raw
        if raw.startswith(("http://", "https://")):
            return _fetched(argument.name, raw)
        path = Path(raw[1:] if raw.startswith("@") else raw).expanduser()
        if not path.is_file():
            raise PredictionInputError(f"input {argument.name}: no such file: {path}")
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        encoded = base64.b64encode(path.read_bytes()).decode()
        return f"data:{content_type};base64,{encoded}"
    if raw.startswith("@"):  # a text input's value from a file, as /infer allows
        path = Path(raw[1:]).expanduser()
        if not path.is_file():
            raise PredictionInputError(f"input {argument.name}: no such file: {path}")
        raw = path.read_text(encoding="utf-8")
    try:
        if argument.type == "bool":
            if raw.strip().lower() not in (*_TRUE, *_FALSE):
                raise InputError(f"{raw!r} is not a boolean (use true or false)")
            return raw.strip().lower() in _TRUE
        if argument.type in ("int", "float"):
            return argument.convert(raw)
    except InputError as e:
        raise PredictionInputError(f"input {argument.name}: {e}") from None
    return raw


def _fetched(name: str, url: str) -> str:
    """A file input's URL as a data: URI: cog runs the model with no network, so the
    model cannot fetch it itself."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
    except (OSError, ValueError) as exc:  # urllib's URLError and HTTPError are OSErrors
        reason = getattr(exc, "reason", None) or exc
        if isinstance(exc, urllib.error.HTTPError):
            exc.close()  # it holds the connection
            reason = f"HTTP {exc.code} {exc.reason}"
        raise PredictionInputError(f"input {name}: cannot download {url}: {reason}") from None
    if not content_type or content_type == "application/octet-stream":
        content_type = mimetypes.guess_type(url)[0] or "application/octet-stream"
    return f"data:{content_type};base64,{base64.b64encode(data).decode()}"


def prediction_input(signature: Signature, inputs: list[tuple[str, str]]) -> dict[str, Any]:
    """The ``input`` of a prediction from (name, raw value) pairs; repeated names build a
    list (for a list input, one value is a list of one)."""
    values: dict[str, Any] = {}
    for name, raw in inputs:
        argument = signature.argument(name)
        assert argument is not None  # resolve_names checked it
        value = to_json_value(argument, raw)
        if argument.is_list:
            values.setdefault(name, []).append(value)
        elif name in values:
            raise PredictionInputError(f"input {name} takes one value, not a list")
        else:
            values[name] = value
    return values


def write_output(
    output: Any, kind: OutputType | None, output_path: Path | None
) -> tuple[str | None, list[Path]]:
    """The text to print and the files written for a prediction's output."""
    written: list[Path] = []

    def save(uri: str, stem: str) -> str:
        data, ext = _decode(uri)
        if output_path is not None and stem == "output":
            target = output_path
        elif output_path is not None:
            suffix = output_path.suffix or ext
            target = output_path.with_name(f"{output_path.stem}{stem[len('output') :]}{suffix}")
        else:
            target = Path(f"{stem}{ext}")
        _write_atomically(target, data)
        written.append(target.resolve())
        return str(target)

    if isinstance(output, str) and output.startswith("data:"):
        save(output, "output")
        return None, written
    if isinstance(output, list) and output and all(_is_uri(v) for v in output):
        for i, item in enumerate(output):
            save(item, f"output.{i}")
        return None, written
    if isinstance(output, list) and kind is not None and kind.concatenate:
        return "".join(str(piece) for piece in output), written
    if isinstance(output, dict):
        shown = {}
        for key, value in output.items():
            if _is_uri(value):
                shown[key] = save(value, f"output.{key}")
            elif isinstance(value, list) and value and all(_is_uri(v) for v in value):
                shown[key] = [save(v, f"output.{key}.{i}") for i, v in enumerate(value)]
            else:
                shown[key] = value
        return json.dumps(shown, indent=2), written
    if isinstance(output, str):
        return output, written
    return json.dumps(output, indent=2), written


def _is_uri(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("data:")


def _decode(uri: str) -> tuple[bytes, str]:
    header, _, payload = uri.partition(",")
    content_type = header[len("data:") :].split(";")[0]
    try:
        data = base64.b64decode(payload) if header.endswith(";base64") else payload.encode()
    except binascii.Error as e:
        raise PredictionInputError(f"the model sent a file that is not base64: {e}") from None
    return data, mimetypes.guess_extension(content_type or "") or ".bin"


def _write_atomically(target: Path, data: bytes) -> None:
    tmp = target.with_name(f".{target.name}.cog-tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
