"""Connections as a hostile client makes them: requests aiohttp refuses before the app
sees them (answered with JSON, logged in one line), headers trickled in forever (cut off),
more connections than the server will hold (closed as they come), an upload that stops
(408). The real app behind cog's own runner, as `cog server` serves it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from cog.server.app import ServerSettings, make_app
from cog.server.serving import CogAppRunner, ConnectionLimits
from tests.registry_helpers import make_model_dir, nothing_spooled, package_bytes


class Served:
    def __init__(self, runner: CogAppRunner, port: int):
        self.runner, self.port = runner, port

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send raw bytes as a request; the status, headers and body of the answer."""
        reader, writer = await self.connect()
        try:
            writer.write(raw)
            await writer.drain()
            return await read_response(reader)
        finally:
            writer.close()
            await writer.wait_closed()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines if line)
    body = await asyncio.wait_for(reader.readexactly(int(headers["Content-Length"])), 10)
    return int(status_line.split()[1]), headers, body


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Whether the server closes the connection (read to its end, bounded by a timeout)."""
    with contextlib.suppress(ConnectionResetError, asyncio.IncompleteReadError):
        await asyncio.wait_for(reader.read(), 10)
    return reader.at_eof()


@pytest.fixture
def limits() -> ConnectionLimits:
    return ConnectionLimits(header_timeout=0.5, max_connections=12, max_per_client=8)


@pytest.fixture
async def served(tmp_path, limits) -> AsyncIterator[Served]:
    settings = ServerSettings(
        storage_url=f"file://{tmp_path / 'store'}",
        builder=None,
        tmp_dir=tmp_path / "spool",
        upload_idle_timeout=0.5,
    )
    runner = CogAppRunner(make_app(settings), limits=limits, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Served(runner, port)
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("what", "raw", "words"),
    [
        (
            "a header line too long",
            b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
            "bad request: Got more than 8190 bytes",
        ),
        (
            "too many headers",
            b"GET /ping HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
            + b"\r\n",
            "bad request: Too many headers received",
        ),
        ("a request line that is not HTTP", b"HELLO\r\n\r\n", "bad request: "),
    ],
)
async def test_requests_refused_before_the_app_are_json_and_one_log_line(
    served, caplog, what, raw, words
):
    with capture_logs() as logs, caplog.at_level(logging.DEBUG, logger="aiohttp"):
        status, headers, body = await served.request(raw)
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["error"].startswith(words), body
    assert [entry["event"] for entry in logs] == ["bad request"]
    assert not [r for r in caplog.records if r.exc_info], "aiohttp logged a traceback"


async def test_headers_trickled_forever_are_cut_off(served, limits):
    reader, writer = await served.connect()
    writer.write(b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Slow: ")

    # One byte at a time, as the attack does; the server ends it after header_timeout.
    async def trickle() -> None:
        while not reader.at_eof():
            writer.write(b"a")
            await writer.drain()
            await asyncio.sleep(0.05)

    trickling = asyncio.ensure_future(trickle())
    try:
        assert await closed_by_server(reader)
    finally:
        trickling.cancel()
        await asyncio.gather(trickling, return_exceptions=True)
        writer.close()
    status, _, _ = await served.request(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200


async def test_connections_over_the_limits_are_closed_as_they_come(served, limits):
    held = [await served.connect() for _ in range(limits.max_per_client)]
    # One client: the next one over its share is closed at once...
    extra_reader, extra_writer = await served.connect()
    assert await closed_by_server(extra_reader)
    extra_writer.close()
    # ...and the ones it holds still work.
    reader, writer = held[0]
    writer.write(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    assert (await read_response(reader))[0] == 200
    for _, writer in held:
        writer.close()


async def test_the_total_is_bounded_whatever_the_addresses(served, limits):
    """Clients from several loopback addresses share max_connections."""
    held = []
    for i in range(limits.max_connections):
        host = f"127.0.0.{2 + i % 3}"
        held.append(await asyncio.open_connection("127.0.0.1", served.port, local_addr=(host, 0)))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", served.port, local_addr=("127.0.0.9", 0)
    )
    assert await closed_by_server(reader)
    writer.close()
    for _, writer in held:
        writer.close()


async def test_an_upload_that_stops_sending_is_408_and_leaves_nothing(served, tmp_path):
    data, _ = package_bytes(make_model_dir(tmp_path / "hello"))
    head = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="p.zip"\r\n'
        b"Content-Type: application/zip\r\n\r\n"
    )
    reader, writer = await served.connect()
    writer.write(
        b"POST /v1/packages/upload HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n"
        + b"Content-Length: %d\r\n\r\n" % (len(head) + len(data) * 2)
        + head
        + data
    )
    await writer.drain()
    status, _, body = await read_response(reader)  # and then nothing more is sent
    assert status == 408
    assert json.loads(body)["error"] == "the upload stalled: nothing arrived for 0.5 seconds"
    assert await closed_by_server(reader)
    writer.close()
    await nothing_spooled(tmp_path / "spool")


def test_the_flags_defaults_are_the_limits_defaults():
    from cog.cli.main import build_parser

    args = build_parser().parse_args(["server"])
    assert (
        ConnectionLimits(
            header_timeout=args.header_timeout,
            max_connections=args.max_connections,
            max_per_client=args.max_connections_per_client,
        )
        == ConnectionLimits()
    )
