"""The cog server's aiohttp application: :func:`make_app` is the one way to build it.

``cog server`` and the tests use it alike, and services that embed the API pass their own
backends and authenticator. Backends are opened in a cleanup context and kept under the
typed keys of :mod:`cog.server.keys`; errors become JSON in one middleware; each request
is logged once and authorized in one middleware (:mod:`cog.server.auth`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from cog.builders import Builder, CheckedBuilder, load_builder
from cog.server import page, predictions, views
from cog.server.auth import (
    AUTHENTICATOR,
    Authenticator,
    OpenAccess,
    Scope,
    TokensFile,
    authorize,
)
from cog.server.catalog import Catalog
from cog.server.examples import ExampleFiles
from cog.server.ingest import IngestService
from cog.server.keys import (
    CATALOG,
    EXAMPLE_FILES,
    INGEST,
    SETTINGS,
    STORAGE,
    TMP_DIR,
    WARM_POOL,
)
from cog.server.middleware import access_log, json_errors
from cog.server.settings import IngestOptions, PredictionOptions, ServerSettings
from cog.server.warm import WarmPool
from cog.server.workdir import WorkDir
from cog.storage import CheckedStorage, Storage, load_storage

log = structlog.get_logger("cog.server")

__all__ = ["IngestOptions", "PredictionOptions", "ServerSettings", "make_app"]


def make_app(
    settings: ServerSettings,
    *,
    storage: Storage | None = None,
    builder: Builder | None = None,
    authenticator: Authenticator | None = None,
) -> web.Application:
    """The cog server. Pass storage/builder objects to embed cog with your own backends
    (they are wrapped in the checks every backend gets); otherwise they are made from
    settings when the app starts. Pass an authenticator to say who callers are your way;
    otherwise it is the settings' tokens file, or no authentication without one (raises
    TokensFileError for a tokens file that cannot be used)."""
    app = web.Application(middlewares=[access_log, json_errors, authorize])
    app[SETTINGS] = settings
    app[AUTHENTICATOR] = authenticator or default_authenticator(settings)
    app.cleanup_ctx.append(_backends(storage, builder))
    views.add_routes(app)
    predictions.add_routes(app)
    page.add_routes(app)
    return app


def default_authenticator(settings: ServerSettings) -> Authenticator:
    if settings.tokens_file is None:
        return OpenAccess()
    anonymous = {Scope.READ} if settings.public_read else set()
    return TokensFile(settings.tokens_file, anonymous_scopes=anonymous)


async def _sweep_check_containers(settings: ServerSettings) -> None:
    """Check containers of servers killed on this machine go at start, not at the next
    check; an engine that cannot be reached now is the next check's to report."""
    from cog.engine import EngineError  # aiodocker: only where checks run
    from cog.server.check import sweep_checks

    try:
        removed = await sweep_checks(settings.builder_settings.docker_host)
    except EngineError as exc:
        log.warning("could not look for check containers left behind", error=exc.message)
        return
    if removed:
        log.info("removed check containers of servers that stopped", containers=removed)


def _backends(storage: Storage | None, builder: Builder | None):
    async def context(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        async with contextlib.AsyncExitStack() as stack:
            workdir = await asyncio.to_thread(WorkDir, settings.tmp_dir)
            stack.callback(workdir.close)
            await asyncio.to_thread(workdir.sweep)
            tmp_dir = app[TMP_DIR] = workdir.path

            if storage is None:
                store = load_storage(settings.storage_url)
            else:
                store = storage if isinstance(storage, CheckedStorage) else CheckedStorage(storage)
            await store.open()
            stack.push_async_callback(store.close)
            app[STORAGE] = store

            build = builder
            if build is None and settings.builder:
                build = load_builder(settings.builder, settings.builder_settings)
            if build is not None and not isinstance(build, CheckedBuilder):
                build = CheckedBuilder(build)
            if build is not None:
                await build.open()
                stack.push_async_callback(build.close)
                if settings.ingest.check_images:
                    await _sweep_check_containers(settings)

            app[EXAMPLE_FILES] = ExampleFiles(store, tmp_dir)
            stack.callback(app[EXAMPLE_FILES].close)

            catalog = Catalog(store, ttl=settings.cache_ttl)
            await catalog.refresh()
            app[CATALOG] = catalog
            ingest = app[INGEST] = IngestService(
                store,
                catalog,
                build,
                builder_settings=settings.builder_settings,
                options=settings.ingest,
                limits=settings.package_limits,
                tmp_dir=tmp_dir,
            )
            if build is not None:
                # Models run where their images are built: the builder's Docker Engine.
                pool = WarmPool(settings.predictions, settings.builder_settings.docker_host)
                stack.push_async_callback(pool.close)
                app[WARM_POOL] = pool
            tasks = [
                asyncio.create_task(catalog.run_refresher()),
                asyncio.create_task(ingest.run_janitor()),
            ]

            async def stop_tasks() -> None:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            stack.push_async_callback(stop_tasks)
            log.info(
                "cog server ready",
                storage=repr(store),
                builder=build.label if build else None,
                packages=len(await catalog.newest_first()),
            )
            yield

    return context
