"""The docker-grpc tunnel: a private unix socket whose connections are spliced to a Docker
Engine's ``/grpc`` endpoint after an HTTP upgrade to h2c, which grpcio cannot do itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import urllib.parse


class EngineTunnel:
    """A private unix socket; each connection is spliced to an upgraded engine ``/grpc``."""

    def __init__(self, engine: str):
        self.engine = engine
        #: why the last upgrade failed (added to "unreachable" messages), None if it did not
        self.last_error: str | None = None
        self._dir: str | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> str:
        """Listen; returns the grpcio target of the socket."""
        self._dir = tempfile.mkdtemp(prefix="cog-buildkit-")  # mode 0700
        path = os.path.join(self._dir, "grpc.sock")
        self._server = await asyncio.start_unix_server(self._handle, path)
        return f"unix://{path}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def _open_engine(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        url = urllib.parse.urlsplit(self.engine)
        if url.scheme == "unix":
            return await asyncio.open_unix_connection(url.netloc + url.path)
        return await asyncio.open_connection(url.hostname, url.port)

    async def _upgrade(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            reader, writer = await self._open_engine()
        except OSError as exc:
            self.last_error = f"cannot connect to the Docker Engine at {self.engine}: {exc}"
            return None
        writer.write(
            b"POST /grpc HTTP/1.1\r\nHost: docker\r\nConnection: Upgrade\r\n"
            b"Upgrade: h2c\r\nContent-Length: 0\r\n\r\n"
        )
        try:
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.last_error = f"the Docker Engine at {self.engine} broke off the upgrade: {exc!r}"
            writer.close()
            return None
        except BaseException:
            writer.close()
            raise
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        if " 101 " not in f"{status} ":
            self.last_error = (
                f"the Docker Engine at {self.engine} answered {status!r} to the /grpc upgrade "
                "(an engine without BuildKit, or an Engine API older than 1.31?)"
            )
            writer.close()
            return None
        self.last_error = None
        return reader, writer

    async def _handle(self, client_reader, client_writer) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        engine_writer = None
        try:
            upgraded = await self._upgrade()
            if upgraded is None:
                return
            engine_reader, engine_writer = upgraded
            pipes = [
                asyncio.ensure_future(_pipe(client_reader, engine_writer)),
                asyncio.ensure_future(_pipe(engine_reader, client_writer)),
            ]
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
        except asyncio.CancelledError:
            # Only close() cancels these tasks. Ending normally matters: asyncio's stream
            # server reports a handler task that ends cancelled as an unhandled error.
            pass
        finally:
            for writer in (client_writer, engine_writer):
                if writer is not None:
                    writer.close()
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
