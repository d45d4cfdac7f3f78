"""HTTP handlers of the registry API (routes in :func:`add_routes`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

import cog
from cog import events
from cog.config import Config, ConfigError, check_config
from cog.package import PackageArchive, PackageLimits, short_id
from cog.server.app import (
    CATALOG,
    PACKAGES,
    SETTINGS,
    STORAGE,
    TMP_DIR,
    ServerSettings,
    error_response,
    json_error,
)
from cog.server.builds import Packages, missing_zip
from cog.server.catalog import log_key, package_key
from cog.server.records import PackageRecord, record_to_json
from cog.server.uploads import ReceivedUpload, receive_upload
from cog.storage import NotFound
from cog.units import format_size

log = structlog.get_logger("cog.server")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ping", ping)
    app.router.add_post("/v1/packages/upload", upload)
    app.router.add_get("/v1/packages/", list_packages)
    app.router.add_get("/v1/packages", list_packages)
    app.router.add_get("/v1/packages/{ref}", show_or_download)
    app.router.add_delete("/v1/packages/{ref}", delete)
    app.router.add_get("/v1/packages/{ref}/log", build_log)
    app.router.add_post("/v1/packages/{ref}/build", rebuild)


async def ping(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": cog.__version__})


# -- packages -------------------------------------------------------------------------


async def upload(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    received = await receive_upload(request, app[TMP_DIR], settings.max_upload_bytes)
    structlog.contextvars.bind_contextvars(package_id=received.package_id)
    try:
        config, signature = await asyncio.to_thread(
            inspect_package, received.path, settings.package_limits
        )
        stream = _verify_then_ingest(app[PACKAGES], received, config, signature, settings)
        return await respond_with_events(request, stream)
    finally:
        # Shielded: a handler cancelled here still removes its upload.
        await asyncio.shield(asyncio.to_thread(received.path.unlink, missing_ok=True))


async def _verify_then_ingest(
    packages: Packages,
    received: ReceivedUpload,
    config: Config,
    signature: dict[str, Any] | None,
    settings: ServerSettings,
) -> AsyncIterator[dict[str, Any]]:
    """ "Received package" at once, then every member decompressed and CRC-checked (seconds
    for a large package: the client hears from us first), then stored and built."""
    yield events.status(
        f"Received package {short_id(received.package_id)} ({format_size(received.size)})"
    )
    await asyncio.to_thread(verify_package, received.path, settings.package_limits)
    async with contextlib.aclosing(
        packages.ingest(received.package_id, received.size, received.path, config, signature)
    ) as stream:
        async for event in stream:
            yield event


def inspect_package(path: Path, limits: PackageLimits) -> tuple[Config, dict[str, Any] | None]:
    """Validate an uploaded zip's structure and its cog.yaml; the completed config and the
    signature. Members are read only as far as the config needs (see verify_package).

    Blocking (zipfile): run it in a thread.
    """
    with PackageArchive.open(path, limits, verify=False) as archive:
        config = check_config(archive.read_text("cog.yaml"), archive)
        return config, _static_signature(archive, config)


def verify_package(path: Path, limits: PackageLimits) -> None:
    """Decompress every member once: InvalidPackage for a corrupt one, or one that expands
    past what its header declares (a lying zip bomb). Blocking: run it in a thread."""
    with PackageArchive.open(path, limits, verify=True):
        pass


def _static_signature(archive: PackageArchive, config: Config) -> dict[str, Any] | None:
    """The inputs read from the model file without importing it; None if not knowable so.

    Inputs declared wrongly (a default outside min/max, ...) are refused now, before any
    image is built, with the same messages the model would give at import.
    """
    from cog.server.source import static_signature
    from cog.signature import SignatureError

    module, _, class_name = config.model.partition(":")
    try:
        signature = static_signature(archive.read_text(module), class_name, filename=module)
    except SignatureError as exc:
        raise ConfigError(tuple(getattr(exc, "problems", None) or (str(exc),))) from None
    except SyntaxError:
        return None
    return signature.to_json() if signature is not None else None


async def list_packages(request: web.Request) -> web.Response:
    body = await request.app[CATALOG].listing_json()
    return web.Response(body=body, content_type="application/json")


async def resolve(request: web.Request, ref: str) -> PackageRecord:
    try:
        record = await request.app[CATALOG].resolve(ref)
    except ValueError as exc:  # not a usable ID or prefix
        raise web.HTTPBadRequest(text=str(exc)) from None
    structlog.contextvars.bind_contextvars(package_id=record.id)
    return record


async def show_or_download(request: web.Request) -> web.StreamResponse:
    ref = request.match_info["ref"]
    if ref.endswith(".zip"):
        return await download(request, ref.removesuffix(".zip"))
    record = await resolve(request, ref)
    return web.json_response(record_to_json(record))


async def download(request: web.Request, ref: str) -> web.StreamResponse:
    record = await resolve(request, ref)
    etag = f'"{record.id}"'  # content-addressed: the ID is a strong validator
    headers = {
        "ETag": etag,
        "Content-Type": "application/zip",
        "Content-Disposition": f'attachment; filename="{record.name.replace("/", "-")}-'
        f'{record.id[:12]}.zip"',
        "Cache-Control": "public, max-age=31536000, immutable",
    }
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    response: web.StreamResponse | None = None
    try:
        async with request.app[STORAGE].open_reader(package_key(record.id)) as blob:
            response = web.StreamResponse(headers=headers)
            response.content_length = blob.info.size
            await response.prepare(request)
            if request.method != "HEAD":
                async for chunk in blob.chunks():
                    await response.write(chunk)
            await response.write_eof()
            return response
    except NotFound:
        if response is not None:  # not on entry: the status line is gone already
            raise
        # The record outlived its zip: a delete running now, or a store changed by hand.
        log.warning("package record without its zip", package_id=record.id)
        return json_error(404, missing_zip(record.id))


async def delete(request: web.Request) -> web.Response:
    record = await resolve(request, request.match_info["ref"])
    if request.app[PACKAGES].live(record.id) is not None:
        return json_error(409, "this package is being built; delete it when the build ends")
    await request.app[CATALOG].delete(record.id)
    return web.json_response({"ID": record.id, "Deleted": True})


async def rebuild(request: web.Request) -> web.StreamResponse:
    record = await resolve(request, request.match_info["ref"])
    return await respond_with_events(request, request.app[PACKAGES].rebuild(record))


async def build_log(request: web.Request) -> web.StreamResponse:
    """The build's events as NDJSON: followed live while it runs, else the stored log."""
    record = await resolve(request, request.match_info["ref"])
    live = request.app[PACKAGES].live(record.id)
    if live is not None:
        return await stream_ndjson(request, live.follow())
    storage = request.app[STORAGE]
    try:
        async with storage.open_reader(log_key(record.id)) as blob:
            response = web.StreamResponse(headers={"Content-Type": events.NDJSON})
            response.content_length = blob.info.size
            await response.prepare(request)
            async for chunk in blob.chunks():
                await response.write(chunk)
            await response.write_eof()
            return response
    except NotFound:
        return json_error(404, f"no build log stored for package {record.id[:12]}")


