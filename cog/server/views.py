"""The cog server's HTTP API: each handler translates a request for the ingest service,
the catalog or storage, and their answer back (routes in :func:`add_routes`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import structlog
from aiohttp import web

import cog
from cog import events
from cog.server.catalog import log_key, package_key
from cog.server.errors import error_response, json_error
from cog.server.ingest import PackageBusy, missing_zip
from cog.server.keys import CATALOG, INGEST, SETTINGS, STORAGE, TMP_DIR
from cog.server.records import PackageRecord, record_to_json
from cog.server.uploads import receive_upload
from cog.storage import NotFound

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


def query_flag(request: web.Request, name: str) -> bool:
    """A yes/no query parameter (``?no_cache=1``); absent is no. 400 for anything else."""
    value = request.query.get(name)
    if value is None:
        return False
    if value.strip().lower() in ("", "1", "true", "yes"):
        return True
    if value.strip().lower() in ("0", "false", "no"):
        return False
    raise web.HTTPBadRequest(text=f"query parameter {name}={value!r}: use 1 or 0")


async def upload(request: web.Request) -> web.StreamResponse:
    app = request.app
    no_cache = query_flag(request, "no_cache")  # refused before the body is read
    settings = app[SETTINGS]
    received = await receive_upload(
        request,
        app[TMP_DIR],
        settings.max_upload_bytes,
        max_members=settings.package_limits.max_members,
    )
    structlog.contextvars.bind_contextvars(package_id=received.package_id)
    try:
        stream = await app[INGEST].accept(received, no_cache=no_cache)
        return await respond_with_events(request, stream)
    finally:
        # Shielded: a handler cancelled here still removes its upload.
        await asyncio.shield(asyncio.to_thread(received.path.unlink, missing_ok=True))


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
    response = await stream_blob(request, package_key(record.id), headers)
    if response is None:
        # The record outlived its zip: a delete running now, or a store changed by hand.
        log.warning("package record without its zip", package_id=record.id)
        return json_error(404, missing_zip(record.id))
    return response


async def delete(request: web.Request) -> web.Response:
    record = await resolve(request, request.match_info["ref"])
    try:
        await request.app[INGEST].delete(record)
    except PackageBusy as exc:
        return json_error(409, str(exc))
    return web.json_response({"ID": record.id, "Deleted": True})


async def rebuild(request: web.Request) -> web.StreamResponse:
    no_cache = query_flag(request, "no_cache")
    record = await resolve(request, request.match_info["ref"])
    stream = request.app[INGEST].rebuild(record, no_cache=no_cache)
    return await respond_with_events(request, stream)


async def build_log(request: web.Request) -> web.StreamResponse:
    """The build's events as NDJSON: followed live while it runs, else the stored log."""
    record = await resolve(request, request.match_info["ref"])
    live = request.app[INGEST].live(record.id)
    if live is not None:
        return await stream_ndjson(request, live.follow())
    headers = {"Content-Type": events.NDJSON}
    response = await stream_blob(request, log_key(record.id), headers)
    if response is None:
        return json_error(404, f"no build log stored for package {record.id[:12]}")
    return response


async def stream_blob(
    request: web.Request, key: str, headers: Mapping[str, str]
) -> web.StreamResponse | None:
    """A blob of storage as the response, streamed, with its Content-Length; None if
    there is no such blob (found out before anything is sent)."""
    response: web.StreamResponse | None = None
    try:
        async with request.app[STORAGE].open_reader(key) as blob:
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
        return None


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
