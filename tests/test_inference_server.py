"""The in-image inference server, in process (aiohttp's test client) with real models."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import os
import pathlib
import sys
import tempfile
import threading
import time

import aiohttp
import pytest

import cog
from cog.runtime import InferenceServer
from cog.runtime.inputs import RequestInputs, _store
from cog.runtime.supervisor import State

WAIT = 10.0  # seconds a condition may take before the test gives up (a bound, not a timing)


async def eventually(condition, what="condition"):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not condition():
        if loop.time() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        await asyncio.sleep(0.005)


def form(**fields):
    """A multipart/form-data body: str values are fields, (filename, bytes) tuples files."""
    writer = aiohttp.MultipartWriter("form-data")
    for name, value in fields.items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, tuple):
                filename, content = item
                part = writer.append(
                    io.BytesIO(content), {"Content-Type": "application/octet-stream"}
                )
                part.set_content_disposition(
                    "form-data", quote_fields=False, name=name, filename=filename
                )
            else:
                part = writer.append(item)
                part.set_content_disposition("form-data", name=name)
    return writer


async def started_client(aiohttp_client, model, **settings):
    server = InferenceServer(model, **settings)
    client = await aiohttp_client(server.app)
    await server.runner.wait_started()
    return server, client


@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    """Per-request temp dirs go here, so a test can see that none are left behind."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    monkeypatch.setenv("TMPDIR", str(root))  # the model's worker process too
    return root


def marker_dir(monkeypatch, tmp_path):
    """A folder the test and the model's worker process signal each other through (files
    appear when things happen), named to the worker by $COG_TEST_MARKERS."""
    folder = tmp_path / "markers"
    folder.mkdir()
    monkeypatch.setenv("COG_TEST_MARKERS", str(folder))
    return folder


