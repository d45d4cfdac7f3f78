"""The registry server's aiohttp application: the one way to build it.

``make_app(settings)`` is used by ``cog server`` and by the tests alike. Backends are
opened in a cleanup context and kept under typed app keys; errors become JSON in one
middleware; each request is logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import structlog
from aiohttp import web

from cog.builders import Builder, BuilderSettings, load_builder
from cog.config import ConfigError
from cog.package import InvalidPackage, PackageLimits
from cog.server.builds import BuildOptions, Packages
from cog.server.catalog import AmbiguousPrefix, Catalog, PackageNotFound
from cog.server.uploads import UploadError
from cog.storage import Storage, StorageError, StorageUnavailable, load_storage

log = structlog.get_logger("cog.server")


@attrs.frozen
class ServerSettings:
    storage_url: str = "file:///var/lib/cog"
    #: builder entry-point name; None: store packages only, build no images
    builder: str | None = "docker"
    builder_settings: BuilderSettings = attrs.field(
        factory=lambda: BuilderSettings(registry="127.0.0.1:5000")
    )
    build: BuildOptions = attrs.field(factory=BuildOptions)
    #: where uploads are spooled; None: a fresh directory under the system temp dir
    tmp_dir: Path | None = None
    max_upload_bytes: int = 4 * 1024**3
    package_limits: PackageLimits = attrs.field(factory=PackageLimits)
    #: how often the package index is refreshed from Storage (seconds)
    cache_ttl: float = 2.0


SETTINGS = web.AppKey("settings", ServerSettings)
STORAGE = web.AppKey("storage", Storage)
CATALOG = web.AppKey("catalog", Catalog)
PACKAGES = web.AppKey("packages", Packages)
BUILDER = web.AppKey("builder", object)  # Builder | None
TMP_DIR = web.AppKey("tmp_dir", Path)


def make_app(
    settings: ServerSettings,
    *,
    storage: Storage | None = None,
    builder: Builder | None = None,
) -> web.Application:
    """The registry app. Pass storage/builder objects to embed cog with your own backends;
    otherwise they are created from settings when the app starts."""
    from cog.server import views

    app = web.Application(middlewares=[access_log, json_errors])
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_backends(storage, builder))
    views.add_routes(app)
    return app


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

            store = storage if storage is not None else load_storage(settings.storage_url)
            await store.open()
            stack.push_async_callback(store.close)
            app[STORAGE] = store

            build = builder
            if build is None and settings.builder:
                build = load_builder(settings.builder, settings.builder_settings)
            if build is not None:
                await build.open()
                stack.push_async_callback(build.close)
            app[BUILDER] = build

            catalog = Catalog(store, ttl=settings.cache_ttl)
            await catalog.refresh()
            app[CATALOG] = catalog
            refresher = asyncio.create_task(catalog.run_refresher())

            async def stop_refresher() -> None:
                refresher.cancel()
                await asyncio.gather(refresher, return_exceptions=True)

            stack.push_async_callback(stop_refresher)
            app[PACKAGES] = Packages(store, catalog, build, settings.build, tmp_dir)
            log.info(
                "registry ready",
                storage=repr(store),
                builder=type(build).__name__ if build else None,
                packages=len(await catalog.newest_first()),
            )
            yield

    return context


def json_error(status: int, message: str, **extra: object) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def error_response(exc: Exception) -> tuple[int, str, dict[str, object]]:
    """Status, message and extra JSON fields for any error a handler lets through."""
    if isinstance(exc, web.HTTPException):
        return exc.status, (exc.text or exc.reason).removeprefix(f"{exc.status}: ").strip(), {}
    if isinstance(exc, PackageNotFound):
        return 404, str(exc), {}
    if isinstance(exc, AmbiguousPrefix):
        return 409, str(exc), {"matches": exc.matches}
    if isinstance(exc, (UploadError, InvalidPackage)):
        return getattr(exc, "http_status", 400), str(exc), {}
    if isinstance(exc, ConfigError):
        return 400, f"invalid cog.yaml:\n{exc}", {"problems": list(exc.problems)}
    if isinstance(exc, StorageUnavailable):
        log.warning("storage unavailable", error=str(exc))
        return 503, f"storage is unavailable: {exc}", {}
    if isinstance(exc, StorageError):
        log.error("storage error", error=str(exc))
        return 500, f"storage error: {exc}", {}
    log.error("unhandled error", exc_info=exc)
    return 500, "internal server error (see the server log)", {}


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Errors -> JSON with the right status, in one place. Never a traceback to clients."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        status, message, extra = error_response(exc)
        return json_error(status, message, **extra)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        status, message, extra = error_response(exc)
        response = json_error(status, message, **extra)
        if getattr(exc, "close_connection", False):
            response.force_close()
        return response


@web.middleware
async def access_log(request: web.Request, handler) -> web.StreamResponse:
    """One line per request: method, path, status, duration, package id when known."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=uuid.uuid4().hex[:12])
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499  # client closed the request
        raise
    finally:
        log.info(
            "request",
            package_id=structlog.contextvars.get_contextvars().get("package_id"),
            method=request.method,
            path=request.path,
            status=status,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        structlog.contextvars.clear_contextvars()
