"""The Builder contract: turn a stored package into a pushed Docker image.

A builder receives a :class:`BuildRequest` (the package zip on local disk, its completed
config, the target ``cpu``/``gpu`` and the image reference to push) and returns an async
iterator of events: :class:`BuildLog` lines *as they happen*, then exactly one
:class:`BuiltImage` last. A builder whose image is on the server's Docker Engine before it
is pushed may say so (:class:`ImageLoaded`, once, before the push), so that the server
checks the model while the image is pushed. A failure raises :class:`BuildError` carrying
the failing step and the last lines of its output, never a vendor exception.

Builders are found through the ``cog.builders`` entry-point group (``docker``,
``buildkit``; third parties may add more) and created from :class:`BuilderSettings`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, Union

import attrs

from cog.events import plain
from cog.plugins import installed, load_plugin

if TYPE_CHECKING:
    from cog.config import Config

ENTRY_POINT_GROUP = "cog.builders"
Target = Literal["cpu", "gpu"]

#: Where base images come from. Sites without Docker Hub point these at local images.
DEFAULT_BASE_IMAGES = {
    "cpu": "python:{python_version}-slim",
    # {nvidia_tag}: NVIDIA's tag for the CUDA/cuDNN pair (cog/data/compatibility.json)
    "gpu": "nvidia/cuda:{nvidia_tag}",
}
#: What a base image template may say: {cudnn} is the config's cuDNN as given ("8" or
#: "8.9"), {cudnn_major} only its major version ("8"), as NVIDIA's image tags have it.
BASE_IMAGE_PLACEHOLDERS = ("python_version", "cuda", "cudnn", "cudnn_major", "nvidia_tag")
GPU_STRATEGIES = ("wheels", "image")


def template_problem(template: str) -> str | None:
    """Why a base image template cannot be used, or None."""
    import string

    if not template.strip():
        return "is empty"
    try:
        fields = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as exc:
        return f"is not a valid template ({exc}; write a literal brace as {{{{ or }}}})"
    for name, spec, conversion in fields:
        shown = (
            "{"
            + name
            + (f"!{conversion}" if conversion else "")
            + (f":{spec}" if spec else "")
            + "}"
        )
        if name not in BASE_IMAGE_PLACEHOLDERS:
            return f"unknown placeholder {shown}"
        if spec or conversion:
            return f"placeholder {shown} takes no format"
    return None


def _base_images(value: Mapping[str, str]) -> dict[str, str]:
    """The operator's templates over the defaults, each checked (BuilderConfigError)."""
    merged = {**DEFAULT_BASE_IMAGES, **value}
    for target, template in merged.items():
        if target not in DEFAULT_BASE_IMAGES:
            raise BuilderConfigError(
                f"base image for unknown target {target!r} (targets: cpu, gpu)"
            )
        problem = template_problem(template)
        if problem:
            allowed = ", ".join(f"{{{name}}}" for name in BASE_IMAGE_PLACEHOLDERS)
            raise BuilderConfigError(
                f"base image template {target}={template}: {problem} (allowed: {allowed})"
            )
    return merged


def _check_strategy(_instance: object, _attribute: object, value: str) -> None:
    if value not in GPU_STRATEGIES:
        raise BuilderConfigError(
            f"unknown GPU strategy {value!r} (use {' or '.join(GPU_STRATEGIES)})"
        )


@attrs.frozen
class BuilderSettings:
    """What the operator chose on `cog server`'s command line, for any builder.

    Checked when made: an unusable base image template or GPU strategy raises
    BuilderConfigError, so a server refuses to start rather than fail every build.
    """

    #: registry host[:port][/path] that images are pushed to, e.g. 127.0.0.1:5000
    registry: str
    #: target -> image template with the BASE_IMAGE_PLACEHOLDERS; missing targets get
    #: DEFAULT_BASE_IMAGES
    base_images: Mapping[str, str] = attrs.field(
        factory=lambda: dict(DEFAULT_BASE_IMAGES), converter=_base_images
    )
    #: "wheels": CUDA/cuDNN from NVIDIA's pip wheels on the CPU base (no CUDA image needed);
    #: "image": an NVIDIA CUDA/cuDNN base image
    gpu_strategy: str = attrs.field(default="wheels", validator=_check_strategy)
    #: Docker Engine address (unix:///var/run/docker.sock, tcp://...); None: DOCKER_HOST or
    #: the local socket (cog.engine.engine_address)
    docker_host: str | None = None
    #: builder-specific options (`cog server --builder-opt key=value`), e.g. buildkit address
    options: Mapping[str, str] = attrs.field(factory=dict)
    #: registry credentials for pushes and pulls, in Docker's config format
    #: (`--registry-auth`); None: Docker's own ($DOCKER_CONFIG/config.json), read at each
    #: push (see cog.engine.auth)
    registry_auth: Path | None = None


