"""The inputs of one inference, read from a form: values converted, files streamed to disk.

Every request has a temporary directory of its own (made when first needed: a file input
or ``cog.request_directory()``); it is removed with everything in it by
:meth:`RequestInputs.cleanup` once the request is answered (a file output is opened
first). Each file input is stored in a
folder of its own there (``inputs/<input name>/``), under its original name, and passed
to run() as cog.Path, so two files of the same name never collide, nor do they with the
files a model writes in the directory itself. Every problem with the form is collected, so a
client hears about all of them in one 400 answer.

Uploads are written in worker threads, a batch of about a megabyte at a time, while the
next batch arrives from the network: the event loop never waits for a write. (Removing
the directory afterwards, a few unlinks, happens on the loop.)
"""

from __future__ import annotations

import asyncio
import codecs
import errno
import functools
import os
import re
import shutil
import tempfile
from typing import Any, Awaitable, BinaryIO, Mapping, TypeVar
from urllib.parse import unquote_to_bytes

import attrs
from aiohttp import BodyPartReader, MultipartReader, web

from cog.multipart import MalformedBody, parsing
from cog.signature import Argument, InputError
from cog.types import Path

T = TypeVar("T")

#: A text field longer than this is refused (files have no limit: they are streamed).
MAX_FIELD_BYTES = 1 << 20
#: A urlencoded body longer than this is refused (413): files and long texts go multipart.
MAX_URLENCODED_BYTES = 4 * MAX_FIELD_BYTES
#: A 400 answer lists this many problems at most (then says how many more there were).
MAX_PROBLEMS = 100
_SHOWN_NAME = 100
_CHUNK = 256 * 1024
#: An upload is written in batches of about this size, one thread hop each.
_BATCH = 1 << 20
#: The folder of the request's directory that holds the file inputs, one folder each.
_INPUTS = "inputs"
#: An input name usable as a folder name as it is (others get a numbered folder).
_FOLDER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")


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


class _Problems:
    """The problems in the order found, each once and at most MAX_PROBLEMS of them: a form
    of a million bogus fields gets a short answer."""

    def __init__(self) -> None:
        self._listed: list[Problem] = []
        self._seen: set[Problem] = set()
        self._more = 0

    def __bool__(self) -> bool:
        return bool(self._listed)

    def add(self, name: str, message: str) -> None:
        if len(name) > _SHOWN_NAME:  # a client's unknown name, quoted back shortened
            name = name[:_SHOWN_NAME] + "..."
        problem = Problem(name, message)
        if problem in self._seen:
            return
        if len(self._listed) >= MAX_PROBLEMS:
            self._more += 1
            return
        self._seen.add(problem)
        self._listed.append(problem)

    def listed(self) -> list[Problem]:
        if not self._more:
            return self._listed
        return [*self._listed, Problem("", f"and {self._more} more problems")]


class BadBody(Exception):
    """The body cannot be taken: not a form (415), a malformed one (400), too large (413),
    or an upload that could not be stored (507 when the disk is full, else 500)."""

    def __init__(self, message: str, status: int = 400) -> None:
        self.status = status
        super().__init__(message)


class RequestInputs:
    """The values for run(), and the request's temporary directory."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        #: this request's directory: made on first use, here or by the model's worker
        self.path = os.path.join(tempfile.gettempdir(), f"cog-infer-{os.urandom(8).hex()}")
        self._made = False
        self._folders = 0

    def directory(self) -> str:
        """This request's temporary directory, made on first use (a blocking call)."""
        if not self._made:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            self._made = True
        return self.path

    def folder_for(self, input_name: str) -> str:
        """The folder (relative to the directory) that holds ``input_name``'s file."""
        self._folders += 1
        if _FOLDER_NAME.match(input_name):
            return os.path.join(_INPUTS, input_name)
        # Not an identifier, so never another input's own name.
        return os.path.join(_INPUTS, f"input-{self._folders}")

    def cleanup(self) -> None:
        # Always: the model's worker may have made it (cog.request_directory()).
        shutil.rmtree(self.path, ignore_errors=True)
        self._made = False

    def _create(self, folder: str, name: str) -> BinaryIO:
        """Make the upload's folder and open its file (in a worker thread)."""
        path = os.path.join(self.directory(), folder)
        os.makedirs(path)  # a new folder each time: FileExistsError would be a bug
        return open(os.path.join(path, name), "xb")  # closed by _write

    def _write(
        self, f: BinaryIO | None, where: tuple[str, str], chunks: list[bytes], last: bool
    ) -> BinaryIO:
        """One batch of an upload, in a worker thread: the file, opened by the first batch."""
        if f is None:
            f = self._create(*where)
        try:
            f.writelines(chunks)
            if last:
                f.close()
        except BaseException:
            f.close()
            raise
        return f


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
    problems = _Problems()
    given: set[str] = set()
    try:
        if request.content_type == "multipart/form-data":
            await _read_multipart(request, arguments, inputs, problems, given)
        elif request.content_type == "application/x-www-form-urlencoded":
            await _read_urlencoded(request, arguments, inputs, problems, given)
        elif request.body_exists:
            raise BadBody(
                f"send the inputs as multipart/form-data, not {request.content_type}", 415
            )
        for name, argument in arguments.items():
            if name in given:
                continue
            if argument.required:
                message = "required file missing" if argument.is_file else "required input missing"
                problems.add(name, message)
            else:
                inputs.values[name] = argument.default
        if problems:
            raise InvalidInput(problems.listed())
    except BaseException:
        inputs.cleanup()
        raise
    return inputs


