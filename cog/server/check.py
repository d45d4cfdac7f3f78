"""The check after a build: boot the image, compare its signature, run the model.

A 2021 model runs the package's examples (``/infer``). A predictor of today's Cog runs one
prediction (``/predictions``) with its inputs' defaults when every input has one; with a
required input there is nothing to send it, and the check is its setup. A failure raises
:class:`~cog.builders.BuildError` naming the step (setup, /help, example N, prediction)
with the model's error and the last lines it printed. The container is always removed.
"""

from __future__ import annotations

import asyncio
import json
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from typing import Any

import aiohttp

from cog.builders import BuildError, BuilderUnavailable, BuildLog
from cog.config import Config, Example
from cog.engine import Engine, EngineError
from cog.engine.containers import ContainerError, ModelContainer, remove_stale_containers


def _log(line: str) -> BuildLog:
    return BuildLog(stage="test", line=line)


def _member(zip_path: Path, name: str) -> bytes:
    """A small example file from the package (examples are checked at upload to exist)."""
    with zipfile.ZipFile(zip_path) as archive:
        return archive.read(str(PurePosixPath(name)))


def example_form(example: Example, zip_path: Path) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in example.input.items():
        if value.startswith("@"):
            path = value[1:]
            form.add_field(name, _member(zip_path, path), filename=PurePosixPath(path).name)
        else:
            form.add_field(name, value)
    return form


def output_matches(expected: str, body: bytes, content_type: str, zip_path: Path) -> bool:
    """An example's expected output against the model's answer: a file (``@path``) byte
    for byte, JSON by value, text with surrounding whitespace trimmed."""
    if expected.startswith("@"):
        return body == _member(zip_path, expected[1:])
    if content_type == "application/json":
        try:
            return json.loads(body) == json.loads(expected)
        except ValueError:
            return False
    return body.decode(errors="replace").strip() == expected.strip()


def describe_output(body: bytes, content_type: str) -> str:
    """The model's answer, short, for an error message."""
    if content_type.startswith(("text/", "application/json")):
        text = body.decode(errors="replace").strip()
        return repr(text[:200] + ("..." if len(text) > 200 else ""))
    return f"{len(body)} bytes of {content_type}"


async def check_image(
    image: str,
    archive_path: Path,
    config: Config,
    signature: dict[str, Any] | None,
    *,
    docker_host: str | None = None,
    timeout: float = 300.0,
) -> AsyncIterator[BuildLog]:
    try:
        async with Engine(docker_host) as engine:
            async for line in _check(engine, image, archive_path, config, signature, timeout):
                yield line
    except EngineError as exc:
        raise BuilderUnavailable(
            f"could not run {image} on the Docker Engine: {exc.message}", step="test"
        ) from None


