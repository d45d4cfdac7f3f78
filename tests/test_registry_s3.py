"""Registry servers on S3 storage (a real SeaweedFS): several servers, one bucket; and S3
going away under a server."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from cog.storage import load_storage
from tests.registry_helpers import make_model_dir, package_bytes
from tests.services.s3 import SeaweedFS, storage_url
from tests.test_cli import COG, free_port, wait_for

pytestmark = pytest.mark.integration
TTL = 1.0


@contextmanager
def cog_server(storage: str, log: Path):
    port = free_port()
    args = [
        COG, "server", "--host", "127.0.0.1", "--port", str(port), "--storage", storage,
        "--builder", "none", "--cache-ttl", str(TTL), "--log-format", "json",
    ]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=os.environ)
        try:
            wait_for(f"http://127.0.0.1:{port}/ping")
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(timeout=15)


def upload(server: str, data: bytes) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="p.zip"\r\n'
            "Content-Type: application/zip\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{server}/v1/packages/upload",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_two_servers_one_bucket(s3_server, tmp_path):
    storage = storage_url(s3_server)
    with cog_server(storage, tmp_path / "one.log") as one, cog_server(
        storage, tmp_path / "two.log"
    ) as two:
        data, package_id = package_bytes(make_model_dir(tmp_path / "m"))
        status, doc = upload(one, data)
        assert status == 200 and doc["ID"] == package_id

        # Shown and downloaded through the other server at once (a lookup by ID reads
        # storage), listed there within the index refresh interval.
        assert json.loads(get(f"{two}/v1/packages/{package_id[:10]}")[1])["ID"] == package_id
        status, body = get(f"{two}/v1/packages/{package_id}.zip")
        assert status == 200 and hashlib.sha256(body).hexdigest() == package_id
        started = time.monotonic()
        while time.monotonic() - started < 5 * TTL:
            if [p["ID"] for p in json.loads(get(f"{two}/v1/packages/")[1])] == [package_id]:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the other server did not list the package")

        # The same new package through both at once: one package.
        data2, id2 = package_bytes(make_model_dir(tmp_path / "m2", extra="# two\n"))
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda server: upload(server, data2), (one, two)))
        assert [status for status, _ in results] == [200, 200]
        assert {doc["ID"] for _, doc in results} == {id2}

        # Deleted through one: gone from the other too.
        request = urllib.request.Request(f"{one}/v1/packages/{package_id}", method="DELETE")
        with urllib.request.urlopen(request) as response:
            assert response.status == 200
        assert get(f"{two}/v1/packages/{package_id}")[0] == 404
        time.sleep(3 * TTL)
        assert [p["ID"] for p in json.loads(get(f"{two}/v1/packages/")[1])] == [id2]

    async def stored():
        store = load_storage(storage)
        await store.open()
        try:
            return sorted([i.key async for i in store.list("")])
        finally:
            await store.close()

    assert asyncio.run(stored()) == [f"packages/{id2}.zip", f"records/{id2}.json"]


def test_s3_gone_is_503_and_stores_no_record(s3_server, tmp_path):
    with tempfile.TemporaryDirectory(prefix="cog-weed-gone-") as tmp:
        weed = SeaweedFS(Path(tmp)).start()
        storage = storage_url(weed.endpoint, connect_timeout="1", retries="1", read_timeout="5")
        try:
            with cog_server(storage, tmp_path / "server.log") as server:
                weed.stop()
                data, package_id = package_bytes(make_model_dir(tmp_path / "m"))
                status, body = upload(server, data)
                assert status == 503, body
                assert "storage is unavailable" in body["error"]
                assert get(f"{server}/ping")[0] == 200  # still serving
                weed.start()
                assert get(f"{server}/v1/packages/{package_id}")[0] == 404
                status, body = upload(server, data)  # and works again once S3 is back
                assert status == 200, body
        finally:
            weed.stop()
