"""Every error a request can end in, as the HTTP status and JSON message it answers with.

One mapping for the whole server: handlers raise domain errors, :func:`error_response`
says what each one means for a client (the error middleware and the build streams' final
``error`` event both use it). Unexpected ones are logged with their traceback and answer
a bare 500: a client never sees a traceback.
"""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web

from cog.config import ConfigError
from cog.package import InvalidPackage
from cog.server.auth import Forbidden, Unauthenticated
from cog.server.catalog import AmbiguousPrefix, PackageDeleted, PackageNotFound
from cog.server.examples import ExampleFileNotFound
from cog.server.model_api import BadInputs, PredictionFailed, TooLarge
from cog.server.uploads import UploadError
from cog.server.warm import ModelUnavailable, QueueFull
from cog.storage import StorageError, StorageUnavailable

log = structlog.get_logger("cog.server")


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def render_error(exc: BaseException) -> web.Response:
    """The JSON answer to an error a handler let through, with the headers it calls for."""
    status, message, extra = error_response(exc)
    response = json_error(status, message, **extra)
    if isinstance(exc, Unauthenticated):
        response.headers["WWW-Authenticate"] = 'Bearer realm="cog"'
    if getattr(exc, "close_connection", False):
        response.force_close()
    return response


def error_response(exc: BaseException) -> tuple[int, str, dict[str, Any]]:
    """Status, message and extra JSON fields for any error a handler lets through."""
    if isinstance(exc, Unauthenticated):
        return 401, str(exc), {}
    if isinstance(exc, Forbidden):
        return 403, str(exc), {"scope": exc.scope.value}
    if isinstance(exc, web.HTTPException):
        return exc.status, (exc.text or exc.reason).removeprefix(f"{exc.status}: ").strip(), {}
    if isinstance(exc, (PackageNotFound, ExampleFileNotFound)):
        return 404, str(exc), {}
    if isinstance(exc, PackageDeleted):
        return 410, str(exc), {}
    if isinstance(exc, AmbiguousPrefix):
        return 409, str(exc), {"matches": exc.matches}
    if isinstance(exc, (UploadError, InvalidPackage)):
        return getattr(exc, "http_status", 400), str(exc), {}
    if isinstance(exc, BadInputs):
        return 400, str(exc), {}
    if isinstance(exc, TooLarge):
        return 413, str(exc), {}
    if isinstance(exc, QueueFull):
        return 503, str(exc), {}
    if isinstance(exc, ModelUnavailable):
        return 502, str(exc), {"logs": list(exc.logs)}
    if isinstance(exc, PredictionFailed):
        return exc.http_status, str(exc), {"logs": list(exc.logs)}
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
