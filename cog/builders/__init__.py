"""The Builder contract: turn a stored package into a pushed Docker image.

A builder receives a :class:`BuildRequest` (the package zip on local disk, its completed
config, the target ``cpu``/``gpu`` and the image reference to push) and returns an async
iterator of events: :class:`BuildLog` lines *as they happen*, then exactly one
:class:`BuiltImage` last. A failure raises :class:`BuildError` carrying the failing step
and the last lines of its output, never a vendor exception.

Builders are found through the ``cog.builders`` entry-point group (``docker``,
``buildkit``; third parties may add more) and created from :class:`BuilderSettings`.
"""

from __future__ import annotations

import abc
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, Union

import attrs

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


@attrs.frozen
class BuilderSettings:
    """What the operator chose on `cog server`'s command line, for any builder."""

    #: registry host[:port][/path] that images are pushed to, e.g. 127.0.0.1:5000
    registry: str
    #: target -> image template with {python_version}, {cuda}, {cudnn}, {nvidia_tag} placeholders
    base_images: Mapping[str, str] = attrs.field(factory=lambda: dict(DEFAULT_BASE_IMAGES))
    #: "wheels": CUDA/cuDNN from NVIDIA's pip wheels on the CPU base (no CUDA image needed);
    #: "image": an NVIDIA CUDA/cuDNN base image
    gpu_strategy: str = "wheels"
    #: Docker Engine address (unix:///var/run/docker.sock, tcp://...); None: DOCKER_HOST/default
    docker_host: str | None = None
    #: builder-specific options (`cog server --builder-opt key=value`), e.g. buildkit address
    options: Mapping[str, str] = attrs.field(factory=dict)


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


BuildEvent = Union[BuildLog, BuiltImage]


class BuildError(Exception):
    """A build that failed: which step, what failed, and the last lines of its output."""

    def __init__(self, message: str, *, step: str | None = None, output: tuple[str, ...] = ()):
        super().__init__(message)
        self.message = message
        self.step = step
        self.output = tuple(output)

    def __str__(self) -> str:
        return f"{self.message} (step: {self.step})" if self.step else self.message


class BuilderUnavailable(BuildError):
    """The build machinery itself (Docker engine, BuildKit, registry) cannot be reached.

    Not the package's fault: the server answers 503 and the same package may be rebuilt.
    """


class BuilderConfigError(Exception):
    """An unknown builder name or options the builder rejects; raised at server start."""


class Builder(abc.ABC):
    name: ClassVar[str] = ""

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


def _entry_points():
    from importlib.metadata import entry_points

    if sys.version_info >= (3, 10):
        return entry_points(group=ENTRY_POINT_GROUP)
    return entry_points().get(ENTRY_POINT_GROUP, [])


def available_builders() -> list[str]:
    return sorted({ep.name for ep in _entry_points()})


def load_builder(name: str, settings: BuilderSettings) -> Builder:
    """The builder registered as name, created from settings (not yet opened)."""
    matches = [ep for ep in _entry_points() if ep.name == name]
    if not matches:
        installed = ", ".join(available_builders()) or "none"
        raise BuilderConfigError(f"no builder named {name!r} (installed: {installed})")
    try:
        cls = matches[0].load()
    except ImportError as exc:
        raise BuilderConfigError(
            f"builder {name!r} cannot be loaded: {exc} "
            "(is its extra installed? e.g. pip install 'cog[buildkit]')"
        ) from exc
    return cls.from_settings(settings)