def wait_for_file(path, timeout=WAIT):
    """In the model: wait until the test creates ``path`` (a bounded poll of the disk)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)


# --- Models -----------------------------------------------------------------------------


class Echo(cog.Model):
    """Echo the inputs as JSON."""

    @cog.input("text", type=str, help="Some text")
    @cog.input("count", type=int, default=1, min=0, max=10)
    @cog.input("ratio", type=float, default=0.5, min=0.0, max=1.0)
    @cog.input("flag", type=bool, default=False)
    @cog.input("mode", type=str, default="a", options=["a", "b"])
    def run(self, text, count, ratio, flag, mode):
        return {"text": text, "count": count, "ratio": ratio, "flag": flag, "mode": mode}


class Files(cog.Model):
    @cog.input("image", type=cog.Path)
    @cog.input("mask", type=cog.Path)
    def run(self, image, mask):
        return {
            "types": [type(image).__name__, type(mask).__name__],
            "names": [image.name, mask.name],
            "sizes": [image.stat().st_size, mask.stat().st_size],
            "dirs": sorted({str(image.parent), str(mask.parent)}),
            "first_bytes": image.read_bytes()[:5].decode("latin-1"),
        }


OUTPUT_CASES = {
    "str": ("héllo", "text/plain", b"h\xc3\xa9llo"),
    "bytes": (b"\x00\x01\xff", "application/octet-stream", b"\x00\x01\xff"),
    "int": (7, "application/json", b"7"),
    "float": (2.5, "application/json", b"2.5"),
    "bool": (True, "application/json", b"true"),
    "none": (None, "application/json", b"null"),
    "list": ([1, "a", [2]], "application/json", b'[1, "a", [2]]'),
    "tuple": ((1, 2), "application/json", b"[1, 2]"),
    "dict": ({"a": {"b": 1}}, "application/json", b'{"a": {"b": 1}}'),
}


class Outputs(cog.Model):
    @cog.input("kind", type=str)
    @cog.input("seed", type=cog.Path, default=None)
    def run(self, kind, seed):
        if kind == "file":
            out = seed.with_name("result.png")
            out.write_bytes(b"\x89PNG fake " * 50_000)
            return out
        if kind == "pathlib":
            out = pathlib.Path(seed.parent, "notes.txt")
            out.write_text("plain pathlib path")
            return out
        if kind == "missing":
            return cog.Path("/nonexistent/file.png")
        if kind == "set-of-objects":
            return {object()}
        return OUTPUT_CASES[kind][0]


# --- Routes -----------------------------------------------------------------------------


async def test_ping_help_openapi(aiohttp_client):
    _, client = await started_client(aiohttp_client, Echo)
    response = await client.get("/ping")
    assert response.status == 200
    assert await response.json() == {"status": "ready"}
    response = await client.get("/help")
    assert response.status == 200
    help_ = await response.json()
    assert list(help_["arguments"]) == ["text", "count", "ratio", "flag", "mode"]
    assert help_["arguments"]["count"] == {"type": "int", "default": 1, "min": 0, "max": 10}
    document = await (await client.get("/openapi.json")).json()
    assert document["info"] == {
        "title": "Echo",
        "version": "1",
        "description": "Echo the inputs as JSON.",
    }
    assert document["components"]["schemas"]["Input"]["required"] == ["text"]


async def test_infer_converts_every_type(aiohttp_client):
    _, client = await started_client(aiohttp_client, Echo)
    response = await client.post(
        "/infer", data=form(text="hi", count="3", ratio="0.25", flag="true", mode="b")
    )
    assert response.status == 200, await response.text()
    assert await response.json() == {
        "text": "hi",
        "count": 3,
        "ratio": 0.25,
        "flag": True,
        "mode": "b",
    }
    assert float(response.headers["X-Setup-Time"]) >= 0
    assert float(response.headers["X-Run-Time"]) >= 0
    assert response.headers["X-Request-ID"]


async def test_defaults_fill_missing_optional_inputs(aiohttp_client):
    _, client = await started_client(aiohttp_client, Echo)
    response = await client.post("/infer", data=form(text=""))
    assert await response.json() == {
        "text": "",
        "count": 1,
        "ratio": 0.5,
        "flag": False,
        "mode": "a",
    }


async def test_urlencoded_form_works_for_text_inputs(aiohttp_client):
    _, client = await started_client(aiohttp_client, Echo)
    response = await client.post("/infer", data={"text": "x", "count": "2"})
    assert response.status == 200
    assert (await response.json())["count"] == 2


async def test_request_id_is_taken_from_the_client(aiohttp_client):
    _, client = await started_client(aiohttp_client, Echo)
    response = await client.post("/infer", data=form(text="x"), headers={"X-Request-ID": "job-42"})
    assert response.headers["X-Request-ID"] == "job-42"
    response = await client.post("/infer", data=form(text="x"), headers={"X-Request-ID": "a b;c"})
    assert response.headers["X-Request-ID"] != "a b;c"


@pytest.mark.parametrize("kind", list(OUTPUT_CASES))
async def test_output_types(aiohttp_client, kind):
    _, client = await started_client(aiohttp_client, Outputs)
    response = await client.post("/infer", data=form(kind=kind))
    assert response.status == 200, await response.text()
    _, content_type, body = OUTPUT_CASES[kind]
    assert response.content_type == content_type
    assert await response.read() == body
    assert "X-Setup-Time" in response.headers
    assert "X-Run-Time" in response.headers


async def test_file_output_is_streamed_with_its_type(aiohttp_client, temp_root):
    _, client = await started_client(aiohttp_client, Outputs)
    response = await client.post("/infer", data=form(kind="file", seed=("seed.bin", b"s")))
    assert response.status == 200
    assert response.content_type == "image/png"
    assert response.headers["Content-Disposition"] == 'inline; filename="result.png"'
    body = await response.read()
    assert body == b"\x89PNG fake " * 50_000
    assert int(response.headers["Content-Length"]) == len(body)
    assert list(temp_root.iterdir()) == []  # written next to the input, removed with it

    response = await client.post("/infer", data=form(kind="pathlib", seed=("s", b"s")))
    assert response.content_type == "text/plain"
    assert await response.text() == "plain pathlib path"


class Writes(cog.Model):
    """Writes its output in the request's directory (or elsewhere, with mkstemp)."""

    @cog.input("size", type=int, default=10)
    @cog.input("where", type=str, default="request", options=["request", "mkstemp"])
    @cog.input("image", type=cog.Path, default=None)
    def run(self, size, where, image):
        directory = cog.request_directory()
        assert directory == cog.request_directory()  # one directory for the inference
        if where == "mkstemp":
            fd, name = tempfile.mkstemp(suffix=".bin")
            os.close(fd)
            out = cog.Path(name)
        else:
            out = directory / "out.bin"
        # The inputs are in the same directory.
        prefix = b"-" if image is None else str(image.relative_to(directory)).encode()
        out.write_bytes(written(size, prefix))
        return out