async def _check(
    engine: Engine,
    image: str,
    zip_path: Path,
    config: Config,
    signature: dict[str, Any] | None,
    timeout: float,
) -> AsyncIterator[BuildLog]:
    # Check containers of a server killed mid-check (its own cleanup never ran).
    for name in await remove_stale_containers(engine, "check"):
        yield _log(f"Removed {name}, left behind by a cog server that stopped")
    await engine.ensure_image(image)
    yield _log(f"Starting {image}")
    started = time.monotonic()
    # The longest this check can take: boot, /help, then each example, each bounded.
    lifetime = timeout * (2 + len(config.examples)) + 60
    async with ModelContainer(engine, image, role="check", lifetime=lifetime) as model:
        if model.target == "gpu" and not model.device_requests:
            yield _log("This Docker Engine has no NVIDIA runtime: the GPU image runs on the CPU")
        try:
            async for line in model.wait_ready(timeout):
                yield _log(f"model: {line}")
        except ContainerError as exc:
            raise BuildError(str(exc), step="test: setup", output=exc.logs) from None
        yield _log(f"Model ready after {time.monotonic() - started:.1f}s")

        try:
            served = await asyncio.wait_for(model.help(), timeout)
        except ContainerError as exc:
            raise BuildError(str(exc), step="test: /help", output=exc.logs) from None
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise BuildError(
                f"the model did not serve /help: {exc or type(exc).__name__}",
                step="test: /help",
                output=model.log_tail(),
            ) from None
        if signature is not None and served != signature:
            raise BuildError(
                "the running model's inputs differ from those read from its source: "
                f"served {json.dumps(served)}, expected {json.dumps(signature)}",
                step="test: /help",
            )
        yield _log(f"Inputs: {', '.join(served.get('arguments', {})) or '(none)'}")
        if served.get("kind") == "predictor":
            async for line in _check_prediction(model, served, timeout):
                yield line
            return

        for number, example in enumerate(config.examples, start=1):
            step = f"test: example {number}"
            began = time.monotonic()
            try:
                status, body, content_type = await asyncio.wait_for(
                    _answer(model, example_form(example, zip_path)), timeout
                )
            except asyncio.TimeoutError:
                raise BuildError(
                    f"example {number} got no answer within {timeout:g}s",
                    step=step,
                    output=model.log_tail(),
                ) from None
            except aiohttp.ClientError as exc:
                failure = await model.failure(f"answering example {number}", exc)
                raise BuildError(str(failure), step=step, output=failure.logs) from None
            for line in model.new_log_lines():
                yield _log(f"model: {line}")
            if status != 200:
                try:
                    error = json.loads(body).get("error") or body.decode()
                except (ValueError, AttributeError):
                    error = body.decode(errors="replace")
                raise BuildError(
                    f"example {number} failed (HTTP {status}): {error}",
                    step=step,
                    output=model.log_tail(),
                )
            if example.output is not None and not output_matches(
                example.output, body, content_type, zip_path
            ):
                raise BuildError(
                    f"example {number}: expected {example.output!r}, "
                    f"got {describe_output(body, content_type)}",
                    step=step,
                    output=model.log_tail(),
                )
            yield _log(f"Example {number}: ok ({time.monotonic() - began:.2f}s)")
        if not config.examples:
            yield _log("No examples in cog.yaml: checked that the model boots and serves /help")


async def _answer(model: ModelContainer, form: aiohttp.FormData) -> tuple[int, bytes, str]:
    async with model.infer(form) as response:
        return response.status, await response.read(), response.content_type


async def _check_prediction(
    model: ModelContainer, served: dict[str, Any], timeout: float
) -> AsyncIterator[BuildLog]:
    """One prediction with the defaults, when every input has one."""
    arguments = served.get("arguments") or {}
    required = [name for name, spec in arguments.items() if "default" not in spec]
    if required:
        yield _log(
            f"Required input{'s' if len(required) > 1 else ''} without a default "
            f"({', '.join(required)}): checked that the model sets up"
        )
        return
    step = "test: prediction"
    began = time.monotonic()
    try:
        status, body = await asyncio.wait_for(_predict(model), timeout)
    except asyncio.TimeoutError:
        raise BuildError(
            f"the prediction with the defaults got no answer within {timeout:g}s",
            step=step,
            output=model.log_tail(),
        ) from None
    except aiohttp.ClientError as exc:
        failure = await model.failure("answering the prediction", exc)
        raise BuildError(str(failure), step=step, output=failure.logs) from None
    for line in model.new_log_lines():
        yield _log(f"model: {line}")
    if status != 200 or not isinstance(body, dict):
        raise BuildError(
            f"the prediction with the defaults failed (HTTP {status}): {body!r:.300}",
            step=step,
            output=model.log_tail(),
        )
    if body.get("status") != "succeeded":
        logs = tuple((body.get("logs") or "").splitlines()[-20:])
        raise BuildError(
            f"the prediction with the defaults {body.get('status')}: {body.get('error')}",
            step=step,
            output=logs or model.log_tail(),
        )
    yield _log(f"Prediction with the defaults: ok ({time.monotonic() - began:.2f}s)")


async def _predict(model: ModelContainer) -> tuple[int, Any]:
    async with model.predict({"input": {}}) as response:
        try:
            return response.status, await response.json(content_type=None)
        except ValueError:
            return response.status, (await response.read())[:300]
