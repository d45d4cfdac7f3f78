"""``cog infer`` (``cog predict``): run one inference on a package's image on the local
Docker Engine.

Pull the image (unless present), start it, wait until the model is ready, send the
inputs (a form to ``/infer`` for a 2021 model, JSON to ``/predictions`` for a predictor
of today's Cog, see :mod:`cog.cli.predict`), return the text or save the files it
answered, and remove the container, also on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mimetypes
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import attrs

from cog.cli.predict import PredictionInputError, prediction_input, write_output
from cog.engine import Engine, EngineError, EngineUnreachable, ImageNotFound
from cog.engine.containers import ContainerError, ModelContainer, remove_stale_containers
from cog.signature import Signature

BARE_INPUT = "input"
#: How a file input's value starts: a local file, or a URL (for today's predictors)
_FILE_VALUES = ("@", "http://", "https://", "data:")


class InferenceError(Exception):
    """A one-line, user-facing reason the inference could not run."""


@attrs.frozen
class RawInput:
    #: None for a bare `-i value` / `-i @file`
    name: str | None
    value: str


@attrs.frozen
class Output:
    content_type: str
    #: text or JSON output, as text
    text: str | None = None
    #: where a file output was written
    path: Path | None = None
    #: where the files of a prediction's output were written
    paths: tuple[Path, ...] = ()


def parse_inputs(values: list[str]) -> list[RawInput]:
    parsed = []
    for value in values:
        name, sep, rest = value.partition("=")
        if sep and name.isidentifier():
            parsed.append(RawInput(name, rest))
        else:
            parsed.append(RawInput(None, value))
    return parsed


def resolve_names(inputs: list[RawInput], arguments: dict[str, Any]) -> list[tuple[str, str]]:
    """Give bare inputs their name: `input` if the model has one, else its only required
    input (or its only input)."""
    names = ", ".join(arguments) or "none"
    resolved = []
    for item in inputs:
        name = item.name
        if name is None:
            required = [n for n, spec in arguments.items() if "default" not in spec]
            if BARE_INPUT in arguments:
                name = BARE_INPUT
            elif len(required) == 1:
                name = required[0]
            elif len(arguments) == 1:
                name = next(iter(arguments))
            else:
                raise InferenceError(
                    f"cannot tell which input {item.value!r} is for; name it with "
                    f"-i NAME=VALUE (inputs: {names})"
                )
        if name not in arguments:
            raise InferenceError(f"the model has no input {name!r} (inputs: {names})")
        # A URL is no path: a predictor fetches it (a 2021 model says it wants a file).
        if arguments[name].get("type") == "Path" and not item.value.startswith(_FILE_VALUES):
            written = f"{item.name}=@{item.value}" if item.name else f"@{item.value}"
            raise InferenceError(
                f"input {name} is a file: write -i {written} (a value without @ is sent as text)"
            )
        resolved.append((name, item.value))
    return resolved


def _form(inputs: list[tuple[str, str]], stack: list) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in inputs:
        if value.startswith("@"):
            path = Path(value[1:]).expanduser()
            if not path.is_file():
                raise InferenceError(f"input {name}: no such file: {path}")
            file = path.open("rb")  # streamed by aiohttp, closed by the caller
            stack.append(file)
            form.add_field(name, file, filename=path.name)
        else:
            form.add_field(name, value)
    return form


def _error_text(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip()
    problems = doc.get("problems") if isinstance(doc, dict) else None
    if problems:
        return "; ".join(
            f"{p['input']}: {p['message']}" if isinstance(p, dict) else str(p) for p in problems
        )
    return str(doc.get("error", doc)) if isinstance(doc, dict) else str(doc)


async def run_inference(
    image: str,
    inputs: list[str],
    *,
    output_path: Path | None = None,
    docker_host: str | None = None,
    progress: Callable[[str], None] | None = None,
    timeout: float = 600.0,
) -> Output:
    """Run one inference on image; every failure is an InferenceError (one line, then the
    model's last lines of output when it has any to tell)."""
    opened: list = []
    try:
        async with Engine(docker_host) as engine:
            # `cog infer` processes killed outright (SIGKILL) leave their container behind.
            await remove_stale_containers(engine, "infer")
            try:
                await engine.ensure_image(image, progress)
            except ImageNotFound as exc:
                raise InferenceError(f"cannot pull {image}: {exc.message}") from None
            async with contextlib.AsyncExitStack() as stack:
                try:
                    model = await stack.enter_async_context(
                        ModelContainer(engine, image, role="infer")
                    )
                except ContainerError as exc:
                    raise InferenceError(str(exc)) from None
                if progress:
                    progress("Waiting for the model to be ready")
                try:
                    async for _ in model.wait_ready(timeout):
                        pass
                    return await _infer(model, inputs, output_path, opened)
                except ContainerError as exc:
                    raise InferenceError(_with_logs(str(exc), exc.logs)) from None
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    # The model's connection broke: it died, or answered what HTTP cannot be.
                    failure = await model.failure("answering the request", exc)
                    raise InferenceError(_with_logs(str(failure), failure.logs)) from None
    except EngineUnreachable as exc:
        raise InferenceError(exc.message) from None
    except EngineError as exc:
        raise InferenceError(f"Docker: {exc.message}") from None
    finally:
        for file in opened:
            file.close()


def _with_logs(message: str, logs: tuple[str, ...]) -> str:
    tail = [line for line in logs[-10:] if line.strip()]
    if not tail:
        return message
    return "\n".join([message, "The model's last lines:", *(f"  {line}" for line in tail)])


async def _infer(
    model: ModelContainer, inputs: list[str], output_path: Path | None, opened: list
) -> Output:
    described = await model.help()
    arguments = described.get("arguments", {})
    resolved = resolve_names(parse_inputs(inputs), arguments)
    if described.get("kind") == "predictor":
        return await _predict(model, Signature.from_json(described), resolved, output_path)
    form = _form(resolved, opened)
    async with model.infer(form) as response:
        if response.status != 200:
            message = f"the model answered HTTP {response.status}: "
            message += _error_text(await response.read())
            if response.status == 500:  # the model failed: its last lines say how
                await asyncio.sleep(0.2)  # for them to reach the container's log
                message = _with_logs(message, model.log_tail())
            raise InferenceError(message)
        content_type = response.content_type
        if content_type.startswith("text/") or content_type == "application/json":
            return Output(content_type, text=await response.text())
        return Output(content_type, path=await _save(response, output_path))


async def _predict(
    model: ModelContainer,
    signature: Signature,
    inputs: list[tuple[str, str]],
    output_path: Path | None,
) -> Output:
    try:
        body = {"input": await asyncio.to_thread(prediction_input, signature, inputs)}
    except PredictionInputError as e:
        raise InferenceError(str(e)) from None
    async with model.predict(body) as response:
        answer = await response.read()
        if response.status == 422:
            detail = json.loads(answer).get("detail") or []
            problems = "; ".join(f"{d['loc'][-1]}: {d['msg']}" for d in detail)
            raise InferenceError(f"invalid input: {problems}")
        if response.status != 200:
            raise InferenceError(
                f"the model answered HTTP {response.status}: {_error_text(answer)}"
            )
    prediction = json.loads(answer)
    if prediction.get("status") != "succeeded":
        logs = tuple((prediction.get("logs") or "").splitlines())
        reason = prediction.get("error") or prediction.get("status")
        raise InferenceError(
            _with_logs(f"the prediction {prediction.get('status')}: {reason}", logs)
        )
    try:
        text, written = await asyncio.to_thread(
            write_output, prediction.get("output"), signature.output, output_path
        )
    except OSError as exc:
        raise InferenceError(f"cannot write the output: {exc.strerror or exc}") from None
    except PredictionInputError as e:
        raise InferenceError(str(e)) from None
    return Output("application/json", text=text, paths=tuple(written))


async def _save(response: aiohttp.ClientResponse, output_path: Path | None) -> Path:
    if output_path is None:
        name = response.content_disposition.filename if response.content_disposition else None
        ext = Path(name).suffix if name else mimetypes.guess_extension(response.content_type)
        output_path = Path(f"output{ext or '.bin'}")
    output_path = output_path.resolve()
    try:
        fd, tmp = tempfile.mkstemp(prefix=".cog-output-", dir=output_path.parent)
    except OSError as exc:
        raise InferenceError(f"cannot write {output_path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as file:
            # As any new file: mkstemp's is private (0600).
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(file.fileno(), 0o666 & ~umask)
            async for chunk in response.content.iter_chunked(1024 * 1024):
                file.write(chunk)
        os.replace(tmp, output_path)
    except aiohttp.ClientError:
        # The model's connection broke (ClientOSError is an OSError too): the caller's
        # model.failure() says why, not "cannot write".
        Path(tmp).unlink(missing_ok=True)
        raise
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise InferenceError(f"cannot write {output_path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return output_path
