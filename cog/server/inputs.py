"""The inputs of one inference, read from a form: values converted, files streamed to disk.

Files go to a temporary directory of their own per request, under their original names,
and are passed to run() as cog.Path; the directory is removed by :meth:`RequestInputs.
cleanup` once the response is sent. Every problem with the form is collected, so a
client hears about all of them in one 400 answer.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Any, Mapping

import attrs
from aiohttp import BodyPartReader, web

from cog.model import Path
from cog.signature import Argument, InputError

#: A text field longer than this is refused (files have no limit: they are streamed).
MAX_FIELD_BYTES = 1 << 20
_CHUNK = 256 * 1024


@attrs.frozen
class Problem:
    input: str
    message: str


class InvalidInput(Exception):
    """The form is wrong; ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__(
            "; ".join(f"{p.input}: {p.message}" if p.input else p.message for p in problems)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "error": f"invalid input: {self}",
            "problems": [{"input": p.input, "message": p.message} for p in self.problems],
        }


class BadBody(Exception):
    """The body is not a form (status 415) or a malformed one (400)."""

    def __init__(self, message: str, status: int = 400) -> None:
        self.status = status
        super().__init__(message)


class RequestInputs:
    """The values for run(), and the temporary directory holding the uploaded files."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.directory: str | None = None

    def file_path(self, input_name: str, filename: str) -> str:
        """Where to store an upload: its own name in this request's directory."""
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="cog-infer-")
        name = _safe_filename(filename, input_name)
        path = os.path.join(self.directory, name)
        if os.path.exists(path):  # two inputs sent files of the same name
            folder = os.path.join(self.directory, f"{input_name}.d")
            os.mkdir(folder)
            path = os.path.join(folder, name)
        return path

    def cleanup(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


def _safe_filename(filename: str, fallback: str) -> str:
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].replace("\0", "")
    if name in ("", ".", ".."):
        name = fallback
    if len(name.encode("utf-8")) > 200:  # stay under NAME_MAX, keeping a short extension
        stem, ext = os.path.splitext(name)
        if len(ext.encode("utf-8")) > 32:
            stem, ext = name, ""
        room = 200 - len(ext.encode("utf-8"))
        name = stem.encode("utf-8")[:room].decode("utf-8", "ignore") + ext
    return name


async def read_inputs(request: web.Request, arguments: Mapping[str, Argument]) -> RequestInputs:
    """Read and check the form of ``POST /infer``; raises InvalidInput or BadBody.

    On error nothing is left on disk.
    """
    inputs = RequestInputs()
    problems: list[Problem] = []
    given: set[str] = set()
    try:
        if request.content_type == "multipart/form-data":
            try:
                await _read_multipart(request, arguments, inputs, problems, given)
            except (ValueError, AssertionError) as e:  # aiohttp's word for a broken body
                raise BadBody(f"malformed multipart body: {e}") from None
        elif request.content_type == "application/x-www-form-urlencoded":
            for name, value in (await request.post()).items():
                _take_text(name, str(value), arguments, inputs, problems, given)
        elif request.body_exists:
            raise BadBody(
                f"send the inputs as multipart/form-data, not {request.content_type}", 415
            )
        for name, argument in arguments.items():
            if name in given:
                continue
            if argument.required:
                message = "required file missing" if argument.is_file else "required input missing"
                problems.append(Problem(name, message))
            else:
                inputs.values[name] = argument.default
        if problems:
            raise InvalidInput(problems)
    except BaseException:
        inputs.cleanup()
        raise
    return inputs


async def _read_multipart(
    request: web.Request,
    arguments: Mapping[str, Argument],
    inputs: RequestInputs,
    problems: list[Problem],
    given: set[str],
) -> None:
    reader = await request.multipart()
    while True:
        part = await reader.next()
        if part is None:
            return
        if not isinstance(part, BodyPartReader):  # a nested multipart
            problems.append(Problem("", "nested multipart parts are not supported"))
            await part.release()
            continue
        name, filename = _name_and_filename(part)
        name = name or ""
        argument = arguments.get(name)
        expected = argument is not None and name not in given
        # A plain field, or a file sent for a text input (say `-i prompt=@prompt.txt`):
        # the content is the value.
        if filename is None or (expected and not argument.is_file):
            try:
                text = await _read_text(part)
            except InputError as e:
                problems.append(Problem(name, str(e)))
                given.add(name)
                continue
            _take_text(name, text, arguments, inputs, problems, given)
        elif not expected:
            _check_name(name, argument, problems, given)
            await part.release()
        elif filename == "":  # a browser's empty file field: no file given
            await part.release()
        else:
            given.add(name)
            path = inputs.file_path(name, filename)
            with open(path, "wb") as f:
                # Local temp files: a write lands in the page cache, cheaper than a
                # thread hop per chunk.
                while True:
                    chunk = await part.read_chunk(_CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
            inputs.values[name] = Path(path)


# The shape browsers, curl and aiohttp send. aiohttp's full parser (RFC 6266/5987) costs
# tens of microseconds a call and runs again for each of part.name and part.filename: it
# is kept for every other shape.
_SIMPLE_DISPOSITION = re.compile(r'form-data; name="([^"\\]*)"(?:; filename="([^"\\]*)")?\Z')


def _name_and_filename(part: BodyPartReader) -> tuple[str | None, str | None]:
    match = _SIMPLE_DISPOSITION.match(part.headers.get("Content-Disposition", ""))
    if match is None:
        return part.name, part.filename
    name, filename = match.groups()
    # As aiohttp does with quoted values: leading slashes go.
    return name.lstrip("/"), None if filename is None else filename.lstrip("/")


def _check_name(
    name: str, argument: Argument | None, problems: list[Problem], given: set[str]
) -> bool:
    """True if the input exists and was not given before; else record the problem."""
    if argument is None:
        problems.append(Problem(name, "unknown input" if name else "a form field without a name"))
        return False
    if name in given:
        problems.append(Problem(name, "given more than once"))
        return False
    return True


def _take_text(
    name: str,
    text: str,
    arguments: Mapping[str, Argument],
    inputs: RequestInputs,
    problems: list[Problem],
    given: set[str],
) -> None:
    argument = arguments.get(name)
    if not _check_name(name, argument, problems, given):
        return
    assert argument is not None
    given.add(name)
    if argument.is_file:
        problems.append(Problem(name, "must be a file upload"))
        return
    try:
        inputs.values[name] = argument.convert(text)
    except InputError as e:
        problems.append(Problem(name, str(e)))


async def _read_text(part: BodyPartReader) -> str:
    data = bytearray()
    while True:
        chunk = await part.read_chunk(_CHUNK)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            await part.release()
            raise InputError(f"longer than {MAX_FIELD_BYTES} bytes")
    charset = part.get_charset(default="utf-8")
    try:
        return data.decode(charset)
    except (UnicodeDecodeError, LookupError):
        raise InputError(f"is not {charset} text") from None
