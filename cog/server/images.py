"""A package's images: each target built and pushed, and the model checked in one of them.

The targets build at once (:mod:`cog.server.targets`). The check runs in the CPU image
when there is one, else the GPU one; when the builder says that image is on the Docker
Engine the check runs on before it pushes it (:class:`~cog.builders.ImageLoaded`), the
check starts then and runs while the image is pushed, the first of the two to fail
stopping the other; otherwise (BuildKit pushes from elsewhere) it runs after the push.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cog import events
from cog.builders import Builder, BuildError, BuilderSettings, BuildLog, BuildRequest, ImageLoaded
from cog.package import short_id
from cog.server.build_run import BuildRun
from cog.server.records import Artifact, PackageRecord
from cog.server.settings import IngestOptions
from cog.server.targets import merged

Event = dict[str, Any]


class ImageSteps:
    """Builds, pushes and checks the images of one server's packages."""

    def __init__(
        self,
        builder: Builder | None,
        builder_settings: BuilderSettings,
        options: IngestOptions,
        tmp_dir: Path,
    ):
        self.builder = builder
        self.builder_settings = builder_settings
        self.options = options
        self.tmp_dir = tmp_dir

    def image_name(self, record: PackageRecord, target: str) -> str:
        tag = short_id(record.id) + ("" if target == "cpu" else f"-{target}")
        registry = self.builder_settings.registry.rstrip("/")
        return f"{registry}/{record.name}:{tag}"

    async def build(self, run: BuildRun, zip_path: Path) -> AsyncIterator[Event]:
        """Every target's image, then (unless the check ran during a push) the check."""
        targets = run.record.config.environment.architectures
        checked = ("cpu" if "cpu" in targets else "gpu") if self.options.check_images else ""
        check_started: list[str] = []
        images = [
            self._build_image(run, zip_path, target, check_started if target == checked else None)
            for target in targets
        ]
        at_once = self.options.concurrent_targets
        async with contextlib.aclosing(merged(images, at_once=at_once)) as stream:
            async for event in stream:
                yield event
        if checked and not check_started:  # the builder pushed the image from elsewhere
            image = self.image_name(run.record, checked)
            async with contextlib.aclosing(self._check(run, zip_path, image, checked)) as stream:
                async for event in stream:
                    yield event

    async def _build_image(
        self, run: BuildRun, zip_path: Path, target: str, check_started: list[str] | None
    ) -> AsyncIterator[Event]:
        """One target's image built and pushed; with check_started, the model is checked
        as soon as the image is on the check's engine (the target goes into
        check_started), while it is pushed."""
        assert self.builder is not None
        record = run.record
        image = self.image_name(record, target)
        run.position.enter(f"building the {target.upper()} image {image}", target)
        cold = " without the build cache" if run.no_cache else ""
        yield events.status(f"Building {target.upper()} image {image}{cold}")
        request = BuildRequest(
            package_id=record.id,
            package_zip=zip_path,
            config=record.config,
            target=target,  # type: ignore[arg-type]
            image=image,
            signature_json=json.dumps(record.signature) if record.signature else None,
            no_cache=run.no_cache,
        )
        try:
            async with contextlib.aclosing(self.builder.build(request)) as stream:
                built = _image_events(run, stream, target)
                async for item in built:
                    if not isinstance(item, ImageLoaded):
                        yield item
                    elif check_started is not None:
                        check_started.append(target)
                        checking = self._check(run, zip_path, image, target)
                        async with contextlib.aclosing(merged([built, checking])) as both:
                            async for event in both:
                                yield event
                        break
        except BuildError as exc:
            # Another target may have moved the position meanwhile (built at once): the
            # failure's lines are this one's (unless the check failed).
            if not (exc.step or "").startswith("test"):
                run.position.enter(f"building the {target.upper()} image {image}", target)
            raise

    async def _check(
        self, run: BuildRun, zip_path: Path, image: str, target: str
    ) -> AsyncIterator[Event]:
        from cog.engine import RegistryAuth  # aiodocker: only where checks run
        from cog.server.check import check_image

        run.position.enter(f"testing the model in {image}", target)
        yield events.status(f"Testing the model in {image}")
        async with contextlib.aclosing(
            check_image(
                image,
                zip_path,
                run.record.config,
                run.record.signature,
                docker_host=self.builder_settings.docker_host,
                registry_auth=RegistryAuth(self.builder_settings.registry_auth),
                timeout=self.options.check_timeout,
                socket_root=self.tmp_dir,
                package_id=run.record.id,
            )
        ) as stream:
            async for item in stream:
                run.position.saw(item.line)
                yield events.log(item.stage, item.line, target)


async def _image_events(
    run: BuildRun, stream: AsyncIterator, target: str
) -> AsyncIterator[Event | ImageLoaded]:
    """A builder's events as the build's (ImageLoaded passed on as it is)."""
    async for item in stream:
        if isinstance(item, BuildLog):
            run.position.saw(item.line)
            yield events.log(item.stage, item.line, target)
        elif isinstance(item, ImageLoaded):
            yield item
        else:
            run.artifacts.append(Artifact(f"docker-{target}", item.image, item.digest))
            yield events.status(f"Pushed {item.image} ({item.digest})")
