"""The context server: each build's context tar over HTTP at an unguessable URL, which
BuildKit's Dockerfile frontend fetches (no client session needed)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from cog.builders import BuilderConfigError
from cog.builders.context import build_context


class ContextServer:
    """Serves each build's context tar at an unguessable URL while that build runs."""

    def __init__(self, listen_host: str, listen_port: int, public_base: str | None):
        self.listen_host = listen_host
        self.listen_port = listen_port
        self._public_base = public_base
        self._offers: dict[str, tuple[Path, str]] = {}
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/context/{token}", self._serve, allow_head=False)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.listen_host, self.listen_port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise BuilderConfigError(
                f"cannot serve build contexts on {self.listen_host}:{self.listen_port}: {exc}"
            ) from None
        self._runner = runner
        port = runner.addresses[0][1]  # the real port when 0 was asked
        host = self.listen_host if ":" not in self.listen_host else f"[{self.listen_host}]"
        self.base_url = (self._public_base or f"http://{host}:{port}").rstrip("/")

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._offers.clear()

    @contextlib.asynccontextmanager
    async def offer(self, zip_path: Path, dockerfile: str) -> AsyncIterator[str]:
        """The URL of this context's tar, valid until the block ends."""
        token = secrets.token_urlsafe(32)
        self._offers[token] = (zip_path, dockerfile)
        try:
            yield f"{self.base_url}/context/{token}"
        finally:
            # close() may have forgotten every offer already (server shutdown mid-build).
            self._offers.pop(token, None)

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        offer = self._offers.get(request.match_info["token"])
        if offer is None:
            raise web.HTTPNotFound(text="no such build context")
        zip_path, dockerfile = offer
        response = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
        await response.prepare(request)
        try:
            async with contextlib.aclosing(build_context(zip_path, dockerfile)) as chunks:
                async for chunk in chunks:
                    await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:
            pass  # BuildKit went away (build cancelled); its Solve reports why
        return response
