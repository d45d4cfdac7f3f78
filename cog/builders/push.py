"""Pushing an image from a Docker Engine, as build events: shared by the builders whose
images end up in an engine (the Docker builder, BuildKit's ``moby`` export)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from cog.builders import BuildError, BuilderUnavailable, BuildEvent, BuildLog, BuiltImage
from cog.engine import (
    Engine,
    EngineError,
    EngineUnreachable,
    Pushed,
    RegistryLoginRefused,
    RegistryUnreachable,
)


async def push_events(engine: Engine, image: str) -> AsyncIterator[BuildEvent]:
    """An engine's push of image as build events: progress lines, then the BuiltImage.
    A registry the engine cannot reach, or one that refuses the login, is the server's
    setup (BuilderUnavailable: 503), not the package's fault."""
    try:
        async with contextlib.aclosing(engine.push(image)) as pushing:
            async for item in pushing:
                if isinstance(item, Pushed):
                    yield BuiltImage(image=item.image, digest=item.digest)
                else:
                    yield BuildLog(stage="push", line=item)
    except (EngineUnreachable, RegistryUnreachable, RegistryLoginRefused) as exc:
        raise BuilderUnavailable(exc.message, step="push", output=exc.output) from None
    except EngineError as exc:
        raise BuildError(exc.message, step="push", output=exc.output) from None
