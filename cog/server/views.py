"""The cog server's HTTP API: each handler translates a request for the ingest service,
the catalog or storage, and their answer back (routes, each with the scope it needs, in
:func:`add_routes`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import structlog
from aiohttp import web

import cog
from cog import events
from cog.config import name_problem
from cog.server.auth import IDENTIFIED, PUBLIC, Routes, Scope, identity
from cog.server.catalog import log_key, package_key
from cog.server.errors import error_response, json_error
from cog.server.ingest import PackageBusy, missing_zip
from cog.server.keys import (
    CATALOG,
    EXAMPLE_FILES,
    INGEST,
    SETTINGS,
    STORAGE,
    TMP_DIR,
    WARM_POOL,
)
from cog.server.records import PackageRecord, record_to_json, summary_to_json
from cog.server.uploads import receive_upload
from cog.storage import NotFound

log = structlog.get_logger("cog.server")


def add_routes(app: web.Application) -> None:
    """Every route, with what it needs (see cog.server.auth)."""
    routes = Routes(app)
    routes.get("/ping", ping, PUBLIC)
    routes.get("/v1/whoami", whoami, IDENTIFIED)
    routes.post("/v1/packages/upload", upload, Scope.WRITE)
    routes.get("/v1/packages/", list_packages, Scope.READ)
    routes.get("/v1/packages", list_packages, Scope.READ)
    routes.get("/v1/packages/{ref}", show_or_download, Scope.READ)
    routes.delete("/v1/packages/{ref}", delete, Scope.ADMIN)
    routes.get("/v1/packages/{ref}/log", build_log, Scope.READ)
    routes.post("/v1/packages/{ref}/build", rebuild, Scope.WRITE)
    routes.get("/v1/packages/{ref}/files/{name:.+}", example_file, Scope.READ)


async def ping(request: web.Request) -> web.Response:
    """Health, and what this server does (the page says what it cannot do)."""
    builder = request.app[INGEST].builder
    return web.json_response(
        {
            "status": "ok",
            "version": cog.__version__,
            "builder": builder.label if builder is not None else None,
            "predictions": WARM_POOL in request.app,
        }
    )


async def whoami(request: web.Request) -> web.Response:
    """Who the server takes the caller for, and what they may do (`cog login` asks)."""
    who = identity(request)
    scopes = [scope.value for scope in Scope if who.may(scope)]
    return web.json_response({"Name": who.name, "Scopes": scopes, "Anonymous": who.anonymous})


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
    # ?name=: the package's name if its cog.yaml has none (`cog build` sends its
    # directory's name), checked before the body is read.
    name = request.query.get("name") or None
    if name is not None and name_problem(name):
        raise web.HTTPBadRequest(text=f"name: {name_problem(name)}")
    received = await receive_upload(
        request,
        app[TMP_DIR],
        settings.max_upload_bytes,
        settings.upload_idle_timeout,
        max_members=settings.package_limits.max_members,
    )
    structlog.contextvars.bind_contextvars(package_id=received.package_id)
    try:
        stream = await app[INGEST].accept(
            received, default_name=name, by=identity(request).name, no_cache=no_cache
        )
        return await respond_with_events(request, stream)
    finally:
        # Shielded: a handler cancelled here still removes its upload.
        await asyncio.shield(asyncio.to_thread(received.path.unlink, missing_ok=True))


#: the most packages one page of a listing holds
MAX_PAGE = 1000


async def list_packages(request: web.Request) -> web.Response:
    """Every package document; or, asked with ``limit``, ``offset`` or ``name`` (a part of
    the name, any case), one page of summaries with the number of matches in
    ``X-Total-Count``."""
    query = request.query
    if not {"limit", "offset", "name"} & query.keys():
        body = await request.app[CATALOG].listing_json()
        return web.Response(body=body, content_type="application/json")
    limit = _whole_number(query, "limit", 100, 1, MAX_PAGE)
    offset = _whole_number(query, "offset", 0, 0, None)
    total, records = await request.app[CATALOG].page(
        name=query.get("name", "").strip(), offset=offset, limit=limit
    )
    return web.json_response(
        [summary_to_json(r) for r in records], headers={"X-Total-Count": str(total)}
    )


def _whole_number(query: Mapping[str, str], key: str, default: int, low: int, high: int | None):
    text = query.get(key, "")
    if not text:
        return default
    if not text.isdigit() or int(text) < low or (high is not None and int(text) > high):
        upto = f" to {high}" if high is not None else " or more"
        raise web.HTTPBadRequest(text=f"{key} must be a whole number from {low}{upto}")
    return int(text)


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


async def example_file(request: web.Request) -> web.StreamResponse:
    """A file one of the package's examples names (for the page to show)."""
    record = await resolve(request, request.match_info["ref"])
    found = await request.app[EXAMPLE_FILES].get(record, request.match_info["name"])
    shown = found.content_type != "application/octet-stream"
    disposition = "inline" if shown else f'attachment; filename="{found.filename}"'
    return web.FileResponse(
        found.path,
        headers={
            "Content-Type": found.content_type,
            "Content-Disposition": disposition,
            "Cache-Control": "public, max-age=31536000, immutable",
            "X-Content-Type-Options": "nosniff",
            # never a document that runs anything, whatever the file holds
            "Content-Security-Policy": "default-src 'none'; sandbox",
        },
    )


async def delete(request: web.Request) -> web.Response:
    record = await resolve(request, request.match_info["ref"])
    try:
        await request.app[INGEST].delete(record, by=identity(request).name)
    except PackageBusy as exc:
        return json_error(409, str(exc))
    return web.json_response({"ID": record.id, "Deleted": True})


async def rebuild(request: web.Request) -> web.StreamResponse:
    no_cache = query_flag(request, "no_cache")
    record = await resolve(request, request.match_info["ref"])
    stream = request.app[INGEST].rebuild(record, by=identity(request).name, no_cache=no_cache)
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
