"""The registry API over real local storage, no builder (store-only mode).

The builder path is covered by tests/test_registry_build.py against a real Docker engine.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import random
import shutil
import stat
import sys
import zipfile
from pathlib import Path

import aiohttp
import attrs
import pytest
from structlog.testing import capture_logs

from cog.builders import Builder
from cog.events import NDJSON
from cog.server.app import ServerSettings, make_app
from cog.server.catalog import record_key
from cog.server.keys import STORAGE
from cog.server.records import encode_record
from cog.storage import CheckedStorage, load_storage
from tests.registry_helpers import (
    form,
    make_model_dir,
    nothing_spooled,
    package_bytes,
    raw_zip,
    spooled,
    stored_keys,
    upload_then_hang_up,
)

SEED_KEYS = {"ID", "Name", "Artifacts", "Config"}
ENV_KEYS = {
    "PythonVersion",
    "PythonRequirements",
    "PythonPackages",
    "SystemPackages",
    "Architectures",
    "CUDA",
    "CuDNN",
}


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def settings(tmp_path: Path, spool: Path) -> ServerSettings:
    return ServerSettings(
        storage_url=f"file://{tmp_path / 'store'}",
        builder=None,
        tmp_dir=spool,
        max_upload_bytes=2 * 1024 * 1024,
        cache_ttl=0.2,
    )


@pytest.fixture
async def client(aiohttp_client, settings):
    return await aiohttp_client(make_app(settings))


@pytest.fixture
def hello(tmp_path: Path) -> tuple[bytes, str]:
    return package_bytes(make_model_dir(tmp_path / "hello"))


async def upload(client, data: bytes, **kwargs):
    return await client.post("/v1/packages/upload", data=form(data), **kwargs)


async def test_upload_returns_the_seed_document(client, hello):
    data, package_id = hello
    response = await upload(client, data)
    assert response.status == 200, await response.text()
    doc = await response.json()
    assert doc.keys() >= SEED_KEYS
    assert doc["ID"] == package_id == hashlib.sha256(data).hexdigest()
    assert doc["Name"] == "test/hello"
    assert doc["Artifacts"] == []
    assert doc["Status"] == "ready"
    assert doc["Size"] == len(data)
    assert set(doc["Config"]["Environment"]) == ENV_KEYS
    assert doc["Config"]["Model"] == "infer.py:Model"
    assert doc["Config"]["Environment"]["PythonVersion"] == "3.11"
    assert doc["Signature"]["arguments"]["text"]["type"] == "str"
    assert doc["Created"].endswith("Z")


async def test_ndjson_stream_is_events_then_result(client, hello):
    data, package_id = hello
    response = await upload(client, data, headers={"Accept": NDJSON})
    assert response.status == 200
    assert response.content_type == NDJSON
    lines = (await response.read()).decode().splitlines()
    events = [json.loads(line) for line in lines]
    assert events[0]["type"] == "status"
    assert events[0]["message"].startswith(f"Received package {package_id[:12]} (")
    assert [e["type"] for e in events[:-1]] == ["status"] * (len(events) - 1)
    assert events[-1]["type"] == "package"
    assert events[-1]["package"]["ID"] == package_id


async def test_same_package_twice_is_stored_once(client, hello):
    data, package_id = hello
    first = await (await upload(client, data)).json()
    second_response = await upload(client, data, headers={"Accept": NDJSON})
    events = [json.loads(line) for line in (await second_response.read()).splitlines()]
    assert any("already stored" in e.get("message", "") for e in events)
    assert events[-1]["package"]["Created"] == first["Created"]
    keys = await stored_keys(client.app[STORAGE])
    assert keys == [f"packages/{package_id}.zip", record_key(package_id)]


async def test_show_by_id_and_prefix_and_list(client, tmp_path):
    ids = []
    for i in range(3):
        data, package_id = package_bytes(
            make_model_dir(tmp_path / f"m{i}", name=f"test/m{i}", extra=f"# {i}\n")
        )
        assert (await upload(client, data)).status == 200
        ids.append(package_id)
        await asyncio.sleep(1.01)  # Created has one-second resolution
    listing = await (await client.get("/v1/packages/")).json()
    assert [p["ID"] for p in listing] == ids[::-1]  # newest first
    for ref in (ids[1], ids[1][:7], ids[1][:20].upper()):
        response = await client.get(f"/v1/packages/{ref}")
        assert response.status == 200, ref
        assert (await response.json())["ID"] == ids[1]


async def test_download_is_the_exact_bytes_with_etag(client, hello):
    data, package_id = hello
    await upload(client, data)
    response = await client.get(f"/v1/packages/{package_id[:10]}.zip")
    assert response.status == 200
    assert await response.read() == data
    assert response.headers["Content-Length"] == str(len(data))
    assert response.headers["ETag"] == f'"{package_id}"'
    assert response.content_type == "application/zip"
    cached = await client.get(
        f"/v1/packages/{package_id}.zip", headers={"If-None-Match": f'"{package_id}"'}
    )
    assert cached.status == 304
    with zipfile.ZipFile(io.BytesIO(await response.read())) as zf:
        assert "cog.yaml" in zf.namelist()


async def test_delete_removes_everything(client, hello):
    data, package_id = hello
    await upload(client, data)
    response = await client.delete(f"/v1/packages/{package_id[:8]}")
    assert response.status == 200
    assert (await response.json()) == {"ID": package_id, "Deleted": True}
    assert (await client.get(f"/v1/packages/{package_id}")).status == 404
    assert (await client.get(f"/v1/packages/{package_id}.zip")).status == 404
    assert await stored_keys(client.app[STORAGE]) == []
    assert (await (await client.get("/v1/packages/")).json()) == []


async def test_unknown_short_and_ambiguous_references(client, hello):
    data, _package_id = hello
    doc = await (await upload(client, data)).json()
    # Two more records that share a 7-character prefix. Real uploads cannot be made to
    # collide on purpose (SHA-256), so the records are written straight into storage.
    storage = client.app[STORAGE]
    from cog.server.records import record_from_json

    twins = ["abcdef1" + c * 57 for c in "01"]
    for twin in twins:
        record = record_from_json({**doc, "ID": twin})
        await storage.write_bytes(record_key(twin), encode_record(record))

    response = await client.get("/v1/packages/abcdef1")
    assert response.status == 409
    body = await response.json()
    assert "ambiguous" in body["error"]
    assert body["matches"] == twins

    response = await client.get("/v1/packages/abcdef10")
    assert response.status == 200  # unique once one more character is given

    response = await client.get("/v1/packages/0000000")
    assert response.status == 404
    assert "no package" in (await response.json())["error"]

    response = await client.get("/v1/packages/abc")
    assert response.status == 400
    assert (await response.json())["error"] == (
        "package ID prefix 'abc' is too short: give at least 7 characters"
    )

    response = await client.get("/v1/packages/not-hex-at-all")
    assert response.status == 400


def _symlink_zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("cog.yaml", VALID_YAML)
        zf.writestr("infer.py", VALID_MODEL)
        link = zipfile.ZipInfo("evil")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    return out.getvalue()


def _bomb() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cog.yaml", "model: infer.py:Model\n")
        zf.writestr("infer.py", "class Model: pass\n")
        zf.writestr("zeros.bin", b"\0" * (64 * 1024 * 1024))
    return out.getvalue()


VALID_MODEL = "import cog\nclass Model(cog.Model):\n    def run(self):\n        return 1\n"
VALID_YAML = "model: infer.py:Model\n"
BAD_UPLOADS = {
    "not a zip": (b"this is not a zip file at all", 400, "zip"),
    "empty file": (b"", 400, "empty"),
    "no cog.yaml": (raw_zip({"infer.py": VALID_MODEL}), 400, "cog.yaml"),
    "cog.yaml in a subdirectory": (
        raw_zip({"sub/cog.yaml": "model: infer.py:Model\n", "sub/infer.py": VALID_MODEL}),
        400,
        "cog.yaml",
    ),
    "invalid yaml": (
        raw_zip({"cog.yaml": "model: [unclosed\n", "infer.py": VALID_MODEL}),
        400,
        "line",
    ),
    "invalid config": (
        raw_zip(
            {
                "cog.yaml": "model: missing.py:Nope\nbogus_key: 1\n"
                "environment:\n  python_packages: [numpy]\n  architectures: [tpu]\n",
                "infer.py": VALID_MODEL,
            }
        ),
        400,
        "bogus_key",
    ),
    # Otherwise valid packages (cog.yaml and its model are there), so only the bad member
    # can be what is refused.
    "absolute member": (
        raw_zip({"cog.yaml": VALID_YAML, "infer.py": VALID_MODEL, "/etc/evil": "x"}),
        400,
        "member '/etc/evil' is an absolute path",
    ),
    "dotdot member": (
        raw_zip({"cog.yaml": VALID_YAML, "infer.py": VALID_MODEL, "../evil": "x"}),
        400,
        "member '../evil' points outside the package",
    ),
    "dotdot inside a member path": (
        raw_zip({"cog.yaml": VALID_YAML, "infer.py": VALID_MODEL, "a/../../evil": "x"}),
        400,
        "points outside the package",
    ),
    "symlink member": (_symlink_zip(), 400, "evil is a symbolic link"),
}


async def test_the_bad_member_cases_are_valid_without_their_bad_member(client):
    """What BAD_UPLOADS' member cases are refused for is the member alone."""
    response = await upload(client, raw_zip({"cog.yaml": VALID_YAML, "infer.py": VALID_MODEL}))
    assert response.status == 200, await response.text()


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
@pytest.mark.parametrize("accept", ["application/json", NDJSON])
async def test_bad_uploads_are_refused_and_leave_nothing(client, spool, case, accept):
    data, status, words = BAD_UPLOADS[case]
    response = await upload(client, data, headers={"Accept": accept})
    assert response.status == status, await response.text()
    body = await response.json()
    assert words.lower() in body["error"].lower()
    assert "Traceback" not in body["error"]
    assert await stored_keys(client.app[STORAGE]) == []
    await nothing_spooled(spool)
    assert (await client.get("/ping")).status == 200  # still serving