@attrs.frozen
class BuildRequest:
    package_id: str
    #: the package zip on local disk; the builder streams it as the build context
    package_zip: Path
    config: Config
    target: Target
    #: repository:tag to push, e.g. 127.0.0.1:5000/hello:1a2b3c4d5e6f
    image: str
    #: the model's input signature ({"arguments": {...}}), as JSON text, for the image label
    signature_json: str | None = None
    #: build every step again, using no cached layer (the operator asked for a cold build)
    no_cache: bool = False


@attrs.frozen
class BuildLog:
    #: "build" or "push" (builders may add finer stages)
    stage: str
    line: str


@attrs.frozen
class BuiltImage:
    #: repository:tag as pushed
    image: str
    #: registry manifest digest, sha256:...
    digest: str


@attrs.frozen
class ImageLoaded:
    """The image is built and on the Docker Engine the server runs its checks on
    (:attr:`BuilderSettings.docker_host`), tagged as the request's image; its push
    follows. Optional: a builder that pushes from elsewhere (BuildKit) never says it."""

    image: str


BuildEvent = Union[BuildLog, ImageLoaded, BuiltImage]


class BuildError(Exception):
    """A build that failed: which step, what failed, and the last lines of its output."""

    def __init__(self, message: str, *, step: str | None = None, output: tuple[str, ...] = ()):
        super().__init__(message)
        self.message = message
        self.step = step
        self.output = tuple(output)

    def __str__(self) -> str:
        if not self.step:
            return self.message
        step = self.step if len(self.step) <= _SHOWN_STEP else self.step[: _SHOWN_STEP - 3] + "..."
        return f"{self.message} (step: {step})"


#: The longest step a BuildError's message quotes (a RUN line can be a screen long).
_SHOWN_STEP = 120


class BuilderUnavailable(BuildError):
    """The build machinery itself (Docker engine, BuildKit, registry) cannot be reached.

    Not the package's fault: the server answers 503 and the same package may be rebuilt.
    """


class BuilderConfigError(Exception):
    """An unknown builder name or options the builder rejects; raised at server start."""


class Builder(abc.ABC):
    name: ClassVar[str] = ""

    @property
    def label(self) -> str:
        """How messages name this builder ("docker"; "buildkit at tcp://bk:1234")."""
        return self.name or type(self).__name__

    @classmethod
    @abc.abstractmethod
    def from_settings(cls, settings: BuilderSettings) -> Builder:
        """Create the builder; raise BuilderConfigError for options it cannot use."""

    async def open(self) -> None:
        """Connect (e.g. to the Docker Engine or BuildKit). Called once before builds."""

    async def close(self) -> None:
        """Release what open() acquired; cancel builds still running."""

    @abc.abstractmethod
    def build(self, request: BuildRequest) -> AsyncIterator[BuildEvent]:
        """Build and push one image; BuildLog events live, then one BuiltImage.

        Cancelling the iteration (client gone, server shutting down) must cancel the
        build in the backend too and leave no containers behind.
        """


def being_cancelled(task: asyncio.Task | None = None) -> bool:
    """Whether `task` (default: the current one) is being cancelled: its client left, or
    the server is stopping. Always False on Python 3.10, which cannot tell
    (``Task.cancelling()`` is 3.11's); callers must not depend on it there."""
    if task is None:
        task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is not None and cancelling() > 0


def available_builders() -> list[str]:
    return installed(ENTRY_POINT_GROUP)


def load_builder(name: str, settings: BuilderSettings) -> Builder:
    """The builder registered as name, created from settings (not yet opened)."""
    cls = load_plugin(
        ENTRY_POINT_GROUP,
        name,
        noun="builder named",
        hint="pip install 'cog[buildkit]'",
        error=BuilderConfigError,
    )
    return cls.from_settings(settings)


