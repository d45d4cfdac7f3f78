"""S3 storage (AWS or any S3-compatible store): ``s3://bucket/prefix?option=value``.

Credentials and region come from the usual AWS settings (environment variables, shared
config/credentials files, instance roles). URL query options:

- ``endpoint=http://127.0.0.1:8333``: an S3-compatible endpoint (SeaweedFS, MinIO, ...);
  path-style addressing is used with an explicit endpoint.
- ``region=us-east-1``
- ``profile=NAME``: an AWS config profile.
- ``part_size=8MiB``: multipart part size (at least 5MiB, S3's minimum). Blobs smaller than
  one part are sent in a single PUT.
- ``max_parts_in_flight=2``: parts uploaded at once (more gained little on loopback).
  Memory use is bounded by about ``part_size * (max_parts_in_flight + 2)`` (plus
  botocore's own copy of a part being sent), whatever the blob's size.
- ``create_bucket=true``: create the bucket at start if it does not exist.
- ``connect_timeout=5``, ``read_timeout=60``, ``retries=2``: so a dead endpoint fails in
  seconds, not minutes.

Writes are atomic for readers: an object appears only when its PUT or multipart upload
completes; a failed or cancelled multipart upload is aborted, leaving nothing behind.
botocore errors never leave this module: they become NotFound, StorageUnavailable (the
endpoint cannot be reached, or answers 5xx) or StorageError.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterable, AsyncIterator
from urllib.parse import parse_qsl, urlsplit

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore import exceptions as boto

from cog.storage import (
    BlobInfo,
    BlobReader,
    NotFound,
    Storage,
    StorageConfigError,
    StorageError,
    StorageUnavailable,
)

MIN_PART = 5 * 1024 * 1024
READ_CHUNK = 1024 * 1024
_SIZE = re.compile(r"(\d+)\s*(|k|m|g)i?b?", re.IGNORECASE)
_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}
_UNAVAILABLE = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500"}


def parse_size(text: str) -> int:
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise StorageConfigError(f"not a size: {text!r} (e.g. 8MiB)")
    return int(match[1]) * 1024 ** " kmg".index(match[2].lower() or " ")


def translate(exc: BaseException, what: str) -> StorageError:
    """A botocore/aiohttp error as one of ours."""
    if isinstance(exc, boto.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        message = error.get("Message") or code
        if code in _NOT_FOUND or status == 404:
            return NotFound(what)
        if code in _UNAVAILABLE or status >= 500:
            return StorageUnavailable(f"S3 {what}: {message} (HTTP {status})")
        return StorageError(f"S3 {what}: {message} ({code})")
    if isinstance(
        exc,
        (
            boto.EndpointConnectionError,
            boto.ConnectTimeoutError,
            boto.ReadTimeoutError,
            boto.ConnectionClosedError,
            aiohttp.ClientError,
            asyncio.TimeoutError,
            ConnectionError,
        ),
    ):
        return StorageUnavailable(f"S3 {what}: cannot reach the endpoint: {exc}")
    return StorageError(f"S3 {what}: {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def _s3(what: str):
    try:
        yield
    except (
        boto.BotoCoreError,
        boto.ClientError,
        aiohttp.ClientError,
        asyncio.TimeoutError,
        ConnectionError,
    ) as exc:
        raise translate(exc, what) from None


class _S3Reader(BlobReader):
    def __init__(self, info: BlobInfo, body, key: str):
        self.info = info
        self._body = body
        self._key = key

    async def chunks(self) -> AsyncIterator[bytes]:
        with _s3(f"reading {self._key}"):
            while chunk := await self._body.read(READ_CHUNK):
                yield chunk


class S3Storage(Storage):
    scheme = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        part_size: int = 8 * 1024 * 1024,
        max_parts_in_flight: int = 2,
        create_bucket: bool = False,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        retries: int = 2,
    ):
        if part_size < MIN_PART:
            raise StorageConfigError("part_size must be at least 5MiB (S3's minimum part)")
        if max_parts_in_flight < 1:
            raise StorageConfigError("max_parts_in_flight must be at least 1")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint = endpoint
        self.region = region
        self.profile = profile
        self.part_size = part_size
        self.max_parts_in_flight = max_parts_in_flight
        self.create_bucket = create_bucket
        self._config = AioConfig(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": retries, "mode": "standard"},
            s3={"addressing_style": "path" if endpoint else "auto"},
            # Checksums only where S3 requires them: the default wraps every part in a
            # checksumming stream (more copies in memory, more CPU) for no added safety
            # over TCP + the part ETags S3 checks at completion.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._stack: contextlib.AsyncExitStack | None = None
        self._client = None

    def __repr__(self) -> str:
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"S3Storage('s3://{self.bucket}/{self.prefix}'{where})"

    @classmethod
    def from_url(cls, url: str) -> S3Storage:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise StorageConfigError(f"not an S3 URL: {url!r} (expected s3://bucket/prefix)")
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        known = {
            "endpoint", "region", "profile", "part_size", "max_parts_in_flight",
            "create_bucket", "connect_timeout", "read_timeout", "retries",
        }  # fmt: skip
        unknown = set(options) - known
        if unknown:
            raise StorageConfigError(
                f"unknown S3 storage option(s): {', '.join(sorted(unknown))} "
                f"(known: {', '.join(sorted(known))})"
            )
        try:
            return cls(
                parts.netloc,
                parts.path,
                endpoint=options.get("endpoint"),
                region=options.get("region"),
                profile=options.get("profile"),
                part_size=parse_size(options.get("part_size", "8MiB")),
                max_parts_in_flight=int(options.get("max_parts_in_flight", 2)),
                create_bucket=options.get("create_bucket", "false").lower() in ("1", "true", "yes"),
                connect_timeout=float(options.get("connect_timeout", 5)),
                read_timeout=float(options.get("read_timeout", 60)),
                retries=int(options.get("retries", 2)),
            )
        except ValueError as exc:
            raise StorageConfigError(f"bad S3 storage option in {url!r}: {exc}") from None

    async def open(self) -> None:
        session = get_session()
        if self.profile:
            session.set_config_variable("profile", self.profile)
        self._stack = contextlib.AsyncExitStack()
        self._client = await self._stack.enter_async_context(
            session.create_client(
                "s3", endpoint_url=self.endpoint, region_name=self.region, config=self._config
            )
        )
        try:
            with _s3(f"bucket {self.bucket}"):
                await self._client.head_bucket(Bucket=self.bucket)
        except NotFound:
            if not self.create_bucket:
                await self.close()
                raise StorageConfigError(
                    f"S3 bucket {self.bucket!r} does not exist (add ?create_bucket=true to "
                    "create it)"
                ) from None
            with _s3(f"creating bucket {self.bucket}"):
                await self._client.create_bucket(Bucket=self.bucket)
        except StorageError:
            await self.close()
            raise

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None
            self._client = None

    def _key(self, key: str) -> str:
        return self.prefix + key

    async def write(self, key: str, chunks: AsyncIterable[bytes]) -> BlobInfo:
        buffer = bytearray()
        iterator = chunks.__aiter__()
        async for chunk in iterator:
            buffer += chunk
            if len(buffer) >= self.part_size:
                return await self._multipart(key, buffer, iterator)
        with _s3(f"writing {key}"):
            await self._client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=bytes(buffer)
            )
        return await self.stat(key)

    async def _multipart(self, key: str, buffer: bytearray, rest: AsyncIterator[bytes]) -> BlobInfo:
        with _s3(f"writing {key}"):
            upload = await self._client.create_multipart_upload(
                Bucket=self.bucket, Key=self._key(key)
            )
        upload_id = upload["UploadId"]
        parts: dict[int, str] = {}
        in_flight: set[asyncio.Task[None]] = set()
        numbers = iter(range(1, 10_001))  # S3 allows part numbers 1..10000

        async def send(number: int, data: bytes) -> None:
            with _s3(f"writing {key} (part {number})"):
                answer = await self._client.upload_part(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=data,
                )
            parts[number] = answer["ETag"]

        async def start(data: bytes) -> None:
            # Bounded: wait for a part to finish before starting one more.
            while len(in_flight) >= self.max_parts_in_flight:
                done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    in_flight.discard(task)
                    task.result()
            number = next(numbers, None)
            if number is None:
                raise StorageError(f"S3 writing {key}: more than 10,000 parts; raise part_size")
            in_flight.add(asyncio.create_task(send(number, data)))

        try:
            while len(buffer) >= self.part_size:
                await start(bytes(memoryview(buffer)[: self.part_size]))
                del buffer[: self.part_size]
            async for chunk in rest:
                buffer += chunk
                while len(buffer) >= self.part_size:
                    await start(bytes(memoryview(buffer)[: self.part_size]))
                    del buffer[: self.part_size]
            if buffer:
                await start(bytes(buffer))
            for task in asyncio.as_completed(list(in_flight)):
                await task
            in_flight.clear()
            with _s3(f"writing {key}"):
                await self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    UploadId=upload_id,
                    MultipartUpload={
                        "Parts": [{"PartNumber": n, "ETag": parts[n]} for n in sorted(parts)]
                    },
                )
        except BaseException:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            # Shielded so a cancelled upload still leaves nothing behind on S3.
            with contextlib.suppress(Exception):
                await asyncio.shield(
                    self._client.abort_multipart_upload(
                        Bucket=self.bucket, Key=self._key(key), UploadId=upload_id
                    )
                )
            raise
        return await self.stat(key)

    @contextlib.asynccontextmanager
    async def open_reader(self, key: str) -> AsyncIterator[BlobReader]:
        with _s3(key):
            answer = await self._client.get_object(Bucket=self.bucket, Key=self._key(key))
        body = answer["Body"]
        try:
            info = BlobInfo(key, int(answer["ContentLength"]), _version(answer))
            yield _S3Reader(info, body, key)
        finally:
            body.close()

    async def stat(self, key: str) -> BlobInfo:
        with _s3(key):
            answer = await self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        return BlobInfo(key, int(answer["ContentLength"]), _version(answer))

    async def delete(self, key: str) -> None:
        await self.stat(key)  # S3 deletes are silent about missing keys; we are not
        with _s3(f"deleting {key}"):
            await self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    async def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        paginator = self._client.get_paginator("list_objects_v2")
        with _s3(f"listing {prefix or '/'}"):
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                for item in page.get("Contents", ()):
                    yield BlobInfo(
                        item["Key"][len(self.prefix) :],
                        int(item["Size"]),
                        f"{item['ETag'].strip(chr(34))}-{item['LastModified'].timestamp():.0f}",
                    )


def _version(answer: dict) -> str:
    return f"{answer['ETag'].strip(chr(34))}-{answer['LastModified'].timestamp():.0f}"
