"""The storage contract against S3 on a real SeaweedFS, and S3 faults."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import pytest

from cog.storage import StorageConfigError, StorageUnavailable, load_storage
from cog.storage.s3 import S3Storage
from tests.services.s3 import SeaweedFS, storage_url
from tests.storage_contract import MiB, StorageContract, stream

pytestmark = pytest.mark.integration


class TestS3Storage(StorageContract):
    # part_size 5MiB with 2 parts in flight: a few parts of buffer (and botocore's copy
    # of the part it sends), never the whole 48 MiB blob
    max_write_memory = 40 * MiB

    @pytest.fixture
    async def storage(self, s3_url):
        store = load_storage(s3_url)
        await store.open()
        yield store
        await store.close()

    async def leftovers(self, storage):
        s3: S3Storage = storage.backend
        answer = await s3._client.list_multipart_uploads(Bucket=s3.bucket, Prefix=s3.prefix)
        return [upload["Key"] for upload in answer.get("Uploads", [])]


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("s3://", "expected s3://bucket"),
        ("s3://b/p?part_size=1MiB", "at least 5MiB"),
        ("s3://b/p?bogus=1", "unknown S3 storage option"),
        ("s3://b/p?max_parts_in_flight=x", "bad S3 storage option"),
    ],
)
def test_bad_urls(url, words):
    with pytest.raises(StorageConfigError, match=words):
        S3Storage.from_url(url)


async def test_missing_bucket_without_create_is_a_clear_error(s3_server):
    store = load_storage(f"s3://no-such-bucket-cog/x?endpoint={s3_server}&region=us-east-1")
    with pytest.raises(StorageConfigError, match="does not exist"):
        await store.open()


async def test_unreachable_endpoint_is_unavailable():
    store = load_storage(
        "s3://b/p?endpoint=http://127.0.0.1:1&region=us-east-1&connect_timeout=1&retries=1"
    )
    with pytest.raises(StorageUnavailable, match="cannot reach"):
        await store.open()


async def test_server_stopped_mid_upload_is_unavailable_and_leaves_nothing(s3_server):
    """A separate SeaweedFS, stopped for real while a multipart upload streams into it."""
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
                await asyncio.to_thread(weed.stop)  # the server dies mid-upload
                stopped.set()
                async for chunk in stream(os.urandom(12 * MiB), chunk=MiB):
                    yield chunk

            with pytest.raises(StorageUnavailable):
                await store.write("packages/x.zip", chunks())
            assert stopped.is_set()
            await store.close()
            # Back up on the same data: no blob became visible.
            weed.start()
            store = load_storage(url)
            await store.open()
            assert not await store.exists("packages/x.zip")
            await store.close()
        finally:
            weed.stop()
