"""S3 storage (AWS or any S3-compatible store): ``s3://bucket/prefix?option=value``.

The backend parses its own URL options, uploads in multipart form and sweeps abandoned
uploads; botocore errors never leave this module: they become NotFound, StorageUnavailable
(the endpoint cannot be reached, answers 5xx, or refuses the credentials) or StorageError.
Operators' guide (options, failed uploads): docs/storage.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import re
from collections.abc import AsyncIterable, AsyncIterator
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore import exceptions as boto

from cog import units
from cog.storage import (
    BlobInfo,
    BlobReader,
    NotFound,
    Storage,
    StorageConfigError,
    StorageError,
    StorageUnavailable,
)

log = structlog.get_logger(__name__)

MIN_PART = 5 * 1024 * 1024
MAX_PARTS = 10_000  # S3 numbers parts 1..10000
READ_CHUNK = 1024 * 1024
_DURATION = re.compile(r"(\d+(?:\.\d*)?)\s*(|s|m|h|d)", re.IGNORECASE)
_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}
_UNAVAILABLE = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500"}
_DENIED = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "InvalidToken", "TokenRefreshRequired", "403",
}  # fmt: skip
_CREDENTIALS_HINT = (
    "check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
    "?profile=) and that they may use this bucket"
)


def parse_size(text: str) -> int:
    try:
        return units.parse_size(text)
    except ValueError as exc:
        raise StorageConfigError(str(exc)) from None


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``30m``, ``1h`` or ``7d``."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise StorageConfigError(f"not a duration: {text!r} (e.g. 1h, 30m, 90s)")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2].lower()]
    return float(match[1]) * unit


def translate(exc: BaseException, what: str) -> StorageError:
    """A botocore/aiohttp error as one of ours."""
    if isinstance(exc, boto.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        message = error.get("Message") or code
        if code in _NOT_FOUND or status == 404:
            return NotFound(what)
        if code in _DENIED or status == 403:
            # Unusable until an operator fixes it, but not a bug of ours: 503, not 500.
            return StorageUnavailable(
                f"S3 {what}: access denied ({message}, HTTP {status}): {_CREDENTIALS_HINT}"
            )
        if code in _UNAVAILABLE or status >= 500:
            return StorageUnavailable(f"S3 {what}: {message} (HTTP {status})")
        return StorageError(f"S3 {what}: {message} ({code})")
    if isinstance(exc, (boto.NoCredentialsError, boto.PartialCredentialsError)):
        return StorageUnavailable(f"S3 {what}: no usable credentials ({exc}): {_CREDENTIALS_HINT}")
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
        abort_incomplete_after: float = 3600.0,
        create_bucket: bool = False,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        retries: int = 2,
    ):
        if part_size < MIN_PART:
            raise StorageConfigError("part_size must be at least 5MiB (S3's minimum part)")
        if max_parts_in_flight < 1:
            raise StorageConfigError("max_parts_in_flight must be at least 1")
        if abort_incomplete_after < 0:
            raise StorageConfigError("abort_incomplete_after must not be negative")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint = endpoint
        self.region = region
        self.profile = profile
        self.part_size = part_size
        self.max_parts_in_flight = max_parts_in_flight
        self.abort_incomplete_after = abort_incomplete_after
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
        #: upload IDs of this process's multipart uploads in progress: never swept
        self._uploading: set[str] = set()
        self._sweeper: asyncio.Task | None = None
        #: aborts of failed writes, shielded: they outlive a cancelled write
        self._aborts: set[asyncio.Task] = set()

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
            "abort_incomplete_after", "create_bucket", "connect_timeout", "read_timeout",
            "retries",
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
                abort_incomplete_after=parse_duration(options.get("abort_incomplete_after", "1h")),
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
            try:
                with _s3(f"creating bucket {self.bucket}"):
                    await self._client.create_bucket(Bucket=self.bucket)
            except StorageError:
                await self.close()
                raise
        except StorageError:
            await self.close()
            raise
        if self.abort_incomplete_after:
            await self.abort_abandoned_uploads()
            self._sweeper = asyncio.create_task(self._sweep_every(self.abort_incomplete_after))

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        # Aborts of cancelled writes are let finish: they are what keeps S3 clean.
        await asyncio.gather(*self._aborts, return_exceptions=True)
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None
            self._client = None

    def _key(self, key: str) -> str:
        return self.prefix + key

    # -- abandoned multipart uploads ---------------------------------------------------

    async def abort_abandoned_uploads(self, older_than: float | None = None) -> int:
        """Abort the multipart uploads under the prefix started more than older_than
        seconds ago (default: abort_incomplete_after), except this process's own; how many
        were aborted.

        A failure is logged, not raised: sweeping is housekeeping, and a store whose
        credentials may not list uploads is still usable.
        """
        age = self.abort_incomplete_after if older_than is None else older_than
        cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=age)
        aborted = 0
        try:
            stale: list[tuple[str, str]] = []
            paginator = self._client.get_paginator("list_multipart_uploads")
            with _s3("listing multipart uploads"):
                async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                    for upload in page.get("Uploads", ()):
                        if upload["UploadId"] in self._uploading:
                            continue
                        if upload["Initiated"] < cutoff:
                            stale.append((upload["Key"], upload["UploadId"]))
            for key, upload_id in stale:
                try:
                    with _s3(f"aborting the upload of {key}"):
                        await self._client.abort_multipart_upload(
                            Bucket=self.bucket, Key=key, UploadId=upload_id
                        )
                except NotFound:
                    continue  # another server's sweep was first
                aborted += 1
        except StorageError as exc:
            log.warning("abandoned multipart uploads not swept", storage=repr(self), error=str(exc))
        if aborted:
            log.info("abandoned multipart uploads aborted", storage=repr(self), count=aborted)
        return aborted

    async def _sweep_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await self.abort_abandoned_uploads()
            except Exception:  # a bug here must not end the sweeps for good
                log.exception("sweep of abandoned multipart uploads failed", storage=repr(self))

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            with _s3(f"aborting the upload of {key}"):
                await self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=self._key(key), UploadId=upload_id
                )
        except NotFound:
            pass  # completed after all, or swept already
        except StorageError as exc:
            when = (
                f"the sweep aborts it once it is {self.abort_incomplete_after:g}s old"
                if self.abort_incomplete_after
                else "abort_incomplete_after=0: nothing will abort it; add a lifecycle rule"
            )
            log.warning(
                "failed multipart upload not aborted; its parts stay on S3 for now",
                key=key,
                upload_id=upload_id,
                error=str(exc),
                cleanup=when,
            )

    # -- the Storage primitives --------------------------------------------------------

    async def write(self, key: str, chunks: AsyncIterable[bytes]) -> BlobInfo:
        parts = _Parts(chunks, self.part_size)
        first = await parts.next()
        if first is None or first[1] < self.part_size:  # the whole blob: one PUT
            body, size = first or (b"", 0)
            with _s3(f"writing {key}"):
                answer = await self._client.put_object(
                    Bucket=self.bucket, Key=self._key(key), Body=body
                )
            return BlobInfo(key, size, _etag(answer))
        # Handed over, not kept here: a part in memory is one in flight or being filled.
        parts.push_back(first)
        del first
        return await self._multipart(key, parts)

    async def _multipart(self, key: str, parts: _Parts) -> BlobInfo:
        with _s3(f"writing {key}"):
            upload = await self._client.create_multipart_upload(
                Bucket=self.bucket, Key=self._key(key)
            )
        upload_id = upload["UploadId"]
        self._uploading.add(upload_id)
        etags: dict[int, str] = {}
        in_flight: set[asyncio.Task[None]] = set()
        size = 0

        async def send(number: int, data: io.BytesIO) -> None:
            with _s3(f"writing {key} (part {number})"):
                answer = await self._client.upload_part(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=data,
                )
            etags[number] = answer["ETag"]

        async def wait_for_parts(most: int) -> None:
            while len(in_flight) > most:
                done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    in_flight.discard(task)
                    task.result()

        try:
            part = await parts.next()
            for number in range(1, MAX_PARTS + 1):
                size += part[1]
                in_flight.add(asyncio.create_task(send(number, part[0])))
                # A slot must be free before the next part is read: no part waits in
                # memory for its turn.
                part = None
                await wait_for_parts(self.max_parts_in_flight - 1)
                part = await parts.next()
                if part is None:
                    break
            else:
                raise StorageError(
                    f"S3 writing {key}: more than {MAX_PARTS:,} parts; raise part_size"
                )
            await wait_for_parts(0)
            with _s3(f"writing {key}"):
                answer = await self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    UploadId=upload_id,
                    MultipartUpload={
                        "Parts": [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
                    },
                )
        except BaseException:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
            # Shielded so a cancelled write still aborts; a failed abort is logged, and
            # the sweep catches the upload later.
            aborting = asyncio.create_task(self._abort(key, upload_id))
            self._aborts.add(aborting)
            aborting.add_done_callback(self._aborts.discard)
            await asyncio.shield(aborting)
            raise
        finally:
            self._uploading.discard(upload_id)
        return BlobInfo(key, size, _etag(answer))

    @contextlib.asynccontextmanager
    async def open_reader(self, key: str) -> AsyncIterator[BlobReader]:
        with _s3(key):
            answer = await self._client.get_object(Bucket=self.bucket, Key=self._key(key))
        body = answer["Body"]
        try:
            info = BlobInfo(key, int(answer["ContentLength"]), _etag(answer))
            yield _S3Reader(info, body, key)
        finally:
            body.close()

    async def stat(self, key: str) -> BlobInfo:
        with _s3(key):
            answer = await self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        return BlobInfo(key, int(answer["ContentLength"]), _etag(answer))

    async def delete(self, key: str) -> None:
        await self.stat(key)  # S3 deletes are silent about missing keys; we are not
        with _s3(f"deleting {key}"):
            await self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    async def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        paginator = self._client.get_paginator("list_objects_v2")
        with _s3(f"listing {prefix or '/'}"):
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                for item in page.get("Contents", ()):
                    yield BlobInfo(item["Key"][len(self.prefix) :], int(item["Size"]), _etag(item))


class _Parts:
    """The stream cut into parts of exactly size bytes (the last one shorter), each with
    its length, rewound and ready to send; one part can be pushed back.

    Each part is filled in a BytesIO of its own and sent from it: aiohttp sends a BytesIO
    from its buffer as it is, where from bytes it would first copy them into one.
    """

    def __init__(self, chunks: AsyncIterable[bytes], size: int) -> None:
        self._chunks = chunks.__aiter__()
        self._size = size
        self._view = memoryview(b"")
        self._pushed: tuple[io.BytesIO, int] | None = None

    def push_back(self, part: tuple[io.BytesIO, int]) -> None:
        self._pushed = part

    async def next(self) -> tuple[io.BytesIO, int] | None:
        if self._pushed is not None:
            part, self._pushed = self._pushed, None
            return part
        part = io.BytesIO()
        while True:
            cut = self._size - part.tell()
            part.write(self._view[:cut])
            self._view = self._view[cut:]
            if part.tell() == self._size:
                break
            try:
                self._view = memoryview(await self._chunks.__anext__())
            except StopAsyncIteration:
                if not part.tell():
                    return None
                break
        length = part.tell()
        part.seek(0)
        return part, length


def _etag(answer: dict) -> str:
    """The version of a blob: its ETag, as written, HEADed, read or listed. It changes
    with the content; a rewrite with the very same bytes keeps it, as a cache wants."""
    return answer["ETag"].strip('"')
