"""The check after a build: boot the image, compare its signature, run the model.

A 2021 model runs the package's examples (``/infer``). A predictor of today's Cog runs one
prediction (``/predictions``) with its inputs' defaults when every input has one; with a
required input there is nothing to send it, and the check is its setup. A failure raises
:class:`~cog.builders.BuildError` naming the step (setup, /help, example N, prediction)
with the model's error and the last lines it printed. The container is always removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import aiohttp

from cog.builders import BuildError, BuilderUnavailable, BuildLog
from cog.config import Config, Example
from cog.engine import Engine, EngineError, RegistryAuth
from cog.engine.containers import (
    PACKAGE_LABEL,
    ContainerError,
    ModelContainer,
    remove_stale_containers,
    sweep_containers,
)
from cog.server.answers import PREDICTION_BYTES, Verdict, judge, member, read_at_most
from cog.units import format_size

T = TypeVar("T")


def _log(line: str) -> BuildLog:
    return BuildLog(stage="test", line=line)


def example_form(example: Example, zip_path: Path) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in example.input.items():
        if value.startswith("@"):
            path = value[1:]
            form.add_field(name, member(zip_path, path), filename=PurePosixPath(path).name)
        else:
            form.add_field(name, value)
    return form


async def check_image(
    image: str,
    archive_path: Path,
    config: Config,
    signature: dict[str, Any] | None,
    *,
    docker_host: str | None = None,
    registry_auth: RegistryAuth | None = None,
    timeout: float = 300.0,
    socket_root: Path | None = None,
    package_id: str | None = None,
) -> AsyncIterator[BuildLog]:
    """socket_root: where the directory of the model's socket is made (the server's own
    temporary directory, swept when a server that died is restarted); package_id: the
    container's label, so that a delete of the package finds it."""
    labels = {PACKAGE_LABEL: package_id} if package_id else {}
    try:
        async with Engine(docker_host, registry_auth=registry_auth) as engine:
            checking = _check(
                engine, image, archive_path, config, signature, timeout, socket_root, labels
            )
            async for line in checking:
                yield line
    except EngineError as exc:
        raise BuilderUnavailable(
            f"could not run {image} on the Docker Engine: {exc.message}", step="test"
        ) from None


async def sweep_checks(docker_host: str | None = None) -> list[str]:
    """Remove the check containers of servers that are gone (killed outright: their own
    cleanup never ran), with their socket directories; their names."""
    async with Engine(docker_host) as engine:
        return await remove_stale_containers(engine, "check")


async def stop_checks_of(package_id: str, docker_host: str | None = None) -> list[str]:
    """Remove the check containers of one package left by servers that are gone; the
    names of those still owned by a live server (on this engine), which stay."""
    async with Engine(docker_host) as engine:
        _, kept = await sweep_containers(engine, "check", package=package_id)
    return kept


async def _check(
    engine: Engine,
    image: str,
    zip_path: Path,
    config: Config,
    signature: dict[str, Any] | None,
    timeout: float,
    socket_root: Path | None,
    labels: dict[str, str],
) -> AsyncIterator[BuildLog]:
    # Check containers of a server killed mid-check (its own cleanup never ran).
    for name in await remove_stale_containers(engine, "check"):
        yield _log(f"Removed {name}, left behind by a cog server that stopped")
    await engine.ensure_image(image)
    yield _log(f"Starting {image}")
    started = time.monotonic()
    # The longest this check can take: boot, /help, then each example (or a predictor's
    # one prediction), each bounded.
    lifetime = timeout * (3 + len(config.examples)) + 60
    container = ModelContainer(
        engine, image, role="check", lifetime=lifetime, socket_root=socket_root, labels=labels
    )
    async with contextlib.AsyncExitStack() as stack:
        try:
            model = await stack.enter_async_context(container)
        except ContainerError as exc:
            raise BuildError(str(exc), step="test: start") from None
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
        else:
            async for line in _check_examples(model, config, zip_path, timeout):
                yield line
        for line in await model.last_log_lines():
            yield _log(f"model: {line}")


async def _check_examples(
    model: ModelContainer, config: Config, zip_path: Path, timeout: float
) -> AsyncIterator[BuildLog]:
    """A 2021 model's examples, each answered as cog.yaml says."""
    for number, example in enumerate(config.examples, start=1):
        step = f"test: example {number}"
        began = time.monotonic()
        answer = _answer(model, example_form(example, zip_path), example, zip_path)
        verdict = await _within(
            model, answer, timeout, step, f"example {number}", f"answering example {number}"
        )
        for line in model.new_log_lines():
            yield _log(f"model: {line}")
        if verdict.status != 200:
            raise BuildError(
                f"example {number} failed (HTTP {verdict.status}): {verdict.error}",
                step=step,
                output=model.log_tail(),
            )
        if verdict.mismatch is not None:
            raise BuildError(
                f"example {number}: {verdict.mismatch}", step=step, output=model.log_tail()
            )
        yield _log(f"Example {number}: ok ({time.monotonic() - began:.2f}s)")
    if not config.examples:
        yield _log("No examples in cog.yaml: checked that the model boots and serves /help")


async def _within(
    model: ModelContainer,
    answer: Awaitable[T],
    timeout: float,
    step: str,
    what: str,
    doing: str,
) -> T:
    """What the model answered, within timeout; else a BuildError naming the step: that
    ``what`` got no answer in time, or what went wrong ``doing`` it (the model's end)."""
    try:
        return await asyncio.wait_for(answer, timeout)
    except asyncio.TimeoutError:
        raise BuildError(
            f"{what} got no answer within {timeout:g}s", step=step, output=model.log_tail()
        ) from None
    except aiohttp.ClientError as exc:
        failure = await model.failure(doing, exc)
        raise BuildError(str(failure), step=step, output=failure.logs) from None


async def _answer(
    model: ModelContainer, form: aiohttp.FormData, example: Example, zip_path: Path
) -> Verdict:
    """The model's answer to one example, judged as it streams in (never held whole)."""
    async with model.infer(form) as response:
        return await judge(response, example.output, zip_path)


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
    status, body = await _within(
        model,
        _predict(model),
        timeout,
        step,
        "the prediction with the defaults",
        "answering the prediction",
    )
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
    """The status and JSON body of one prediction with the defaults, the body read up to
    a bound (a model's answer is as hostile as any upload)."""
    async with model.predict({"input": {}}) as response:
        body, more = await read_at_most(response, PREDICTION_BYTES)
        if more:
            limit = format_size(PREDICTION_BYTES)
            return response.status, f"an answer of more than {limit}, more than the check reads"
        try:
            return response.status, json.loads(body)
        except ValueError:
            return response.status, body[:300]