def written(size, prefix=b"-"):
    return prefix + bytes(range(256)) * (size // 256) + b"x" * (size % 256)


async def test_request_directory_holds_outputs_and_inputs_and_is_removed(aiohttp_client, temp_root):
    _, client = await started_client(aiohttp_client, Writes)
    size = 5 * 1024 * 1024 + 3  # several chunks, the last one short
    response = await client.post("/infer", data=form(size=str(size)))
    assert response.status == 200
    assert int(response.headers["Content-Length"]) == size + 1
    assert await response.read() == written(size)
    assert list(temp_root.iterdir()) == []

    response = await client.post("/infer", data=form(image=("in.png", b"i")))
    assert await response.read() == written(10, b"inputs/image/in.png")
    assert list(temp_root.iterdir()) == []

    # Outside the server, each call is a new directory (nobody removes it).
    first, second = cog.request_directory(), cog.request_directory()
    assert first != second
    assert first.is_dir() and first.parent == temp_root
    first.rmdir()
    second.rmdir()


async def test_a_file_from_elsewhere_is_sent_and_left_alone(aiohttp_client, temp_root):
    _, client = await started_client(aiohttp_client, Writes)
    response = await client.post("/infer", data=form(where="mkstemp"))
    assert await response.read() == written(10)
    (left,) = temp_root.iterdir()  # documented: the server removes only its own directory
    assert left.read_bytes() == written(10)


def files_open_under(root) -> list[str]:
    """Files under root that this process holds open (deleted ones too)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(root)):
            found.append(target)
    return found


async def test_a_client_leaving_mid_download_cleans_up(aiohttp_client, temp_root):
    """The request's directory goes, and the open output file is closed (a file left to
    the garbage collector fails the test as an unraisable ResourceWarning). Several
    rounds: the handler can be cancelled after a failed write has already begun its
    cleanup, which happened in about half the rounds when that cleanup awaited."""
    _, client = await started_client(aiohttp_client, Writes)
    for _ in range(8):
        response = await client.post("/infer", data=form(size=str(32 * 1024 * 1024)))
        assert response.status == 200
        assert len(await response.content.readexactly(1000)) == 1000
        response.close()  # drops the connection with most of the file unsent
        await eventually(lambda: not list(temp_root.iterdir()), "the request directory to go")
    # The reads in flight end and close their files (unlinked with their directory).
    await eventually(lambda: not files_open_under(temp_root), "every output file closed")
    gc.collect()
    response = await client.post("/infer", data=form(size="3"))
    assert await response.read() == written(3)


@pytest.mark.parametrize("cancels", [1, 2])
async def test_a_request_cancelled_while_its_upload_is_written_leaves_nothing(
    temp_root, monkeypatch, cancels
):
    """The client leaves (the handler is cancelled) while a worker thread is still at the
    upload's first batch: the thread is waited for, its file closed, and the request's
    directory removed, not made again by the thread after the cleanup. With two cancels
    the second comes while that wait is on (aiohttp cancels the handler once the
    connection is lost, and a failed read can have begun the cleanup before): the
    thread's end does the same then.

    Two stand-ins, as no real part can be made to do this on cue: a slow disk (a sleep in
    the thread that creates the file) and a multipart part that has sent two batches and
    then stalls (aiohttp's own server delivers the cancellation only when it next reads)."""
    creating = threading.Event()
    opened: list = []
    real_create = RequestInputs._create

    def slow_create(self, folder, name):
        creating.set()
        time.sleep(0.5)
        f = real_create(self, folder, name)
        opened.append(f)
        return f

    monkeypatch.setattr(RequestInputs, "_create", slow_create)

    class StalledPart:
        def __init__(self):
            self.chunks = [b"x" * (1 << 20), b"y" * (1 << 20)]

        async def read_chunk(self, size):
            if self.chunks:
                return self.chunks.pop(0)
            await asyncio.Event().wait()  # the rest never comes

    inputs = RequestInputs()
    storing = asyncio.ensure_future(_store(StalledPart(), inputs, ("inputs/image", "big.bin")))
    await eventually(creating.is_set, "the first batch to reach the disk")
    for _ in range(cancels):
        storing.cancel()
        await asyncio.sleep(0)  # one turn: the task takes it, and waits for the thread
    assert not opened  # the thread is still at its slow create
    with pytest.raises(asyncio.CancelledError):
        await storing
    inputs.cleanup()  # what read_inputs does next
    # The thread finishes its batch after the cleanup: it closes its file and removes
    # what it made.
    await eventually(lambda: opened and all(f.closed for f in opened), "the thread's file closed")
    await eventually(lambda: not list(temp_root.iterdir()), "the request directory gone")


@pytest.mark.parametrize(
    ("kind", "message"),
    [("missing", "cannot be read"), ("set-of-objects", "is not JSON")],
)
async def test_unsendable_outputs_are_500(aiohttp_client, kind, message):
    _, client = await started_client(aiohttp_client, Outputs)
    response = await client.post("/infer", data=form(kind=kind))
    assert response.status == 500
    assert message in (await response.json())["error"]


async def test_files_go_to_a_per_request_directory_and_are_removed(aiohttp_client, temp_root):
    _, client = await started_client(aiohttp_client, Files)
    big = os.urandom(3 * 1024 * 1024 + 17)
    first = await client.post(
        "/infer", data=form(image=("photo.jpg", big), mask=("../../etc/mask.png", b"m"))
    )
    assert first.status == 200, await first.text()
    result = await first.json()
    assert result["types"] == ["Path", "Path"]
    assert result["names"] == ["photo.jpg", "mask.png"]  # original names, no directories
    assert result["sizes"] == [len(big), 1]
    assert result["first_bytes"] == big[:5].decode("latin-1")
    # A folder per input, in one directory per request.
    image_dir, mask_dir = (pathlib.Path(d) for d in result["dirs"])
    assert (image_dir.name, mask_dir.name) == ("image", "mask")
    (request_dir,) = {image_dir.parent.parent, mask_dir.parent.parent}
    assert request_dir.parent == temp_root
    assert not request_dir.exists()

    second = await client.post(
        "/infer", data=form(image=("same.png", b"1"), mask=("same.png", b"22"))
    )
    result2 = await second.json()
    assert result2["names"] == ["same.png", "same.png"]
    assert result2["sizes"] == [1, 2]
    assert len(result2["dirs"]) == 2
    assert list(temp_root.iterdir()) == []


class Three(cog.Model):
    @cog.input("a", type=cog.Path)
    @cog.input("b", type=cog.Path)
    @cog.input("c", type=cog.Path)
    def run(self, a, b, c):
        return [[p.name, p.read_text()] for p in (a, b, c)]


async def test_same_filenames_never_collide(aiohttp_client, temp_root):
    """The files keep their names whatever the others are called (a folder named like one
    input's fallback once made the next upload of that name a 500)."""

    _, client = await started_client(aiohttp_client, Three)
    for names in [("same.txt", "c.d", "same.txt"), ("x", "x", "x"), ("b", "a", "inputs")]:
        response = await client.post(
            "/infer", data=form(**{k: (n, k.encode()) for k, n in zip("abc", names)})
        )
        assert response.status == 200, await response.text()
        assert await response.json() == [[n, k] for k, n in zip("abc", names)]
    assert list(temp_root.iterdir()) == []


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("é" * 300 + ".png", "é" * 98 + ".png"),
        ("x." + "é" * 300, "x." + "é" * 99),
        ("..", "image"),
        ("dir\\sub\\name.txt", "name.txt"),
    ],
)
async def test_unusable_filenames_are_made_safe(aiohttp_client, temp_root, sent, stored):
    _, client = await started_client(aiohttp_client, Files)
    response = await client.post("/infer", data=form(image=(sent, b"1"), mask=("mask.png", b"2")))
    assert response.status == 200, await response.text()
    assert (await response.json())["names"][0] == stored


