"""What wraps every request: one access-log line, and errors answered as JSON.

The third middleware, :func:`cog.server.auth.authorize`, lives with the scopes it checks.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import structlog
from aiohttp import web

from cog.server.errors import render_error

log = structlog.get_logger("cog.server")


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Errors -> JSON with the right status, in one place. Never a traceback to clients."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return render_error(exc)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:
        return render_error(exc)


@web.middleware
async def access_log(request: web.Request, handler) -> web.StreamResponse:
    """One line per request: method, path, status, duration, who (the token's name, never
    the token) and the package id when known."""
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
        bound = structlog.contextvars.get_contextvars()
        log.info(
            "request",
            package_id=bound.get("package_id"),
            who=bound.get("who"),
            method=request.method,
            path=request.path,
            status=status,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        structlog.contextvars.clear_contextvars()
