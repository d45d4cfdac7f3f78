"""The storage contract against S3 on a real SeaweedFS, and S3 faults."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cog.storage import StorageConfigError, StorageUnavailable, load_storage
from cog.storage.s3 import S3Storage, parse_duration
from cog.testing.storage import MiB, StorageContract, stream
from tests.services.s3 import SeaweedFS, storage_url

pytestmark = pytest.mark.integration


async def uploads(storage) -> list[str]:
    """Keys (under the store's prefix) of the multipart uploads S3 still holds open."""
    s3: S3Storage = storage.backend
    answer = await s3._client.list_multipart_uploads(Bucket=s3.bucket, Prefix=s3.prefix)
    return sorted(upload["Key"][len(s3.prefix) :] for upload in answer.get("Uploads", []))


class TestS3Storage(StorageContract):
    # s3_url: part_size 5MiB with 2 parts in flight. A write holds the parts in flight
    # (a slot is free before the next part is filled) plus a chunk or two: ~14 MiB
    # measured. Bounded at part_size * (max_parts_in_flight + 1) plus slack, so one
    # more part held (~19 MiB), let alone a 48 MiB blob, fails.
    max_write_memory = 5 * MiB * (2 + 1) + 3 * MiB

    @pytest.fixture
    async def storage(self, s3_url):
        store = load_storage(s3_url)
        await store.open()
        yield store
        await store.close()

    async def leftovers(self, storage):
        return await uploads(storage)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("s3://", "expected s3://bucket"),
        ("s3://b/p?part_size=1MiB", "at least 5MiB"),
        ("s3://b/p?bogus=1", "unknown S3 storage option"),
        ("s3://b/p?max_parts_in_flight=x", "bad S3 storage option"),
        ("s3://b/p?abort_incomplete_after=soon", "not a duration"),
    ],
)
def test_bad_urls(url, words):
    with pytest.raises(StorageConfigError, match=words):
        S3Storage.from_url(url)


def test_durations():
    assert [parse_duration(t) for t in ("90", "90s", "30m", "1h", "1.5h", "7d", "0")] == [
        90,
        90,
        1800,
        3600,
        5400,
        7 * 86400,
        0,
    ]
    assert S3Storage.from_url("s3://b/p").abort_incomplete_after == 3600


async def test_missing_bucket_without_create_is_a_clear_error(s3_server):
    store = load_storage(f"s3://no-such-bucket-cog/x?endpoint={s3_server}&region=us-east-1")
    with pytest.raises(StorageConfigError, match="does not exist"):
        await store.open()


async def test_unreachable_endpoint_is_unavailable(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "any")  # credentials are not what fails here
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "any")
    store = load_storage(
        "s3://b/p?endpoint=http://127.0.0.1:1&region=us-east-1&connect_timeout=1&retries=1"
    )
    with pytest.raises(StorageUnavailable, match="cannot reach"):
        await store.open()


def multipart_etag(data: bytes, part_size: int) -> str:
    """The ETag S3 gives an object uploaded in parts: MD5 of the parts' MD5s, -count."""
    digests = [
        hashlib.md5(data[i : i + part_size]).digest() for i in range(0, len(data), part_size)
    ]
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


async def test_each_writer_gets_the_version_of_what_it_wrote(s3_url):
    """The version comes from the write's own answer: with two writers racing on one key,
    neither records the other's (as a HEAD after the write could)."""
    store = load_storage(s3_url)
    await store.open()
    try:
        for _ in range(5):
            small = [os.urandom(1000), os.urandom(1000)]
            infos = await asyncio.gather(*(store.write_bytes("v/small", d) for d in small))
            assert [i.version for i in infos] == [hashlib.md5(d).hexdigest() for d in small]
            assert (await store.stat("v/small")).version in [i.version for i in infos]
        big = [os.urandom(12 * MiB), os.urandom(12 * MiB)]
        infos = await asyncio.gather(*(store.write("v/big", stream(d)) for d in big))
        assert [i.version for i in infos] == [multipart_etag(d, 5 * MiB) for d in big]
        assert (await store.stat("v/big")).version in [i.version for i in infos]
    finally:
        await store.close()


