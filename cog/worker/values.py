"""Values between the wire and the model: inputs as the model's types, outputs as JSON.

Standard library only: this runs in the model's own Python.
"""

from __future__ import annotations

import base64
import io
import math
import os
import pathlib
from typing import Any, Dict, List

from cog.signature import Argument, Signature
from cog.types import Path, Secret
from cog.worker.protocol import BYTES, FILE, MARK


class OutputError(Exception):
    """The model returned something that cannot be sent."""


def model_inputs(signature: Signature, inputs: Dict[str, Any], opened: List[Any]) -> Dict[str, Any]:
    """The wire's inputs as the model takes them: files as cog.Path (or an open file for
    cog.File, appended to ``opened`` to be closed afterwards), secrets as cog.Secret."""
    values = dict(inputs)
    for argument in signature.arguments:
        if argument.type in ("str", "int", "float", "bool") or argument.name not in values:
            continue
        value = values[argument.name]
        if value is None:
            continue
        if argument.is_list:
            values[argument.name] = [_one(argument, item, opened) for item in value]
        else:
            values[argument.name] = _one(argument, value, opened)
    return values


def _one(argument: Argument, value: Any, opened: List[Any]) -> Any:
    if argument.type == "Path":
        return Path(value)
    if argument.type == "Secret":
        return Secret(value)
    if argument.type == "File":
        f = open(value, "rb")  # noqa: SIM115  # closed after the prediction
        opened.append(f)
        return f
    return value


class Encoder:
    """Outputs as JSON values; files as paths, file-like objects written to ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._written = 0

    def encode(self, value: Any, depth: int = 0) -> Any:
        if depth > 64:
            raise OutputError("the output is nested too deeply")
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                raise OutputError(f"the output holds {value}, which JSON cannot carry")
            return value
        if isinstance(value, pathlib.PurePath):
            return {MARK: FILE, "path": os.path.abspath(str(value))}
        if isinstance(value, (bytes, bytearray, memoryview)):
            return {MARK: BYTES, "base64": base64.b64encode(bytes(value)).decode()}
        if isinstance(value, Secret):
            return value.get_secret_value()
        if isinstance(value, io.IOBase):
            return {MARK: FILE, "path": self._write(value)}
        if isinstance(value, dict):
            return {str(k): self.encode(v, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [self.encode(v, depth + 1) for v in value]
        for method in ("model_dump", "dict"):  # cog.BaseModel, and pydantic's
            dump = getattr(value, method, None)
            if callable(dump) and not isinstance(value, type):
                return self.encode(dump(), depth + 1)
        if hasattr(value, "tolist"):  # numpy arrays and scalars, without importing numpy
            return self.encode(value.tolist(), depth + 1)
        raise OutputError(
            f"the model returned a {type(value).__name__} that is not JSON (nor a file)"
        )

    def _write(self, f: Any) -> str:
        """A file-like output, copied to a file of its own in the prediction's directory."""
        self._written += 1
        name = os.path.basename(str(getattr(f, "name", "") or "")) or "output"
        folder = os.path.join(self.directory, "outputs", str(self._written))
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name)
        if hasattr(f, "seek") and f.seekable():
            f.seek(0)
        with open(path, "wb") as out:
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk.encode() if isinstance(chunk, str) else chunk)
        return path