class Kwargs(cog.Model):
    @cog.input("../up/../and away", type=cog.Path)
    def run(self, **inputs):
        (path,) = inputs.values()
        return str(path)


async def test_an_input_name_that_is_no_file_name_is_not_used_as_one(aiohttp_client, temp_root):
    _, client = await started_client(aiohttp_client, Kwargs)
    response = await client.post("/infer", data=form(**{"../up/../and away": ("..", b"1")}))
    assert response.status == 200, await response.text()
    path = pathlib.Path(await response.text())
    assert path.parent.parent.parent.parent == temp_root
    assert path.parts[-3:] == ("inputs", "input-1", "file")


class Strict(cog.Model):
    @cog.input("text", type=str)
    @cog.input("count", type=int, max=5)
    @cog.input("ratio", type=float, min=0.0)
    @cog.input("mode", type=str, options=["a", "b"])
    @cog.input("flag", type=bool)
    @cog.input("image", type=cog.Path)
    @cog.input("mask", type=cog.Path)
    def run(self, text, count, ratio, mode, flag, image, mask):
        raise AssertionError("never called")


async def test_400_lists_every_problem(aiohttp_client, temp_root):
    _, client = await started_client(aiohttp_client, Strict)
    response = await client.post(
        "/infer",
        data=form(
            count=["9", "1"],
            ratio="-0.5",
            mode="c",
            flag="maybe",
            mask="not-a-file",
            image=("upload.png", b"partial upload is removed"),
            bogus="1",
        ),
    )
    assert response.status == 400
    body = await response.json()
    problems = {(p["input"], p["message"]) for p in body["problems"]}
    assert problems == {
        ("count", "9 is above the maximum 5"),
        ("count", "given more than once"),
        ("ratio", "-0.5 is below the minimum 0.0"),
        ("mode", "'c' is not one of 'a', 'b'"),
        ("flag", "'maybe' is not a boolean (use true, false, 1 or 0)"),
        ("mask", "must be a file upload"),
        ("bogus", "unknown input"),
        ("text", "required input missing"),
    }
    assert "count: 9 is above the maximum 5" in body["error"]
    assert list(temp_root.iterdir()) == []

    response = await client.post(
        "/infer", data=form(text="t", count="1", ratio="1", mode="a", flag="1")
    )
    problems = {(p["input"], p["message"]) for p in (await response.json())["problems"]}
    assert problems == {("image", "required file missing"), ("mask", "required file missing")}


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"no boundary"),
        ("multipart/form-data; boundary=xyz", b"no starting boundary"),
        (
            "multipart/form-data; boundary=xyz",
            b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
            b"truncated in the middle of the file",
        ),
    ],
)
async def test_a_malformed_form_is_400_and_leaves_nothing(
    aiohttp_client, temp_root, content_type, body
):
    _, client = await started_client(aiohttp_client, Files)
    response = await client.post("/infer", data=body, headers={"Content-Type": content_type})
    assert response.status == 400
    assert (await response.json())["error"].startswith("malformed multipart body: ")
    assert list(temp_root.iterdir()) == []