async def test_the_sweep_aborts_only_old_uploads_that_are_not_its_own(s3_server):
    store = load_storage(storage_url(s3_server, part_size="5MiB"))
    await store.open()
    s3: S3Storage = store.backend
    try:
        # An upload another server abandoned, and one of this server's own, in progress.
        await s3._client.create_multipart_upload(Bucket=s3.bucket, Key=s3.prefix + "old.zip")
        release = asyncio.Event()

        async def slow():
            yield os.urandom(6 * MiB)
            await release.wait()
            yield b"end"

        mine = asyncio.create_task(store.write("mine.zip", slow()))
        while await uploads(store) != ["mine.zip", "old.zip"]:
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.5)
        # Another server's upload, just started.
        await s3._client.create_multipart_upload(Bucket=s3.bucket, Key=s3.prefix + "new.zip")

        assert await s3.abort_abandoned_uploads(older_than=2) == 1
        assert await uploads(store) == ["mine.zip", "new.zip"]
        release.set()
        assert (await mine).size == 6 * MiB + 3
        assert await uploads(store) == ["new.zip"]
        # With the default age (1 hour) nothing here is old enough.
        assert await s3.abort_abandoned_uploads() == 0
        assert await s3.abort_abandoned_uploads(older_than=0) == 1
        assert await uploads(store) == []
    finally:
        await store.close()


async def test_credentials_come_from_the_environment_and_wrong_ones_are_clear(
    s3_server, monkeypatch
):
    """The session's SeaweedFS checks signatures (tests/services/s3.py)."""
    if os.environ.get("COG_TEST_S3_ENDPOINT"):
        pytest.skip("needs the session's own SeaweedFS, which checks credentials")
    url = storage_url(s3_server)
    store = load_storage(url)
    await store.open()  # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment
    await store.write_bytes("k", b"v")
    await store.close()

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageUnavailable, match=r"access denied .* check the credentials"):
        await load_storage(url).open()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(StorageUnavailable, match=r"access denied .* check the credentials"):
        await load_storage(url).open()


async def test_no_credentials_at_all_is_clear(s3_server, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageUnavailable, match="no usable credentials"):
        await load_storage(storage_url(s3_server)).open()


async def test_server_stopped_mid_upload_is_unavailable_and_the_sweep_cleans_up(s3_server):
    """A separate SeaweedFS, killed for real while a multipart upload streams into it:
    the write fails at once, its abort cannot reach S3 either, and the parts it sent stay
    until a sweep, once S3 is back, aborts the upload."""
    with tempfile.TemporaryDirectory(prefix="cog-weed-fault-") as tmp:
        weed = SeaweedFS(Path(tmp)).start()
        try:
            url = storage_url(
                weed.endpoint, part_size="5MiB", retries="1", connect_timeout="1", read_timeout="5"
            )
            store = load_storage(url)
            await store.open()
            stopped = asyncio.Event()

            async def chunks():
                async for chunk in stream(os.urandom(12 * MiB), chunk=MiB):
                    yield chunk
                weed.stop()  # the server dies mid-upload
                stopped.set()
                async for chunk in stream(os.urandom(12 * MiB), chunk=MiB):
                    yield chunk

            started = time.monotonic()
            with capture_logs() as logs, pytest.raises(StorageUnavailable):
                await store.write("packages/x.zip", chunks())
            assert stopped.is_set()
            assert [e["upload_id"] for e in logs if "not aborted" in e["event"]]
            await store.close()

            # Back up on the same data: no blob became visible, and the upload is still
            # open. A server with the default age leaves it: it could be another
            # server's, still running.
            weed.start()
            store = load_storage(url)
            await store.open()
            assert not await store.exists("packages/x.zip")
            assert await uploads(store) == ["packages/x.zip"]
            await store.close()

            # Once it is older than abort_incomplete_after, a server's start sweeps it.
            await asyncio.sleep(max(0.0, started + 2.5 - time.monotonic()))
            store = load_storage(f"{url}&abort_incomplete_after=2s")
            await store.open()
            assert await uploads(store) == []
            assert [i.key async for i in store.list("")] == []
            await store.close()
        finally:
            weed.stop()
