"""Receiving an upload: the multipart ``file`` part streamed to a temp file while hashing.

The body never sits in memory: chunks are gathered into ~1 MiB batches, and each batch is
hashed and written in a worker thread while the next batch is being read from the socket
(two batches in memory at most). The size limit is enforced while streaming (413), and
any failure, including the client going away mid-upload, removes the temp file.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from pathlib import Path

import attrs
from aiohttp import BodyPartReader, web

READ_CHUNK = 256 * 1024
BATCH = 1024 * 1024
FIELD = "file"


class UploadError(Exception):
    """A request that is not a usable upload (400)."""

    http_status = 400


class UploadTooLarge(UploadError):
    http_status = 413

    def __init__(self, limit: int):
        super().__init__(f"upload is larger than the server's limit of {format_size(limit)}")


@attrs.frozen
class ReceivedUpload:
    path: Path
    package_id: str
    size: int


def format_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


async def receive_upload(request: web.Request, tmp_dir: Path, max_bytes: int) -> ReceivedUpload:
    """Stream the ``file`` field of a multipart upload to a new temp file under tmp_dir.

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
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as exc:
        raise UploadError(f"malformed multipart upload: {exc}") from exc

    received: ReceivedUpload | None = None
    try:
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise UploadError("nested multipart uploads are not supported")
            if part.name == FIELD and received is None:
                received = await _spool(part, tmp_dir, max_bytes)
            else:
                await part.release()  # other fields are not ours; drain them
    except BaseException:
        if received is not None:
            received.path.unlink(missing_ok=True)
        raise
    if received is None:
        raise UploadError(f"the upload has no '{FIELD}' field (send the zip as {FIELD}=@pkg.zip)")
    return received


async def _spool(part: BodyPartReader, tmp_dir: Path, max_bytes: int) -> ReceivedUpload:
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
                file.write(data)

            batch: list[bytes] = []
            batch_size = 0
            while True:
                chunk = await part.read_chunk(READ_CHUNK)
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
    return ReceivedUpload(path=path, package_id=digest.hexdigest(), size=size)