async def test_invalid_config_lists_every_problem(client):
    data = BAD_UPLOADS["invalid config"][0]
    body = await (await upload(client, data)).json()
    problems = " ".join(body["problems"])
    for expected in ("bogus_key", "numpy", "tpu", "missing.py"):
        assert expected in problems, problems
    assert len(body["problems"]) >= 4


async def test_zip_bomb_is_refused(aiohttp_client, settings, spool):
    from cog.package import PackageLimits

    small = ServerSettings(
        storage_url=settings.storage_url,
        builder=None,
        tmp_dir=spool,
        package_limits=PackageLimits(max_uncompressed_bytes=16 * 1024 * 1024),
    )
    client = await aiohttp_client(make_app(small))
    response = await upload(client, _bomb())
    assert response.status == 400
    assert (
        "uncompressed" in (await response.json())["error"]
        or "ratio" in (await response.json())["error"]
    )
    assert await stored_keys(client.app[STORAGE]) == []
    await nothing_spooled(spool)


async def test_upload_over_the_limit_is_413_while_streaming(client, spool):
    # Chunked, so no Content-Length tells the server up front: it must count.
    big = b"x" * (3 * 1024 * 1024)

    async def body():
        for i in range(0, len(big), 64 * 1024):
            yield big[i : i + 64 * 1024]

    payload = aiohttp.FormData()
    payload.add_field("file", body(), filename="package.zip")
    response = await client.post("/v1/packages/upload", data=payload)
    assert response.status == 413
    assert "limit" in (await response.json())["error"]
    await nothing_spooled(spool)
    assert await stored_keys(client.app[STORAGE]) == []