# --- multipart/form-data -----------------------------------------------------------------


async def _parsing(step: Awaitable[T]) -> T:
    try:
        return await parsing(step)
    except MalformedBody as e:
        raise BadBody(f"malformed multipart body: {e}") from None


async def _read_chunk(part: BodyPartReader) -> bytes:
    return await _parsing(part.read_chunk(_CHUNK))


async def _release(part: BodyPartReader | MultipartReader) -> None:
    await _parsing(part.release())


async def _read_multipart(
    request: web.Request,
    arguments: Mapping[str, Argument],
    inputs: RequestInputs,
    problems: _Problems,
    given: set[str],
) -> None:
    # Only aiohttp's parsing is translated into "malformed": an error converting a value
    # is an input problem like any other.
    reader = await _parsing(request.multipart())
    while True:
        part = await _parsing(reader.next())
        if part is None:
            return
        if not isinstance(part, BodyPartReader):  # a nested multipart
            problems.add("", "nested multipart parts are not supported")
            await _release(part)
            continue
        name, filename = _name_and_filename(part)
        name = name or ""
        argument = arguments.get(name)
        expected = argument is not None and name not in given
        # A plain field, or a file sent for a text input (say `-i prompt=@prompt.txt`):
        # the content is the value.
        if filename is None or (expected and not argument.is_file):
            try:
                text: str | InputError = await _read_text(part)
            except InputError as e:
                text = e
            _take_text(name, text, arguments, inputs, problems, given)
        elif not expected:
            _check_name(name, argument, problems, given)
            await _release(part)
        elif filename == "":  # a browser's empty file field: no file given
            await _release(part)
        else:
            given.add(name)
            folder = inputs.folder_for(name)
            stored = _safe_filename(filename, name if _FOLDER_NAME.match(name) else "file")
            await _store(part, inputs, (folder, stored))
            inputs.values[name] = Path(inputs.directory(), folder, stored)


async def _store(part: BodyPartReader, inputs: RequestInputs, where: tuple[str, str]) -> None:
    """Stream an upload to disk: each batch is written in a thread while the next arrives."""
    loop = asyncio.get_running_loop()
    f: BinaryIO | None = None
    writing: asyncio.Future[BinaryIO] | None = None  # the batch in a thread; gives the file
    try:
        last = False
        while not last:
            chunks: list[bytes] = []
            size = 0
            while size < _BATCH:
                chunk = await _read_chunk(part)
                if not chunk:
                    last = True
                    break
                chunks.append(chunk)
                size += len(chunk)
            if writing is not None:
                f, writing = await _written(writing, where), None
            writing = loop.run_in_executor(None, inputs._write, f, where, chunks, last)
        f, writing = await _written(writing, where), None  # type: ignore[arg-type]
    finally:
        if writing is None:
            _close(f)
        else:  # failed or cancelled: let the thread finish with the file
            try:
                await asyncio.wait([writing])
            finally:
                if writing.done():
                    _close(_file_of(writing) or f)
                else:
                    # Cancelled again while waiting (aiohttp cancels the handler once the
                    # connection is lost, which can come after a failed read brought it
                    # here): the thread's end closes the file and removes what its batch
                    # made after the request's own cleanup.
                    writing.add_done_callback(functools.partial(_abandoned, inputs, f))