async def test_a_field_without_a_name_is_a_problem(aiohttp_client):
    _, client = await started_client(aiohttp_client, Echo)
    body = (
        b'--xyz\r\nContent-Disposition: form-data; name="text"\r\n\r\nhi\r\n'
        b"--xyz\r\nContent-Disposition: form-data\r\n\r\nanonymous\r\n--xyz--\r\n"
    )
    headers = {"Content-Type": "multipart/form-data; boundary=xyz"}
    response = await client.post("/infer", data=body, headers=headers)
    assert response.status == 400
    assert (await response.json())["error"] == "invalid input: a form field without a name"


async def test_a_body_that_is_not_a_form_is_415(aiohttp_client):
    _, client = await started_client(aiohttp_client, Echo)
    response = await client.post("/infer", json={"text": "x"})
    assert response.status == 415
    assert "multipart/form-data" in (await response.json())["error"]


HUGE = "9" * 5000  # more digits than Python's int() converts (sys.int_info)


async def test_a_huge_integer_is_an_input_problem_listed_with_the_others(aiohttp_client):
    _, client = await started_client(aiohttp_client, Echo)
    expected = {
        ("count", "is an integer of 5000 digits; at most 4300 are accepted"),
        ("ratio", "'abc' is not a number"),
    }
    response = await client.post("/infer", data=form(text="t", count=HUGE, ratio="abc"))
    assert response.status == 400
    problems = {(p["input"], p["message"]) for p in (await response.json())["problems"]}
    assert problems == expected
    response = await client.post("/infer", data={"text": "t", "count": HUGE, "ratio": "abc"})
    assert response.status == 400
    problems = {(p["input"], p["message"]) for p in (await response.json())["problems"]}
    assert problems == expected


async def test_numbers_are_spelled_alike_in_int_and_float(aiohttp_client):
    _, client = await started_client(aiohttp_client, Echo)
    response = await client.post("/infer", data=form(text="t", count="1_0", ratio="0_5"))
    problems = {(p["input"], p["message"]) for p in (await response.json())["problems"]}
    assert problems == {("count", "'1_0' is not an integer"), ("ratio", "'0_5' is not a number")}
    # Arabic-Indic digit three: int() and float() would take it; the server does not.
    response = await client.post("/infer", data={"text": "t", "count": "\u0663", "ratio": "\u0663"})
    problems = {(p["input"], p["message"]) for p in (await response.json())["problems"]}
    assert problems == {
        ("count", "'\u0663' is not an integer"),
        ("ratio", "'\u0663' is not a number"),
    }


