"""Registry servers on S3 storage (a real SeaweedFS): several servers, one bucket; and S3
going away under a server."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from cog.storage import load_storage
from tests.registry_helpers import make_model_dir, package_bytes, post_package
from tests.services.s3 import SeaweedFS, storage_url
from tests.test_cli import COG, free_port, wait_for

pytestmark = pytest.mark.integration
TTL = 1.0
MiB = 1024 * 1024


@contextmanager
def cog_server(storage: str, log: Path, ttl: float = TTL):
    port = free_port()
    args = [
        COG, "server", "--host", "127.0.0.1", "--port", str(port), "--storage", storage,
        "--builder", "none", "--cache-ttl", str(ttl), "--log-format", "json",
    ]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=os.environ)
        try:
            wait_for(f"http://127.0.0.1:{port}/ping")
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(timeout=15)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def listed(server: str) -> list[str]:
    return [p["ID"] for p in json.loads(get(f"{server}/v1/packages/")[1])]


def log_events(log: Path) -> list[str]:
    events = []
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line)["event"])
    return events


def test_two_servers_one_bucket(s3_server, tmp_path):
    """Servers `one` and `two` refresh their index every TTL seconds; `slow` every hour,
    so it shows what the refresher alone makes appear: nothing, until a lookup misses."""
    storage = storage_url(s3_server)
    with contextlib.ExitStack() as servers:
        one = servers.enter_context(cog_server(storage, tmp_path / "one.log"))
        two = servers.enter_context(cog_server(storage, tmp_path / "two.log"))
        slow = servers.enter_context(cog_server(storage, tmp_path / "slow.log", ttl=3600))
        assert listed(two) == listed(slow) == []
        data, package_id = package_bytes(make_model_dir(tmp_path / "m"))
        status, doc = post_package(one, data)
        assert status == 200 and doc["ID"] == package_id
        uploaded = time.monotonic()

        # Listed by the other server within the refresh interval, with nothing but
        # listings asked of it (a lookup would refresh its index at once).
        while listed(two) != [package_id]:
            assert time.monotonic() - uploaded < TTL + 1.5, "not listed within the TTL"
            time.sleep(0.05)
        time.sleep(max(0.0, uploaded + 3 * TTL - time.monotonic()))
        assert listed(slow) == []  # its refresher is an hour away

        # Shown and downloaded at once (a lookup by ID reads storage; a prefix that
        # misses refreshes the index), then listed there too.
        assert json.loads(get(f"{slow}/v1/packages/{package_id[:10]}")[1])["ID"] == package_id
        assert listed(slow) == [package_id]
        status, body = get(f"{slow}/v1/packages/{package_id}.zip")
        assert status == 200 and hashlib.sha256(body).hexdigest() == package_id

        # The same new package through both at once: one package.
        data2, id2 = package_bytes(make_model_dir(tmp_path / "m2", extra="# two\n"))
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda server: post_package(server, data2), (one, two)))
        assert [status for status, _ in results] == [200, 200]
        assert {doc["ID"] for _, doc in results} == {id2}

        # Deleted through one: unlisted by the other within the TTL, gone at once.
        request = urllib.request.Request(f"{one}/v1/packages/{package_id}", method="DELETE")
        with urllib.request.urlopen(request) as response:
            assert response.status == 200
        deleted = time.monotonic()
        while package_id in listed(two):
            assert time.monotonic() - deleted < TTL + 1.5, "still listed after the TTL"
            time.sleep(0.05)
        assert sorted(listed(two)) == [id2]
        assert get(f"{two}/v1/packages/{package_id}")[0] == 404

    async def stored():
        store = load_storage(storage)
        await store.open()
        try:
            return sorted([i.key async for i in store.list("")])
        finally:
            await store.close()

    assert asyncio.run(stored()) == [f"packages/{id2}.zip", f"records/{id2}.json"]


async def open_uploads(storage: str) -> list[str]:
    store = load_storage(storage)
    await store.open()
    try:
        s3 = store.backend
        answer = await s3._client.list_multipart_uploads(Bucket=s3.bucket, Prefix=s3.prefix)
        return [upload["Key"] for upload in answer.get("Uploads", [])]
    finally:
        await store.close()


def test_s3_killed_mid_upload_is_503_and_stores_no_record(s3_server, tmp_path):
    """SeaweedFS is killed while the server sends a package to it in parts: the upload
    is a 503, no record exists, and once S3 is back the server's own periodic sweep
    aborts the multipart upload whose abort could not reach S3."""
    with tempfile.TemporaryDirectory(prefix="cog-weed-gone-") as tmp:
        weed = SeaweedFS(Path(tmp)).start()
        storage = storage_url(
            weed.endpoint, part_size="5MiB", max_parts_in_flight="1", connect_timeout="1",
            retries="1", read_timeout="5", abort_incomplete_after="2s",
        )  # fmt: skip
        model = make_model_dir(tmp_path / "m")
        (model / "weights.bin").write_bytes(os.urandom(64 * MiB))  # 13 parts
        data, package_id = package_bytes(model)
        # A store of the test's own, to watch S3; it sweeps nothing itself.
        watch_url = storage.replace("abort_incomplete_after=2s", "abort_incomplete_after=0")

        async def kill_once_the_upload_is_under_way(uploading) -> None:
            store = load_storage(watch_url)
            await store.open()
            try:
                s3 = store.backend
                while not uploading.done():
                    answer = await s3._client.list_multipart_uploads(
                        Bucket=s3.bucket, Prefix=s3.prefix
                    )
                    if answer.get("Uploads"):
                        weed.stop()
                        return
                    await asyncio.sleep(0.01)
                pytest.fail(f"the upload ended before S3 could be killed: {uploading.result()}")
            finally:
                with contextlib.suppress(Exception):
                    await store.close()

        log = tmp_path / "server.log"
        try:
            pool = concurrent.futures.ThreadPoolExecutor(1)
            with cog_server(storage, log) as server, pool:
                uploading = pool.submit(post_package, server, data)
                asyncio.run(kill_once_the_upload_is_under_way(uploading))
                status, body = uploading.result()
                assert status == 503, body
                assert "storage is unavailable" in body["error"]
                assert get(f"{server}/ping")[0] == 200  # still serving
                weed.start()
                assert get(f"{server}/v1/packages/{package_id}")[0] == 404
                assert listed(server) == []
                # The abort failed (S3 was gone); the sweep, every 2s, gets it now.
                deadline = time.monotonic() + 15
                while asyncio.run(open_uploads(watch_url)):
                    assert time.monotonic() < deadline, "the multipart upload was not swept"
                    time.sleep(0.2)
                status, body = post_package(server, data)  # and works again once S3 is back
                assert status == 200, body
            events = log_events(log)
            assert any("not aborted" in event for event in events)
            assert "abandoned multipart uploads aborted" in events

            async def stored() -> list[str]:
                store = load_storage(watch_url)
                await store.open()
                try:
                    return sorted([i.key async for i in store.list("")])
                finally:
                    await store.close()

            assert asyncio.run(stored()) == [
                f"packages/{package_id}.zip",
                f"records/{package_id}.json",
            ]
        finally:
            weed.stop()


def test_wrong_credentials_stop_the_server_at_start_with_one_line(s3_server, tmp_path):
    if os.environ.get("COG_TEST_S3_ENDPOINT"):
        pytest.skip("needs the session's own SeaweedFS, which checks credentials")
    result = subprocess.run(
        [COG, "server", "--host", "127.0.0.1", "--port", str(free_port()),
         "--storage", storage_url(s3_server), "--builder", "none"],
        env={**os.environ, "AWS_SECRET_ACCESS_KEY": "not-the-secret"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("cog: error: storage s3://"), result.stderr
    assert "access denied" in last and "AWS_ACCESS_KEY_ID" in last