# -- event streams --------------------------------------------------------------------


def wants_ndjson(request: web.Request) -> bool:
    return events.NDJSON in request.headers.get("Accept", "")


async def respond_with_events(
    request: web.Request, stream: AsyncIterator[dict[str, Any]]
) -> web.StreamResponse:
    """NDJSON when asked for (every event, flushed as it happens), else the final result."""
    if wants_ndjson(request):
        return await stream_ndjson(request, stream)
    final: dict[str, Any] | None = None
    async with contextlib.aclosing(stream):
        async for event in stream:
            if event["type"] in ("package", "error"):
                final = event
    if final is None:
        return json_error(500, "the build ended without a result (see the server log)")
    if final["type"] == "error":
        return json_error(final["status"], final["message"], package=final.get("package"))
    return web.json_response(final["package"])


async def stream_ndjson(
    request: web.Request, stream: AsyncIterator[dict[str, Any]]
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": events.NDJSON, "Cache-Control": "no-cache"}
    )
    response.enable_chunked_encoding()
    await response.prepare(request)
    async with contextlib.aclosing(stream):
        try:
            async for event in stream:
                await response.write(events.encode(event))
        except ConnectionResetError:
            # The client left (a builder may say one last line after it did): end as the
            # cancellation that leaving is, not as an error aiohttp logs.
            raise asyncio.CancelledError from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The status line is gone already: a failure becomes the final error event.
            status, message, _ = error_response(exc)
            await response.write(events.encode(events.error(message, status)))
    await response.write_eof()
    return response