#: A registry's manifest digest
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class CheckedBuilder(Builder):
    """Wraps any builder, as the server uses every one: what it yields is checked against
    the contract, and what it raises is translated.

    - log lines come as they happen, then exactly one :class:`BuiltImage`, of the image
      asked for, with a registry digest; before it, at most one :class:`ImageLoaded` of
      that image: anything else (no image, two, output after it) fails the build with
      :class:`BuildError` naming the builder;
    - an exception that is no BuildError is the builder's own failure, not the
      package's: it becomes :class:`BuilderUnavailable` (503), with the builder named;
    - a step of cog's Dockerfile that fails saying why (``cog: <why>``, e.g. the check of
      the image's Python) fails the build with that why.
    """

    def __init__(self, backend: Builder):
        self.backend = backend
        self.name = backend.name

    @property
    def label(self) -> str:
        return self.backend.label

    @classmethod
    def from_settings(cls, settings: BuilderSettings) -> Builder:  # pragma: no cover
        raise NotImplementedError("wrap a builder: CheckedBuilder(builder)")

    def __repr__(self) -> str:
        return f"CheckedBuilder({self.backend!r})"

    async def open(self) -> None:
        with _translated(self.label, "opening"):
            await self.backend.open()

    async def close(self) -> None:
        with _translated(self.label, "closing"):
            await self.backend.close()

    async def build(self, request: BuildRequest) -> AsyncIterator[BuildEvent]:
        label = self.label
        built: BuiltImage | None = None
        stream = self.backend.build(request)
        try:
            async with contextlib.aclosing(self._checked(label, stream, request)) as checked:
                async for event in checked:
                    if isinstance(event, BuiltImage):
                        built = event
                    else:
                        yield event
        except BuildError as exc:
            said = _in_cogs_words(exc)
            if said is exc:
                raise
            raise said from None
        finally:
            with _translated(label, "stopping"):
                await stream.aclose()
        if built is None:
            raise BuildError(f"{label} ended without reporting an image of {request.image}")
        yield built

    async def _checked(
        self, label: str, stream: AsyncIterator[BuildEvent], request: BuildRequest
    ) -> AsyncIterator[BuildEvent]:
        """The backend's events, each checked against the contract (see the class)."""
        built: BuiltImage | None = None
        loaded = False
        while True:
            with _translated(label, "building"):
                try:
                    event = await stream.__anext__()
                except StopAsyncIteration:
                    return
            if built is not None:
                raise BuildError(f"{label} went on after it reported the image {built.image}")
            if isinstance(event, BuildLog):
                yield event
            elif isinstance(event, ImageLoaded):
                if event.image != request.image or loaded:
                    raise BuildError(
                        f"{label} reported {event.image} loaded "
                        + ("twice" if loaded else f"; {request.image} was asked for")
                    )
                loaded = True
                yield event
            elif isinstance(event, BuiltImage):
                if event.image != request.image:
                    raise BuildError(
                        f"{label} reported the image {event.image}; {request.image} was asked for"
                    )
                if not _DIGEST.fullmatch(event.digest or ""):
                    raise BuildError(
                        f"{label} reported {event.image} with no registry digest ({event.digest!r})"
                    )
                built = event
                yield event
            else:
                raise BuildError(f"{label} yielded {event!r}, which is no build event")


def _in_cogs_words(exc: BuildError) -> BuildError:
    """A failed step of cog's own that gave its account (a step whose command says
    ``cog: <why>``, and a line of its output that does), with that account as the
    failure's message. Other steps' output is never taken for cog's words."""
    if not exc.step or "cog: " not in exc.step:
        return exc
    for line in reversed(exc.output):
        text = plain(line).strip()
        if text.startswith("cog: ") and len(text) > len("cog: "):
            return type(exc)(text[len("cog: ") :], step=exc.step, output=exc.output)
    return exc


@contextlib.contextmanager
def _translated(label: str, doing: str) -> Iterator[None]:
    """A builder's own failure (no BuildError, no cancellation) as BuilderUnavailable."""
    try:
        yield
    except (BuildError, BuilderConfigError):
        raise
    except Exception as exc:
        raise BuilderUnavailable(
            f"{label} failed while {doing}: {type(exc).__name__}: {exc}"
        ) from exc