async def test_declared_size_over_the_limit_is_refused_at_once(client):
    response = await client.post(
        "/v1/packages/upload",
        data=io.BytesIO(b"x" * (3 * 1024 * 1024)),
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
    )
    assert response.status == 413


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"data": form(b"zip", field="other")}, "'file' field"),
        ({"data": b"raw body", "headers": {"Content-Type": "application/zip"}}, "multipart"),
        ({"json": {"file": "x"}}, "multipart"),
    ],
)
async def test_malformed_requests(client, spool, kwargs, words):
    response = await client.post("/v1/packages/upload", **kwargs)
    assert response.status == 400
    assert words in (await response.json())["error"]
    await nothing_spooled(spool)


BOUNDARY = "cogtestboundary"
FILE_HEAD = (
    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="package.zip"\r\n'
    "Content-Type: application/zip\r\n\r\n"
).encode()
CLOSE = f"\r\n--{BOUNDARY}--\r\n".encode()


async def until(condition, what: str, timeout: float = 10.0) -> None:
    """Wait for a condition of the file system or the server, looking every 10 ms."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not {what} after {timeout:g}s")
        await asyncio.sleep(0.01)


def _gzip_cut_short(body: bytes) -> list[bytes]:
    """A gzip stream of body whose deflate data turns to garbage four fifths of the way,
    in two pieces: sent apart, the server is spooling the file when the garbage comes."""
    packed = gzip.compress(body, compresslevel=1)
    cut = len(packed) * 4 // 5
    return [packed[:cut], b"\xff" * 4096]


def _malformed_bodies(data: bytes) -> dict[str, tuple[bytes | list[bytes], dict[str, str], str]]:
    """Raw request bodies aiohttp's multipart reader cannot parse, and words of the error."""
    # Compressible (Huffman-coded, where garbage is an error, unlike stored blocks), and
    # over one spool batch before the garbage starts.
    rng = random.Random(7)
    words = [bytes(rng.choices(b"abcdefghijklmnop", k=rng.randint(2, 9))) for _ in range(500)]
    noise = b" ".join(rng.choices(words, k=330_000))[: 1900 * 1024]
    return {
        "no closing boundary": (FILE_HEAD + data, {}, "closing boundary"),
        "wrong starting boundary": (
            (FILE_HEAD + data + CLOSE).replace(BOUNDARY.encode(), b"otherboundary"),
            {},
            "boundary declared",
        ),
        "garbage": (b"this is not multipart at all", {}, "boundary declared"),
        "empty body": (b"", {}, "boundary declared"),
        "header line without a colon": (
            f"--{BOUNDARY}\r\nContent-Disposition form-data\r\n\r\n".encode() + data + CLOSE,
            {},
            "Invalid HTTP header",
        ),
        "gzip body that is not gzip": (
            FILE_HEAD + data + CLOSE,
            {"Content-Encoding": "gzip"},
            "content-encoding: gzip",
        ),
        "gzip body corrupt mid-file": (
            _gzip_cut_short(FILE_HEAD + noise + CLOSE),
            {"Content-Encoding": "gzip"},
            "content-encoding: gzip",
        ),
        "gzip-encoded file part": (
            FILE_HEAD.replace(b"\r\n\r\n", b"\r\nContent-Encoding: gzip\r\n\r\n")
            + gzip.compress(data)
            + CLOSE,
            {},
            "Content-Encoding: gzip",
        ),
    }


