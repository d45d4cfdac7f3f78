"""Receiving an upload: the multipart ``file`` part streamed to a temp file while hashing.

The body never sits in memory: chunks are gathered into ~1 MiB batches, and each batch is
hashed, scanned (each member's CRC checked as it arrives: :mod:`cog.package.scan`) and
written in a worker thread while the next batch is being read from the socket (two
batches in memory at most). The size limit is enforced while streaming (413), so is an
idle limit (408: a client that stops sending holds its connection no longer), and any
failure, including the client going away mid-upload, removes the temp file.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import Awaitable, Mapping
from pathlib import Path
from typing import TypeVar

import attrs
from aiohttp import BodyPartReader, web

from cog.multipart import MalformedBody, parsing
from cog.package.scan import MemberScan, ScannedMember
from cog.units import format_size

T = TypeVar("T")
READ_CHUNK = 256 * 1024
BATCH = 1024 * 1024
FIELD = "file"
#: part encodings that leave the bytes as they are (the zip is sent as is)
IDENTITY = ("", "identity", "binary", "8bit", "7bit")


class UploadError(Exception):
    """A request that is not a usable upload (400)."""

    http_status = 400
    #: the connection cannot serve another request after this one (the body's framing
    #: is lost); the error response says `Connection: close`
    close_connection = False


class UndecodableBody(UploadError):
    close_connection = True


class UploadStalled(UploadError):
    http_status = 408
    close_connection = True

    def __init__(self, seconds: float):
        super().__init__(f"the upload stalled: nothing arrived for {seconds:g} seconds")


class UploadTooLarge(UploadError):
    http_status = 413

    def __init__(self, limit: int):
        super().__init__(f"upload is larger than the server's limit of {format_size(limit)}")


@attrs.frozen
class ReceivedUpload:
    path: Path
    package_id: str
    size: int
    #: the members checked as they arrived, by header offset (see PackageArchive.open)
    scanned: Mapping[int, ScannedMember] = attrs.field(factory=dict)


async def receive_upload(
    request: web.Request,
    tmp_dir: Path,
    max_bytes: int,
    idle_timeout: float = 60.0,
    *,
    max_members: int = 0,
) -> ReceivedUpload:
    """Stream the ``file`` field of a multipart upload to a new temp file under tmp_dir;
    UploadStalled when nothing arrives for idle_timeout seconds.

    Up to ``max_members`` members (the package limit) are checked as they arrive.
    The caller owns the returned file and must remove it.
    """
    # Refuse at once what declares itself too big; the multipart overhead is small.
    if request.content_length is not None and request.content_length > max_bytes + 64 * 1024:
        raise UploadTooLarge(max_bytes)
    if not request.content_type.startswith("multipart/"):
        raise UploadError(
            f"expected a multipart/form-data upload with a '{FIELD}' field, "
            f"got {request.content_type or 'no content type'}"
        )
    received: ReceivedUpload | None = None
    try:
        reader = await _parsing(request.multipart())
        while True:
            part = await _parsing(reader.next())
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise UploadError("nested multipart uploads are not supported")
            if part.name == FIELD and received is None:
                _check_part_encoding(part)
                scan = MemberScan(max_members)
                received = await _spool(part, tmp_dir, max_bytes, idle_timeout, scan)
            else:
                await _parsing(part.release())  # other fields are not ours; drain them
    except BaseException as exc:
        if received is not None:
            received.path.unlink(missing_ok=True)
        if isinstance(exc, (UndecodableBody, UploadStalled)):
            # The rest of the body cannot be read (aiohttp would try to drain it after the
            # response and log the stored error again): it ends here, and so does the
            # connection.
            request.content.feed_eof()
        raise
    if received is None:
        raise UploadError(f"the upload has no '{FIELD}' field (send the zip as {FIELD}=@pkg.zip)")
    return received


async def _spool(
    part: BodyPartReader,
    tmp_dir: Path,
    max_bytes: int,
    idle_timeout: float,
    scan: MemberScan,
) -> ReceivedUpload:
    fd, name = tempfile.mkstemp(prefix="upload-", suffix=".zip", dir=tmp_dir)
    path = Path(name)
    digest = hashlib.sha256()
    size = 0
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[None] | None = None
    try:
        with os.fdopen(fd, "wb") as file:

            def hash_and_write(data: bytes) -> None:
                digest.update(data)
                scan.feed(data)
                file.write(data)

            batch: list[bytes] = []
            batch_size = 0
            while True:
                try:
                    chunk = await asyncio.wait_for(
                        _parsing(part.read_chunk(READ_CHUNK)), idle_timeout
                    )
                except asyncio.TimeoutError:
                    raise UploadStalled(idle_timeout) from None
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise UploadTooLarge(max_bytes)
                batch.append(chunk)
                batch_size += len(chunk)
                if batch_size >= BATCH:
                    if pending is not None:
                        await pending
                    pending = loop.run_in_executor(None, hash_and_write, b"".join(batch))
                    batch, batch_size = [], 0
            if pending is not None:
                await pending
                pending = None
            if batch:
                await loop.run_in_executor(None, hash_and_write, b"".join(batch))
    except BaseException:
        if pending is not None:
            # Let the thread finish with the file before it is removed.
            await asyncio.gather(pending, return_exceptions=True)
        path.unlink(missing_ok=True)
        raise
    return ReceivedUpload(path=path, package_id=digest.hexdigest(), size=size, scanned=scan.members)


async def _parsing(step: Awaitable[T]) -> T:
    """Await one step of reading the multipart body; a malformed body is an UploadError."""
    try:
        return await parsing(step)
    except MalformedBody as exc:
        if exc.undecodable:
            raise UndecodableBody(f"malformed upload body: {exc}") from None
        raise UploadError(f"malformed multipart upload: {exc}") from None


def _check_part_encoding(part: BodyPartReader) -> None:
    """The file part must carry the zip's own bytes: they are hashed as they arrive."""
    for header in ("Content-Encoding", "Content-Transfer-Encoding"):
        value = part.headers.get(header, "").strip().lower()
        if value not in IDENTITY:
            raise UploadError(
                f"the '{FIELD}' part has {header}: {value}; send the zip's bytes as they "
                "are (no part encoding)"
            )
