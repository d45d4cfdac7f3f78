"""The Docker Engine client every part of cog that runs or builds images stands on.

:mod:`cog.engine.client` talks to one engine (its address, streamed API calls, image
presence, pull and push), :mod:`cog.engine.containers` runs a model image as a container
(the check after a build and ``cog infer``). aiodocker's and aiohttp's errors stay in
here: callers see :class:`EngineError` and its kinds.
"""

from cog.engine.auth import RegistryAuth, RegistryAuthError
from cog.engine.client import (
    DEFAULT_ENGINE,
    Engine,
    EngineError,
    EngineUnreachable,
    ImageNotFound,
    Pushed,
    RegistryLoginRefused,
    RegistryUnreachable,
    engine_address,
    split_image,
)

__all__ = [
    "DEFAULT_ENGINE",
    "Engine",
    "EngineError",
    "EngineUnreachable",
    "ImageNotFound",
    "Pushed",
    "RegistryAuth",
    "RegistryAuthError",
    "RegistryLoginRefused",
    "RegistryUnreachable",
    "engine_address",
    "split_image",
]