@pytest.mark.parametrize("case", list(_malformed_bodies(b"")), ids=lambda c: c.replace(" ", "-"))
@pytest.mark.parametrize("accept", ["application/json", NDJSON])
async def test_malformed_multipart_bodies_are_400(client, spool, hello, case, accept):
    """Bodies the multipart parser chokes on, sent as raw bytes: a 400 JSON error saying
    what is wrong (not a 500 with a traceback), no temp file, nothing stored."""
    data, _ = hello
    body, headers, words = _malformed_bodies(data)[case]

    async def pieces():
        for i, piece in enumerate(body):
            if i:
                await asyncio.sleep(0.2)
            yield piece

    with capture_logs() as logs:
        response = await client.post(
            "/v1/packages/upload",
            data=io.BytesIO(body) if isinstance(body, bytes) else pieces(),
            headers={
                "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                "Accept": accept,
                **headers,
            },
        )
        assert response.status == 400, await response.text()
        assert response.content_type == "application/json"
        error = (await response.json())["error"]
    assert words.lower() in error.lower(), error
    assert not [entry for entry in logs if entry["log_level"] == "error"], logs
    await nothing_spooled(spool)
    assert await stored_keys(client.app[STORAGE]) == []
    assert (await client.get("/ping")).status == 200


async def test_truncated_upload_leaves_nothing(client, spool, hello):
    """A client that disconnects mid-upload: no temp file, nothing stored, still serving."""
    data, _ = hello
    filler = b"\0" * (1024 * 1024)
    boundary = BOUNDARY
    head = FILE_HEAD
    declared = len(head) + len(data) + len(filler) + 100
    request = (
        f"POST /v1/packages/upload HTTP/1.1\r\nHost: test\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()
    server = client.server
    _reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(request + head + data + filler[: len(filler) // 2])
    await writer.drain()
    # The server has begun spooling it (its temp file is made as the file part begins).
    await until(lambda: any(spool.rglob("upload-*")), "spooling")
    writer.transport.abort()
    await until(lambda: not spooled(spool), "removed: the spooled upload")
    assert await stored_keys(client.app[STORAGE]) == []
    assert (await client.get("/ping")).status == 200


async def test_rebuild_without_a_builder_is_refused(client, hello):
    data, package_id = hello
    await upload(client, data)
    response = await client.post(f"/v1/packages/{package_id[:8]}/build")
    assert response.status == 409
    assert "no builder" in (await response.json())["error"]


async def test_errors_are_json_everywhere(client):
    response = await client.get("/no/such/route")
    assert response.status == 404
    assert "error" in await response.json()
    response = await client.put("/v1/packages/upload")
    assert response.status == 405
    assert "error" in await response.json()


async def test_one_log_line_per_request(client, hello):
    data, package_id = hello
    with capture_logs() as logs:
        await upload(client, data)
        await client.get(f"/v1/packages/{package_id[:9]}")
    requests = [entry for entry in logs if entry["event"] == "request"]
    assert [(r["method"], r["path"], r["status"]) for r in requests] == [
        ("POST", "/v1/packages/upload", 200),
        ("GET", f"/v1/packages/{package_id[:9]}", 200),
    ]
    assert all(r["package_id"] == package_id for r in requests)
    assert all(isinstance(r["ms"], float) for r in requests)


async def test_package_from_another_server_appears_within_ttl(aiohttp_client, settings, hello):
    """Two apps on one storage: what one stores, the other lists, through its background
    refresh alone (only the listing is asked for; a lookup would sync the index)."""
    data, package_id = hello
    one = await aiohttp_client(make_app(settings))
    two = await aiohttp_client(make_app(settings))
    assert (await (await two.get("/v1/packages/")).json()) == []
    await upload(one, data)
    for _ in range(20):
        await asyncio.sleep(settings.cache_ttl)
        listing = await (await two.get("/v1/packages/")).json()
        if listing:
            break
    assert [p["ID"] for p in listing] == [package_id]


class ListingsSeen(CheckedStorage):
    """Real local storage that remembers the prefixes it was asked to list."""

    def __init__(self, url: str):
        super().__init__(load_storage(url).backend)
        self.listed: list[str] = []

    async def list(self, prefix=""):
        self.listed.append(prefix)
        async for info in super().list(prefix):
            yield info


async def test_a_lookup_that_misses_lists_only_its_prefix(aiohttp_client, settings, hello):
    """Another server's package is found by prefix at once, and a prefix that matches
    nothing costs a listing of that prefix, not of every record in the store."""
    data, package_id = hello
    one = await aiohttp_client(make_app(settings))
    storage = ListingsSeen(settings.storage_url)
    two = await aiohttp_client(make_app(attrs.evolve(settings, cache_ttl=3600), storage=storage))
    await two.get("/v1/packages/")
    await upload(one, data)
    storage.listed.clear()
    assert (await two.get(f"/v1/packages/{package_id[:7]}")).status == 200
    assert (await two.get("/v1/packages/ffffff0")).status == 404
    assert storage.listed == [f"records/{package_id[:7]}", "records/ffffff0"]


async def test_a_record_whose_zip_is_gone_is_404_and_an_upload_restores_it(client, hello):
    data, package_id = hello
    await upload(client, data)
    storage = client.app[STORAGE]
    await storage.delete(f"packages/{package_id}.zip")  # what a delete running now does
    with capture_logs() as logs:
        response = await client.get(f"/v1/packages/{package_id[:8]}.zip")
    assert response.status == 404
    assert "zip is not in storage" in (await response.json())["error"]
    assert any(e["event"] == "package record without its zip" for e in logs)
    assert (await client.get(f"/v1/packages/{package_id}")).status == 200  # record kept

    again = await upload(client, data)
    assert again.status == 200
    response = await client.get(f"/v1/packages/{package_id}.zip")
    assert response.status == 200 and await response.read() == data
    assert await stored_keys(storage) == [f"packages/{package_id}.zip", record_key(package_id)]


class DeleteDuringUpload(CheckedStorage):
    """Real local storage, in which another server's delete of one package takes its
    second step (removing the zip; the record went first) at the worst moment for this
    server's upload of it: after the upload saw the zip in storage, before it writes the
    record. That interleaving of two servers, made deterministic."""

    def __init__(self, url: str, package_id: str):
        super().__init__(load_storage(url).backend)
        self.package_id = package_id
        self.deleted = False

    async def write(self, key, chunks):
        if key == record_key(self.package_id) and not self.deleted:
            self.deleted = True
            await self.delete(f"packages/{self.package_id}.zip")
        return await super().write(key, chunks)


async def test_a_zip_deleted_before_the_record_is_written_is_stored_again(
    aiohttp_client, settings, hello
):
    """Another server's delete removes the zip between this upload's look at it and its
    record: the upload looks again and stores the zip again. (A zip deleted after that
    second look is the 404 case above, mended by the next upload.)"""
    data, package_id = hello
    one = await aiohttp_client(make_app(settings))
    racing = DeleteDuringUpload(settings.storage_url, package_id)
    two = await aiohttp_client(make_app(settings, storage=racing))
    assert (await upload(one, data)).status == 200
    # Server one deletes the package: its record first...
    await one.app[STORAGE].delete(record_key(package_id))
    # ...and server two receives the same package meanwhile; the zip goes mid-upload.
    response = await upload(two, data, headers={"Accept": NDJSON})
    events = [json.loads(line) for line in (await response.read()).splitlines()]
    assert racing.deleted
    assert events[-1]["type"] == "package", events
    assert any("removed the stored copy" in e.get("message", "") for e in events)
    for server in (one, two):
        response = await server.get(f"/v1/packages/{package_id}.zip")
        assert response.status == 200 and await response.read() == data
    assert await stored_keys(one.app[STORAGE]) == [
        f"packages/{package_id}.zip",
        record_key(package_id),
    ]


class NeverBuilds(Builder):
    """A builder only so that the rebuild route gets as far as fetching the zip; it is
    never asked to build (the zip is missing), and fails the test if it is."""

    @classmethod
    def from_settings(cls, settings):
        return cls()

    async def build(self, request):
        raise AssertionError("the rebuild went on without the package's zip")
        yield


async def test_rebuild_of_a_record_whose_zip_is_gone_is_404(aiohttp_client, settings, hello):
    data, package_id = hello
    store_only = await aiohttp_client(make_app(settings))
    assert (await upload(store_only, data)).status == 200
    await store_only.app[STORAGE].delete(f"packages/{package_id}.zip")
    builder = await aiohttp_client(make_app(settings, builder=NeverBuilds()))
    response = await builder.post(f"/v1/packages/{package_id[:8]}/build")
    assert response.status == 404
    assert "zip is not in storage" in (await response.json())["error"]


class StuckBuilder(Builder):
    """Stands in for a build that hangs at one step, so that the client can leave it
    midway (the real builders' cancellation is tested against real engines in
    test_registry_build.py and test_buildkit_registry.py). With last_words, it says one
    line of its own when cancelled, as the BuildKit builder does."""

    name = "stuck"

    def __init__(self, last_words: str | None = None):
        self.last_words = last_words
        self.started = asyncio.Event()

    @classmethod
    def from_settings(cls, settings):
        return cls()

    async def build(self, request):
        from cog.builders import BuildLog

        yield BuildLog("build", "Step 1/2 : RUN sleep 1000")
        self.started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if self.last_words:
                yield BuildLog("build", self.last_words)
            raise
        yield BuildLog("build", "not reached")


@pytest.mark.parametrize("last_words", [None, "stuck at sleepy: build cancelled during RUN"])
async def test_a_cancelled_build_names_its_builder_and_step(
    aiohttp_client, settings, hello, last_words
):
    data, package_id = hello
    builder = StuckBuilder(last_words)
    app = make_app(settings, builder=builder)
    client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
    await upload_then_hang_up(client, data, b"Step 1/2")
    for _ in range(100):
        doc = await (await client.get(f"/v1/packages/{package_id}")).json()
        if doc["Status"] != "building":
            break
        await asyncio.sleep(0.05)
    # The builder's own account of the cancellation, where Python can tell it was said
    # while cancelling (3.11+); else cog's, quoting the builder's last line.
    expected = (
        last_words
        if last_words and sys.version_info >= (3, 11)
        else "stuck: build cancelled while building the CPU image "
        f"127.0.0.1:5000/test/hello:{package_id[:12]} "
        f"(last output: {last_words or 'Step 1/2 : RUN sleep 1000'})"
    )
    assert (doc["Status"], doc["Error"]) == ("failed", expected)
    stored = await (await client.get(f"/v1/packages/{package_id}/log")).read()
    log = [json.loads(line) for line in stored.splitlines()]
    assert [e["line"] for e in log if e["type"] == "log"][-1] == expected  # said once
    assert sum(expected in e.get("line", "") for e in log) == 1
    assert log[-1] == {
        "type": "error",
        "message": expected,
        "status": 500,
        "package": log[-1]["package"],
    }


def _corrupt_member_zip() -> bytes:
    """A valid package but for weights.bin, whose bytes no longer match their CRC; the
    config check does not read it, only the full verification does."""
    weights = b"W" * 4096
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:  # stored: the bytes are in the zip as they are
        zf.writestr("cog.yaml", VALID_YAML)
        zf.writestr("infer.py", VALID_MODEL)
        zf.writestr("weights.bin", weights)
    data = out.getvalue()
    at = data.index(weights) + 100
    return data[:at] + b"X" + data[at + 1 :]


async def test_received_comes_before_the_full_check_of_every_member(client, spool):
    """The first event is sent as soon as the upload is hashed; a member found corrupt by
    the full check then ends the stream with a 400 error event, nothing stored."""
    response = await upload(client, _corrupt_member_zip(), headers={"Accept": NDJSON})
    assert response.status == 200
    events = [json.loads(line) for line in (await response.read()).splitlines()]
    assert [e["type"] for e in events] == ["status", "error"], events
    assert events[0]["message"].startswith("Received package")
    assert events[1]["status"] == 400 and "weights.bin is corrupt" in events[1]["message"]
    assert await stored_keys(client.app[STORAGE]) == []
    # The spooled upload goes once the stream has ended, after its last event was sent.
    await until(lambda: spooled(spool) == [], "removed: the spooled upload")

    response = await upload(client, _corrupt_member_zip())  # without the stream: plain 400
    assert response.status == 400
    assert "weights.bin is corrupt" in (await response.json())["error"]


async def test_a_todays_cog_package_is_read_at_upload_as_a_2021_one_is(client, tmp_path):
    """Today's cog.yaml and predictor: stored with the same document shape, its signature
    read without importing it, newer keys a warning in the build stream, and a wrongly
    declared input refused before anything is stored."""
    root = tmp_path / "today"
    shutil.copytree(Path(__file__).parent / "fixtures" / "kitchen", root)
    with open(root / "cog.yaml", "a") as f:
        f.write("train: train.py:train\n")
    data, package_id = package_bytes(root)
    response = await upload(client, data, headers={"Accept": NDJSON})
    events = [json.loads(line) async for line in response.content if line.strip()]
    warnings = [e["line"] for e in events if e.get("stage") == "config"]
    assert warnings == [
        "warning: cog.yaml: train: training (/trainings) is not supported yet; ignored"
    ]
    document = events[-1]["package"]
    assert document["ID"] == package_id
    assert document["Name"] == "test/kitchen"
    assert document["Config"]["Model"] == "predict.py:Predictor"
    assert document["Config"]["Format"] == "predict"
    assert document["Signature"]["kind"] == "predictor"
    assert document["Signature"]["arguments"]["count"] == {
        "type": "int",
        "default": 2,
        "min": 1,
        "max": 5,
    }
    shown = await (await client.get(f"/v1/packages/{package_id[:12]}")).json()
    assert shown == document

    (root / "predict.py").write_text(
        (root / "predict.py").read_text().replace("default=2, ge=1", "default=9, ge=1")
    )
    bad, _ = package_bytes(root)
    response = await upload(client, bad)
    assert response.status == 400  # as an invalid 2021 package is
    (problem,) = (await response.json())["problems"]
    assert problem.endswith("Predictor.predict: input 'count': default 9 is above the maximum 5")
