"""Serving the app on a socket: how ``cog server`` runs it, with bounds on connections.

aiohttp's own server is used, with one request handler of cog's (:class:`_Handler`):

- requests that never reach the app (a header line too long, too many headers, a
  request line that is not HTTP) are answered with JSON like every other error, and
  logged in one line, not with aiohttp's text/plain body and a traceback;
- a connection has ``header_timeout`` seconds to send each request's headers (and an
  idle keep-alive connection is closed after as long): a client trickling its headers is
  cut off;
- at most ``max_connections`` are open, and ``max_per_client`` from one address: the
  ones over are closed at once. A slow upload body is bounded by these and by the
  upload's own stall timeout (:mod:`cog.server.uploads`).

The handler and server classes hook into aiohttp where its runner makes them; the tests
of this module pin the behaviour an aiohttp upgrade must keep.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import sys
from collections.abc import Callable
from typing import Any

import attrs
import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from cog.server.errors import json_error

log = structlog.get_logger("cog.server")


@attrs.frozen
class ConnectionLimits:
    #: seconds a client has to send a request's headers; also how long an idle
    #: keep-alive connection stays open
    header_timeout: float = 15.0
    #: connections open at once; more are closed as they come
    max_connections: int = 512
    #: connections open at once from one client address
    max_per_client: int = 64
    #: the longest request line or header line, and the most headers (aiohttp's own)
    max_line_size: int = 8190
    max_headers: int = 128


class _Server(web.Server):
    """aiohttp's server, counting connections per client address for the handler."""

    limits: ConnectionLimits
    per_client: collections.Counter[str]
    refused: int

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class _Handler(RequestHandler):
    """One connection (see the module docstring)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._manager
        assert isinstance(server, _Server)
        peer = transport.get_extra_info("peername")
        self._client = peer[0] if isinstance(peer, tuple) and peer else ""
        server.per_client[self._client] += 1
        super().connection_made(transport)
        limits = server.limits
        over = len(server.connections) > limits.max_connections or (
            self._client and server.per_client[self._client] > limits.max_per_client
        )
        if over:
            server.refused += 1
            if server.refused == 1 or server.refused % 1000 == 0:
                log.warning(
                    "connection refused: too many open",
                    client=self._client,
                    refused=server.refused,
                    max_connections=limits.max_connections,
                    max_per_client=limits.max_per_client,
                )
            self.force_close()
            transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        server = self._manager
        if isinstance(server, _Server):
            server.per_client[self._client] -= 1
            if server.per_client[self._client] <= 0:
                del server.per_client[self._client]
        super().connection_lost(exc)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request that failed before (or outside) the app: JSON, one log line."""
        if status >= 500:
            log.error("request failed outside the app", status=status, exc_info=exc)
            text = "internal server error (see the server log)"
        else:
            text = f"bad request: {message or getattr(exc, 'message', '') or exc}".strip()
            log.info("bad request", status=status, error=text, client=request.remote)
        if request.writer.output_size > 0:
            raise ConnectionError("the response has begun; no error can be sent now")
        response = json_error(status, text)
        response.force_close()
        return response


class CogAppRunner(web.AppRunner):
    """An AppRunner whose connections get cog's handler and limits."""

    def __init__(self, app: web.Application, *, limits: ConnectionLimits, **kwargs: Any):
        kwargs.setdefault("keepalive_timeout", limits.header_timeout)
        kwargs.setdefault("max_line_size", limits.max_line_size)
        kwargs.setdefault("max_field_size", limits.max_line_size)
        kwargs.setdefault("max_headers", limits.max_headers)
        super().__init__(app, **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp makes its Server in the app; it becomes ours, state and all.
        server.__class__ = _Server
        assert isinstance(server, _Server)
        server.limits = self.limits
        server.per_client = collections.Counter()
        server.refused = 0
        return server


def serve(
    app: web.Application,
    host: str,
    port: int,
    *,
    limits: ConnectionLimits,
    ready: Callable[[str], None],
    shutdown_timeout: float = 10.0,
) -> None:
    """Serve app until SIGINT or SIGTERM, then stop gracefully (``cog server``)."""
    asyncio.run(_serve(app, host, port, limits, ready, shutdown_timeout))


async def _serve(
    app: web.Application,
    host: str,
    port: int,
    limits: ConnectionLimits,
    ready: Callable[[str], None],
    shutdown_timeout: float,
) -> None:
    # A worker thread reading a package (a config, a model's source) holds the GIL for up
    # to this long before the event loop may take it back: 1 ms rather than Python's
    # 5 ms keeps every request quick while one is read.
    sys.setswitchinterval(0.001)
    runner = CogAppRunner(
        app,
        limits=limits,
        access_log=None,
        # A client that goes away cancels its build (and the build in the backend).
        handler_cancellation=True,
        shutdown_timeout=shutdown_timeout,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        ready(f"http://{host}:{port}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
