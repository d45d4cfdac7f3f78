"""The check's judgement of a model's answer: streamed and bounded, whatever the model
sends. A real HTTP server plays the model's side (the check talks HTTP to the runtime);
it counts what it managed to send before the check stopped reading."""

from __future__ import annotations

import asyncio
import zipfile
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from cog.server.answers import judge

MiB = 1024 * 1024
#: what a model tries to send: far more than the check may hold
HUGE = 256 * MiB
#: what may be in flight when the check stops reading (socket buffers and a chunk or two)
IN_FLIGHT = 32 * MiB


class Model:
    """Answers /infer with `size` bytes of `byte`, preceded by `head`, counting what
    it sent; /error answers 500 the same way."""

    def __init__(self, size: int, head: bytes = b"", content_type: str = "text/plain"):
        self.size, self.head, self.content_type = size, head, content_type
        self.sent = 0
        self.done = asyncio.Event()

    async def answer(self, request: web.Request) -> web.StreamResponse:
        status = 500 if request.path == "/error" else 200
        response = web.StreamResponse(status=status, headers={"Content-Type": self.content_type})
        await response.prepare(request)
        try:
            if self.head:
                await response.write(self.head)
                self.sent += len(self.head)
            chunk = b"x" * MiB
            while self.sent < self.size:
                await response.write(chunk)
                self.sent += len(chunk)
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the check stopped reading and hung up
        finally:
            self.done.set()
        return response


@pytest.fixture
def package(tmp_path: Path) -> Path:
    path = tmp_path / "package.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("out.bin", b"x" * 1000 + b"y" * 24)
        archive.writestr("big.bin", b"x" * (3 * MiB))
    return path


async def ask(aiohttp_server, model: Model, expected: str | None, package: Path, path="/infer"):
    app = web.Application()
    app.router.add_get("/infer", model.answer)
    app.router.add_get("/error", model.answer)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session, session.get(server.make_url(path)) as response:
        verdict = await judge(response, expected, package)
    if model.size > 0:
        await asyncio.wait_for(model.done.wait(), 30)
    return verdict


@pytest.mark.parametrize(
    ("expected", "content_type", "words"),
    [
        ("hello", "text/plain", "expected 'hello', got 'xxxx"),
        ('{"a": 1}', "application/json", "expected '{\"a\": 1}', got 'xxxx"),
        ("@out.bin", "application/octet-stream", "got an answer of more than 1024 bytes"),
        ("@big.bin", "application/octet-stream", "got an answer of more than 3145728 bytes"),
    ],
)
async def test_a_huge_answer_is_not_read_past_what_could_match(
    aiohttp_server, package, expected, content_type, words
):
    model = Model(HUGE, content_type=content_type)
    verdict = await ask(aiohttp_server, model, expected, package)
    assert verdict.status == 200 and words in verdict.mismatch
    assert model.sent < IN_FLIGHT, f"the model sent {model.sent:,} bytes before the check stopped"


async def test_an_answer_nothing_is_expected_of_is_not_read(aiohttp_server, package):
    model = Model(HUGE)
    verdict = await ask(aiohttp_server, model, None, package)
    assert verdict.status == 200 and verdict.mismatch is None
    assert model.sent < IN_FLIGHT


async def test_an_error_answer_is_read_for_its_message_only(aiohttp_server, package):
    model = Model(HUGE)
    verdict = await ask(aiohttp_server, model, "hello", package, path="/error")
    assert verdict.status == 500 and len(verdict.error) <= 64 * 1024
    assert model.sent < IN_FLIGHT


async def test_a_file_answer_is_compared_as_it_streams(aiohttp_server, package):
    right = Model(0, head=b"x" * 1000 + b"y" * 24, content_type="image/png")
    assert (await ask(aiohttp_server, right, "@out.bin", package)).mismatch is None
    wrong = Model(0, head=b"x" * 1000 + b"z" * 24, content_type="image/png")
    verdict = await ask(aiohttp_server, wrong, "@out.bin", package)
    assert verdict.mismatch == "expected @out.bin, got an answer that differs from it at byte 1,000"
    short = Model(0, head=b"x" * 10, content_type="image/png")
    verdict = await ask(aiohttp_server, short, "@out.bin", package)
    assert verdict.mismatch == "expected @out.bin (1024 bytes), got 10 bytes of image/png"


async def test_text_and_json_still_match_as_before(aiohttp_server, package):
    text = Model(0, head=b"  hello\n")
    assert (await ask(aiohttp_server, text, "hello", package)).mismatch is None
    data = Model(0, head=b'{"a":[1,2]}', content_type="application/json")
    assert (await ask(aiohttp_server, data, '{"a": [1, 2]}', package)).mismatch is None