async def test_text_that_is_not_utf8_is_refused_in_both_forms(aiohttp_client):
    _, client = await started_client(aiohttp_client, Echo)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    response = await client.post("/infer", data=b"text=%ff%fe&mode=c", headers=headers)
    assert response.status == 400
    problems = {(p["input"], p["message"]) for p in (await response.json())["problems"]}
    assert problems == {("text", "is not utf-8 text"), ("mode", "'c' is not one of 'a', 'b'")}

    body = (
        b'--xyz\r\nContent-Disposition: form-data; name="text"\r\n\r\n\xff\xfe\r\n'
        b'--xyz\r\nContent-Disposition: form-data; name="mode"\r\n\r\nc\r\n--xyz--\r\n'
    )
    headers = {"Content-Type": "multipart/form-data; boundary=xyz"}
    response = await client.post("/infer", data=body, headers=headers)
    assert response.status == 400
    problems = {(p["input"], p["message"]) for p in (await response.json())["problems"]}
    assert problems == {("text", "is not utf-8 text"), ("mode", "'c' is not one of 'a', 'b'")}

    # Percent-escapes, '+' and raw UTF-8 all decode as a browser means them.
    body = "text=caf%C3%A9+au+lait+\u00e9&mode=b".encode()
    response = await client.post(
        "/infer", data=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status == 200, await response.text()
    assert (await response.json())["text"] == "caf\u00e9 au lait \u00e9"


async def test_a_flood_of_bad_fields_gets_a_short_answer(aiohttp_client):
    from cog.runtime.inputs import MAX_PROBLEMS

    _, client = await started_client(aiohttp_client, Echo)
    fields = ["text=t", *(["count=1"] * 1000), "x" * 100_000 + "=1"]
    fields += [f"bogus{n}=1" for n in range(500)]
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    response = await client.post("/infer", data="&".join(fields).encode(), headers=headers)
    assert response.status == 400
    problems = [(p["input"], p["message"]) for p in (await response.json())["problems"]]
    assert len(problems) == MAX_PROBLEMS + 1
    assert problems[:2] == [  # each problem once, a long name shortened
        ("count", "given more than once"),
        ("x" * 100 + "...", "unknown input"),
    ]
    assert problems[-1] == ("", f"and {500 - MAX_PROBLEMS + 2} more problems")
    assert len(await response.read()) < 10_000


async def test_a_urlencoded_form_that_is_too_large_is_413_json(aiohttp_client):
    from cog.runtime.inputs import MAX_URLENCODED_BYTES

    _, client = await started_client(aiohttp_client, Echo)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    body = io.BytesIO(b"text=" + b"a" * MAX_URLENCODED_BYTES)
    response = await client.post("/infer", data=body, headers=headers)
    assert response.status == 413
    assert "multipart/form-data" in (await response.json())["error"]

    async def chunked():  # no Content-Length: the limit holds while reading too
        for _ in range(5):
            yield b"a" * (MAX_URLENCODED_BYTES // 4)

    response = await client.post("/infer", data=chunked(), headers=headers)
    assert response.status == 413
    assert "at most" in (await response.json())["error"]


async def test_every_error_answer_is_json(aiohttp_client, caplog):
    server = InferenceServer(Echo)

    # The one fault no route of the server can be made to produce on purpose: a handler
    # failing unexpectedly. A test-only route raises, to check how the answer looks.
    async def broken(request):
        raise KeyError("no such thing")

    server.app.router.add_get("/broken", broken)
    client = await aiohttp_client(server.app)
    await server.runner.wait_started()

    response = await client.get("/nowhere")
    assert response.status == 404
    assert response.content_type == "application/json"
    assert (await response.json())["error"].startswith("not found: /nowhere")

    response = await client.put("/infer")
    assert response.status == 405
    assert response.headers["Allow"] == "POST"
    assert await response.json() == {"error": "PUT is not allowed for /infer; use POST"}

    response = await client.get("/broken")
    assert response.status == 500
    assert await response.json() == {"error": "internal error: KeyError: 'no such thing'"}
    assert any(r.exc_info for r in caplog.records if "GET /broken failed" in r.getMessage())
    assert (await client.get("/ping")).status == 200


class Flaky(cog.Model):
    @cog.input("fail", type=bool)
    def run(self, fail):
        if fail:
            raise RuntimeError("kaboom")
        return "fine"


async def test_run_exception_is_500_and_the_server_keeps_serving(aiohttp_client, caplog):
    caplog.set_level(logging.INFO, logger="cog.model")
    _, client = await started_client(aiohttp_client, Flaky)
    response = await client.post("/infer", data=form(fail="true"), headers={"X-Request-ID": "r1"})
    assert response.status == 500
    body = await response.json()
    assert body == {"error": "RuntimeError: kaboom"}  # no traceback in the answer
    assert "X-Run-Time" in response.headers
    # The traceback is in the log, from the model's process, tagged with the request.
    logged = [r.getMessage() for r in caplog.records if r.name == "cog.model"]
    assert "[r1] stderr: Traceback (most recent call last):" in logged
    assert "[r1] stderr: RuntimeError: kaboom" in logged
    response = await client.post("/infer", data=form(fail="false"))
    assert response.status == 200
    assert await response.text() == "fine"


class Exits(cog.Model):
    def run(self):
        sys.exit(3)


async def test_sys_exit_in_run_is_a_500_too(aiohttp_client):
    _, client = await started_client(aiohttp_client, Exits)
    response = await client.post("/infer")
    assert response.status == 500
    assert (await client.post("/infer")).status == 500
    assert (await client.get("/ping")).status == 200


# --- Setup: /ping while it runs and after it fails --------------------------------------


class SlowSetup(cog.Model):
    def setup(self):
        wait_for_file(os.path.join(os.environ["COG_TEST_MARKERS"], "release"))
        self.value = "set up"

    def run(self):
        return self.value


async def test_ping_while_setup_runs_then_ready(aiohttp_client, monkeypatch, tmp_path):
    markers = marker_dir(monkeypatch, tmp_path)
    server = InferenceServer(SlowSetup)
    client = await aiohttp_client(server.app)
    response = await client.get("/ping")
    assert response.status == 503
    assert await response.json() == {"status": "starting"}
    response = await client.post("/infer")
    assert response.status == 503
    assert (await response.json())["status"] == "starting"
    assert (await client.get("/help")).status == 503
    (markers / "release").touch()
    await server.runner.wait_started()
    assert (await client.get("/ping")).status == 200
    response = await client.post("/infer")
    assert await response.text() == "set up"


class Broken(cog.Model):
    def setup(self):
        raise FileNotFoundError("weights.bin is missing")

    def run(self):
        return "never"


async def test_setup_failure_is_reported_by_ping(aiohttp_client, caplog):
    caplog.set_level(logging.INFO, logger="cog.model")
    _, client = await started_client(aiohttp_client, Broken)
    response = await client.get("/ping")
    assert response.status == 503
    assert await response.json() == {
        "status": "failed",
        "error": "FileNotFoundError: weights.bin is missing",
    }
    response = await client.post("/infer")
    assert response.status == 503
    assert "weights.bin is missing" in (await response.json())["error"]
    logged = [r.getMessage() for r in caplog.records if r.name == "cog.model"]
    assert "[setup] stderr: Traceback (most recent call last):" in logged
    assert "[setup] stderr: FileNotFoundError: weights.bin is missing" in logged


async def test_load_failure_is_reported_by_ping(aiohttp_client, tmp_path, monkeypatch):
    (tmp_path / "cog.yaml").write_text("model: infer.py:Model\n")
    (tmp_path / "infer.py").write_text(
        "import cog\n\nclass Model(cog.Model):\n"
        "    @cog.input('size', type=int, default='big')\n"
        "    def run(self, size):\n        pass\n"
    )
    server = InferenceServer.from_directory(str(tmp_path))
    client = await aiohttp_client(server.app)
    await server.runner.wait_started()
    status = await (await client.get("/ping")).json()
    assert status["status"] == "failed"
    assert "infer.py:4: Model.run: input 'size': default 'big' is not an integer" in status["error"]

    server = InferenceServer.from_directory(str(tmp_path / "nowhere"))
    client = await aiohttp_client(server.app)
    await server.runner.wait_started()
    status = await (await client.get("/ping")).json()
    assert status == {"status": "failed", "error": f"{tmp_path / 'nowhere' / 'cog.yaml'} not found"}


# --- Concurrency: off the loop, one at a time, a bounded queue ---------------------------


class Gate(cog.Model):
    """Each run marks that it started, waits for the test's release, and counts how many
    ran at once (files in $COG_TEST_MARKERS: the model runs in another process)."""

    @cog.input("n", type=int)
    def run(self, n):
        folder = os.environ["COG_TEST_MARKERS"]
        mine = os.path.join(folder, f"running-{n}")
        open(mine, "w").close()
        running = len([f for f in os.listdir(folder) if f.startswith("running-")])
        with open(os.path.join(folder, f"saw-{n}-{running}"), "w"):
            pass
        wait_for_file(os.path.join(folder, "release"))
        os.remove(mine)
        return n


class GateMarkers:
    def __init__(self, folder):
        self.folder = folder

    def started(self, n=None):
        names = os.listdir(self.folder)
        return any(f.startswith("saw-" if n is None else f"saw-{n}-") for f in names)

    @property
    def running(self):
        return len([f for f in os.listdir(self.folder) if f.startswith("running-")])

    @property
    def most(self):
        seen = [int(f.rsplit("-", 1)[1]) for f in os.listdir(self.folder) if f.startswith("saw-")]
        return max(seen, default=0)

    def release(self):
        (self.folder / "release").touch()


@pytest.fixture
def gate(monkeypatch, tmp_path):
    markers = GateMarkers(marker_dir(monkeypatch, tmp_path))
    yield markers
    markers.release()


async def test_one_inference_at_a_time_then_queue_then_503(aiohttp_client, gate):
    server, client = await started_client(aiohttp_client, Gate, concurrency=1, max_queue=1)
    first = asyncio.ensure_future(client.post("/infer", data=form(n="1")))
    await eventually(gate.started, "the first run to start")
    second = asyncio.ensure_future(client.post("/infer", data=form(n="2")))
    await eventually(lambda: server.runner.admitted == 2, "the second request to queue")

    # The loop is free while run() blocks the model's process.
    ping = await client.get("/ping")
    assert ping.status == 200

    refused = await client.post("/infer", data=form(n="3"))
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "1"
    assert "busy" in (await refused.json())["error"]

    gate.release()
    responses = await asyncio.gather(first, second)
    assert [r.status for r in responses] == [200, 200]
    assert [await r.json() for r in responses] == [1, 2]
    assert gate.most == 1


async def test_concurrency_setting_allows_parallel_runs(aiohttp_client, gate):
    _, client = await started_client(aiohttp_client, Gate, concurrency=2, max_queue=0)
    requests = [asyncio.ensure_future(client.post("/infer", data=form(n=str(i)))) for i in (1, 2)]
    await eventually(lambda: gate.running == 2, "two runs at once")
    refused = await client.post("/infer", data=form(n="3"))
    assert refused.status == 503
    gate.release()
    assert [r.status for r in await asyncio.gather(*requests)] == [200, 200]
    assert gate.most == 2


async def test_drain_finishes_running_and_refuses_queued_and_new(aiohttp_client, gate):
    server, client = await started_client(aiohttp_client, Gate, concurrency=1, max_queue=4)
    running = asyncio.ensure_future(client.post("/infer", data=form(n="1")))
    await eventually(gate.started, "the first run to start")
    queued = asyncio.ensure_future(client.post("/infer", data=form(n="2")))
    await eventually(lambda: server.runner.admitted == 2, "the second request to queue")

    assert server.runner.stop() == (1, 1)  # one running, one queued and refused
    drained = asyncio.ensure_future(server.runner.drain())
    # The queued request is answered at once, while the running one goes on.
    refused = await asyncio.wait_for(queued, WAIT)
    assert refused.status == 503
    assert (await refused.json())["error"] == "the server is shutting down"
    assert (await client.get("/ping")).status == 503
    new = await client.post("/infer", data=form(n="3"))
    assert new.status == 503
    assert (await new.json())["error"] == "the server is shutting down"
    assert not drained.done()
    assert not running.done()

    gate.release()
    await asyncio.wait_for(drained, WAIT)
    response = await running
    assert response.status == 200
    assert await response.json() == 1
    assert gate.most == 1  # the refused job never ran


async def test_cancelled_just_after_the_run_finished_still_cleans_up(gate, tmp_path):
    """The request is cancelled in the instant between the worker's answer and the request
    resuming. No real client can hit that instant on purpose, so _settle is wrapped to
    cancel the request right after it ran (a fake for the timing only)."""
    from cog.runtime.supervisor import ModelWorker

    runner = ModelWorker(
        f"{Gate.__module__}:{Gate.__qualname__}",
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )
    await runner.start()
    assert await runner.wait_started() is State.READY
    cleaned = []
    task = asyncio.ensure_future(runner.run({"n": 1}, "late", on_abandon=lambda: cleaned.append(1)))
    settle = runner._settle

    def settle_then_cancel(job, outcome):
        settle(job, outcome)
        task.cancel()

    runner._settle = settle_then_cancel
    gate.release()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)
    assert cleaned == [1]
    await runner.close()


# --- The model's stdout/stderr in the log, tagged with the request ----------------------


class Chatty(cog.Model):
    def setup(self):
        print("loading weights")

    @cog.input("word", type=str)
    def run(self, word):
        print(f"got {word}")
        print("to stderr", file=sys.stderr)
        sys.stdout.write("no newline at the end")
        return word


async def test_model_output_goes_to_the_log_tagged(aiohttp_client, caplog):
    caplog.set_level(logging.INFO, logger="cog.model")

    _, client = await started_client(aiohttp_client, Chatty)
    response = await client.post("/infer", data=form(word="hi"), headers={"X-Request-ID": "req-7"})
    assert response.status == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "cog.model"]
    assert "[setup] stdout: loading weights" in lines
    assert "[req-7] stdout: got hi" in lines
    assert "[req-7] stderr: to stderr" in lines
    assert "[req-7] stdout: no newline at the end" in lines
    records = [r for r in caplog.records if r.name == "cog.model" and "got hi" in r.getMessage()]
    assert records[0].request_id == "req-7"


