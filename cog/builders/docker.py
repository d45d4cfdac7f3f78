"""The Docker builder: builds through a Docker Engine's API and pushes with it.

The build context is streamed to ``POST /build`` as a tar made on the fly from the package
zip (:mod:`cog.builders.context`); the engine's output and the push progress come back
line by line as :class:`~cog.builders.BuildLog` events, each step's last line with the
seconds the step took (the engine's classic output has no timing). Closing the event
iterator closes the connection, which makes the engine stop the build (intermediate
containers are always removed: ``forcerm``).
"""

from __future__ import annotations

import collections
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable

from cog.builders import (
    Builder,
    BuildError,
    BuilderSettings,
    BuilderUnavailable,
    BuildEvent,
    BuildLog,
    BuildRequest,
    ImageLoaded,
)
from cog.builders.context import build_context
from cog.builders.dockerfile import base_image, dockerfile_for_request, missing_base_image
from cog.builders.push import push_events
from cog.engine import Engine, EngineError, EngineUnreachable, RegistryAuth
from cog.engine.client import stream_error

TAIL = 20
_STEP = re.compile(r"^Step \d+/\d+ : ")
_LABEL_STEP = re.compile(r"^(Step \d+/\d+ : LABEL )(.*)$")
_LABEL = re.compile(r'([^\s=]+)="((?:[^"\\]|\\.)*)"')
#: A label's value is shown this long at most in the log (the config's is a screen long).
_LABEL_SHOWN = 24


def _shortened(line: str) -> str:
    """A LABEL step as the log shows it: each label, its value cut short."""
    step = _LABEL_STEP.match(line)
    if step is None:
        return line

    def short(label: re.Match[str]) -> str:
        value = label[2]
        if len(value) > _LABEL_SHOWN:
            value = value[: _LABEL_SHOWN - 3] + "..."
        return f'{label[1]}="{value}"'

    return step[1] + " ".join(short(label) for label in _LABEL.finditer(step[2]))


#: the line that ends a step: the image it made (" ---> 5f3c1b2a9d8e")
_STEP_END = re.compile(r"^ ---> [0-9a-f]{12}$")


class StepTimer:
    """Puts the seconds a step took beside the line that ends it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._started: float | None = None

    def line(self, line: str) -> str:
        if _STEP.match(line):
            self._started = self._clock()
        elif self._started is not None and _STEP_END.match(line):
            line = f"{line} ({self._clock() - self._started:.1f}s)"
            self._started = None
        return line


class DockerBuilder(Builder):
    name = "docker"

    def __init__(self, settings: BuilderSettings):
        self.settings = settings
        self._engine: Engine | None = None

    @classmethod
    def from_settings(cls, settings: BuilderSettings) -> DockerBuilder:
        return cls(settings)

    async def open(self) -> None:
        if self._engine is None:
            try:
                self._engine = Engine(
                    self.settings.docker_host,
                    registry_auth=RegistryAuth(self.settings.registry_auth),
                )
            except EngineError as exc:
                raise BuilderUnavailable(exc.message) from None

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.close()
            self._engine = None

    def dockerfile(self, request: BuildRequest) -> str:
        return dockerfile_for_request(request, self.settings)

    async def build(self, request: BuildRequest) -> AsyncIterator[BuildEvent]:
        await self.open()
        engine = self._engine
        assert engine is not None
        async with contextlib.aclosing(self._engine_build(engine, request)) as building:
            async for line in building:
                yield line
        # Built by the engine the server's checks run on: the check may start now.
        yield ImageLoaded(request.image)
        async with contextlib.aclosing(push_events(engine, request.image)) as pushing:
            async for event in pushing:
                yield event

    async def _base_image(
        self, engine: Engine, base: str, request: BuildRequest
    ) -> AsyncIterator[BuildLog]:
        """Make sure the engine has the base image; pull it (progress as log lines) if not.

        A base image nobody can get is the server's setup, not the package's fault; so is
        one the engine refuses to look up (a malformed name from a --base-image template)."""
        try:
            if await engine.has_image(base):
                return
        except EngineUnreachable as exc:
            raise BuilderUnavailable(exc.message, step="base image") from None
        except EngineError as exc:
            raise BuilderUnavailable(
                f"base image {base}: the Docker Engine refused it: {exc.message} "
                "(check --base-image)",
                step="base image",
            ) from None
        yield BuildLog(stage="build", line=f"Pulling base image {base}")
        tail: collections.deque[str] = collections.deque(maxlen=TAIL)
        try:
            async with contextlib.aclosing(engine.pull(base)) as pulling:
                async for line in pulling:
                    tail.append(line)
                    yield BuildLog(stage="build", line=line)
        except EngineError as exc:
            raise BuilderUnavailable(
                missing_base_image(
                    request.config,
                    request.target,
                    self.settings,
                    base,
                    "on the Docker Engine",
                    f"pulling it failed: {exc.message}",
                ),
                step="base image",
                output=tuple(tail),
            ) from None

    async def _engine_build(self, engine: Engine, request: BuildRequest) -> AsyncIterator[BuildLog]:
        dockerfile = self.dockerfile(request)
        base = base_image(request.config, request.target, self.settings)
        async with contextlib.aclosing(self._base_image(engine, base, request)) as preparing:
            async for line in preparing:
                yield line
        params = {"t": request.image, "rm": "1", "forcerm": "1", "pull": "0"}
        if request.no_cache:
            params["nocache"] = "1"
        context = build_context(request.package_zip, dockerfile)
        tail: collections.deque[str] = collections.deque(maxlen=TAIL)
        step: str | None = None
        timer = StepTimer()
        try:
            async with engine.stream(
                "POST",
                "build",
                params=params,
                data=context,
                headers={"Content-Type": "application/x-tar"},
            ) as response:
                pending = ""
                async for item in engine.json_lines(response):
                    error = stream_error(item)
                    if error:
                        raise BuildError(
                            f"docker build failed: {error}", step=step, output=tuple(tail)
                        )
                    text = pending + item.get("stream", "")
                    *lines, pending = text.split("\n")
                    for line in lines:
                        line = timer.line(line.rstrip("\r"))
                        if not line.strip():
                            continue
                        if _STEP.match(line):
                            line = _shortened(line)
                            step = line
                            tail.clear()
                        tail.append(line)
                        yield BuildLog(stage="build", line=line)
                if pending.strip():
                    yield BuildLog(stage="build", line=pending)
        except EngineUnreachable as exc:
            raise BuilderUnavailable(exc.message, step=step or "build") from None
        except EngineError as exc:
            raise BuildError(f"docker build failed: {exc.message}", step=step) from None
        finally:
            await context.aclose()


__all__ = ["DockerBuilder"]
