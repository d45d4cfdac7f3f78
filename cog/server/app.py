"""The cog server's aiohttp application: :func:`make_app` is the one way to build it.

``cog server`` and the tests use it alike, and services that embed the API pass their own
backends and authenticator. Backends are opened in a cleanup context and kept under the
typed keys of :mod:`cog.server.keys`; errors become JSON in one middleware; each request
is logged once and authorized in one middleware (:mod:`cog.server.auth`).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
from aiohttp import web

from cog.builders import Builder, CheckedBuilder, load_builder
from cog.server import views
from cog.server.auth import (
    AUTHENTICATOR,
    Authenticator,
    OpenAccess,
    Scope,
    TokensFile,
    authorize,
)
from cog.server.catalog import Catalog
from cog.server.ingest import IngestService
from cog.server.keys import CATALOG, INGEST, SETTINGS, STORAGE, TMP_DIR
from cog.server.middleware import access_log, json_errors
from cog.server.settings import IngestOptions, ServerSettings
from cog.storage import CheckedStorage, Storage, load_storage

log = structlog.get_logger("cog.server")

__all__ = ["IngestOptions", "ServerSettings", "make_app"]


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
    return app


def default_authenticator(settings: ServerSettings) -> Authenticator:
    if settings.tokens_file is None:
        return OpenAccess()
    anonymous = {Scope.READ} if settings.public_read else set()
    return TokensFile(settings.tokens_file, anonymous_scopes=anonymous)


def _backends(storage: Storage | None, builder: Builder | None):
    async def context(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        async with contextlib.AsyncExitStack() as stack:
            tmp_dir = settings.tmp_dir
            if tmp_dir is None:
                tmp_dir = Path(tempfile.mkdtemp(prefix="cog-server-"))
                stack.callback(shutil.rmtree, tmp_dir, True)
            tmp_dir.mkdir(parents=True, exist_ok=True)
            app[TMP_DIR] = tmp_dir

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

            catalog = Catalog(store, ttl=settings.cache_ttl)
            await catalog.refresh()
            app[CATALOG] = catalog
            refresher = asyncio.create_task(catalog.run_refresher())

            async def stop_refresher() -> None:
                refresher.cancel()
                await asyncio.gather(refresher, return_exceptions=True)

            stack.push_async_callback(stop_refresher)
            app[INGEST] = IngestService(
                store,
                catalog,
                build,
                builder_settings=settings.builder_settings,
                options=settings.ingest,
                limits=settings.package_limits,
                tmp_dir=tmp_dir,
            )
            log.info(
                "cog server ready",
                storage=repr(store),
                builder=build.label if build else None,
                packages=len(await catalog.newest_first()),
            )
            yield

    return context