async def test_help_serves_what_the_model_file_declares(aiohttp_client, tmp_path, monkeypatch):
    """/help of a model loaded from its file, against the declarations written in it (and
    the registry's reading of the same source, which never imports it)."""
    from cog.server.source import static_signature

    source = (
        "import cog\n\n"
        "class Model(cog.Model):\n"
        "    @cog.input('image', type=cog.Path, help='Input image')\n"
        "    @cog.input('scale', type=float, default=1.5, min=1.0, max=4.0)\n"
        "    @cog.input('mode', type=str, default='fast', options=['fast', 'best'])\n"
        "    @cog.input('steps', type=int, default=0)\n"
        "    @cog.input('seed', type=int, default=None)\n"
        "    def run(self, image, scale, mode, steps, seed):\n"
        "        pass\n"
    )
    (tmp_path / "cog.yaml").write_text("model: infer.py:Model\n")
    (tmp_path / "infer.py").write_text(source)
    server = InferenceServer.from_directory(str(tmp_path))
    client = await aiohttp_client(server.app)
    await server.runner.wait_started()
    response = await client.get("/help")
    assert response.status == 200
    document = json.loads(await response.read())
    assert document == {
        "arguments": {
            "image": {"type": "Path", "help": "Input image"},
            "scale": {"type": "float", "default": 1.5, "min": 1.0, "max": 4.0},
            "mode": {"type": "str", "default": "fast", "options": ["fast", "best"]},
            "steps": {"type": "int", "default": 0},
            "seed": {"type": "int", "default": None},
        }
    }
    assert list(document["arguments"]) == ["image", "scale", "mode", "steps", "seed"]
    assert document == static_signature(source, "Model", "infer.py").to_json()
