"""The build context: a tar streamed straight from the package zip, never unpacked to disk.

Layout (see :mod:`cog.builders.dockerfile`): ``Dockerfile``, ``cog/server/<wheel>`` (the
inference server's), ``cog/model/<wheel>`` (the model's API), ``package/<every file of
the zip>``. Headers are fixed (mtime 0, root owner, modes from the
zip), so the same package always gives the same tar and the builders' caches hit.
"""

from __future__ import annotations

import asyncio
import tarfile
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from cog.builders.runtime import model_wheel, runtime_wheel

CHUNK = 1024 * 1024
BLOCK = tarfile.BLOCKSIZE


def _header(name: str, size: int, mode: int = 0o644) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8")


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def _file(name: str, data: bytes, mode: int = 0o644) -> bytes:
    return _header(name, len(data), mode) + data + _padding(len(data))


def _zip_mode(info: zipfile.ZipInfo) -> int:
    mode = (info.external_attr >> 16) & 0o777
    return 0o755 if mode & 0o111 else 0o644


def _members(zip_path: Path) -> Iterator[bytes]:
    """Blocking: the package's part of the tar, header then data in chunks."""
    with zipfile.ZipFile(zip_path) as archive:
        for info in sorted(archive.infolist(), key=lambda i: i.filename):
            if info.is_dir():
                continue
            yield _header(f"package/{info.filename}", info.file_size, _zip_mode(info))
            with archive.open(info) as member:
                while chunk := member.read(CHUNK):
                    yield chunk
            yield _padding(info.file_size)


async def build_context(zip_path: Path, dockerfile: str) -> AsyncIterator[bytes]:
    """The whole context tar as chunks; zip reads happen in a worker thread."""
    yield _file("Dockerfile", dockerfile.encode())
    for folder, (wheel_name, wheel) in (("server", runtime_wheel()), ("model", model_wheel())):
        yield _file(f"cog/{folder}/{wheel_name}", wheel)
    members = _members(zip_path)
    loop = asyncio.get_running_loop()
    reading: asyncio.Future[bytes | None] | None = None
    try:
        while True:
            reading = loop.run_in_executor(None, next, members, None)
            # shield: a cancelled build must not abandon a read still running in its thread
            chunk = await asyncio.shield(reading)
            if chunk is None:
                break
            yield chunk
    finally:
        if reading is not None and not reading.done():
            await asyncio.wait([reading])  # closing a generator mid-read raises ValueError
        await loop.run_in_executor(None, members.close)
    yield b"\0" * (2 * BLOCK)