def _file_of(writing: asyncio.Future[BinaryIO]) -> BinaryIO | None:
    if writing.cancelled() or writing.exception() is not None:
        return None
    return writing.result()


def _close(f: BinaryIO | None) -> None:
    if f is not None and not f.closed:
        f.close()


def _abandoned(
    inputs: RequestInputs, f: BinaryIO | None, writing: asyncio.Future[BinaryIO]
) -> None:
    _close(_file_of(writing) or f)
    inputs.cleanup()


async def _written(writing: asyncio.Future[BinaryIO], where: tuple[str, str]) -> BinaryIO:
    """The file, once the batch is written; a disk error as BadBody (a client's is not)."""
    try:
        # Shielded: a cancelled request must not cancel the future of a thread that goes
        # on writing (the cleanup below waits for it and closes its file).
        return await asyncio.shield(writing)
    except OSError as e:
        status = 507 if e.errno in (errno.ENOSPC, errno.EDQUOT) else 500
        raise BadBody(
            f"cannot store the uploaded file {where[1]}: {e.strerror or e}", status
        ) from e


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


async def _read_text(part: BodyPartReader) -> str:
    data = bytearray()
    while True:
        chunk = await _read_chunk(part)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            await _release(part)
            raise InputError(f"longer than {MAX_FIELD_BYTES} bytes")
    charset = part.get_charset(default="utf-8")
    try:
        return data.decode(charset)
    except (UnicodeDecodeError, LookupError):
        raise InputError(f"is not {charset} text") from None


# --- application/x-www-form-urlencoded ----------------------------------------------------


async def _read_urlencoded(
    request: web.Request,
    arguments: Mapping[str, Argument],
    inputs: RequestInputs,
    problems: _Problems,
    given: set[str],
) -> None:
    """A urlencoded form, decoded as strictly as a multipart one (invalid text is refused)."""
    too_large = BadBody(
        f"a urlencoded form may be at most {MAX_URLENCODED_BYTES} bytes; "
        "send files and long texts as multipart/form-data",
        413,
    )
    length = request.content_length
    if length is not None and length > MAX_URLENCODED_BYTES:
        raise too_large
    charset = request.charset or "utf-8"
    try:
        codecs.lookup(charset)
    except LookupError:
        raise BadBody(f"unknown charset {charset!r}", 415) from None
    body = bytearray()
    while True:
        chunk = await request.content.readany()
        if not chunk:
            break
        body += chunk
        if len(body) > MAX_URLENCODED_BYTES:
            raise too_large
    for field in bytes(body).split(b"&"):
        if not field:
            continue
        raw_name, _, raw_value = field.partition(b"=")
        name = unquote_to_bytes(raw_name.replace(b"+", b" ")).decode(charset, "replace")
        value = unquote_to_bytes(raw_value.replace(b"+", b" "))
        text: str | InputError
        if len(value) > MAX_FIELD_BYTES:
            text = InputError(f"longer than {MAX_FIELD_BYTES} bytes")
        else:
            try:
                text = value.decode(charset)
            except UnicodeDecodeError:
                text = InputError(f"is not {charset} text")
        _take_text(name, text, arguments, inputs, problems, given)


# --- Both ---------------------------------------------------------------------------------


def _check_name(name: str, argument: Argument | None, problems: _Problems, given: set[str]) -> bool:
    """True if the input exists and was not given before; else record the problem."""
    if argument is None:
        problems.add(name, "unknown input" if name else "a form field without a name")
        return False
    if name in given:
        problems.add(name, "given more than once")
        return False
    return True


def _take_text(
    name: str,
    text: str | InputError,
    arguments: Mapping[str, Argument],
    inputs: RequestInputs,
    problems: _Problems,
    given: set[str],
) -> None:
    """A text field's value (or why it could not be read) for input ``name``."""
    argument = arguments.get(name)
    if not _check_name(name, argument, problems, given):
        return
    assert argument is not None
    given.add(name)
    if isinstance(text, InputError):
        problems.add(name, str(text))
    elif argument.is_file:
        problems.add(name, "must be a file upload")
    else:
        try:
            inputs.values[name] = argument.convert(text)
        except InputError as e:
            problems.add(name, str(e))
