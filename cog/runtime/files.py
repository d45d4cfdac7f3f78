"""Files of ``/predictions``: inputs given as ``data:`` URIs or ``http(s)://`` URLs, stored
in the prediction's directory for the model; outputs sent back as ``data:`` URIs, or
uploaded (``PUT``) under an upload URL as Cog does when started with ``--upload-url``.

Downloads and uploads stream (a megabyte at a time, written and read in worker threads);
a ``data:`` URI is decoded in a worker thread. Inputs larger than ``MAX_INPUT_FILE``
are refused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import mimetypes
import os
import re
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit, urlunsplit

import aiohttp
from yarl import URL

from cog.signature import Argument
from cog.tls import load_certificates

#: The largest input file a prediction may download (bytes).
MAX_INPUT_FILE = 4 * 1024**3
_CHUNK = 1 << 20
_DATA = re.compile(r"data:(?P<type>[^,;]*)(?P<params>(?:;[^,;]*)*?)(?P<b64>;base64)?,", re.I)
_NAME = re.compile(r"[^A-Za-z0-9._-]")


class FileError(Exception):
    """An input file cannot be had, or an output file cannot be sent or uploaded."""


def _filename(url: str, content_type: str | None = None) -> str:
    """A safe file name for a URL's file: its path's last part, or ``file.<ext>``."""
    if url.startswith("data:"):
        ext = mimetypes.guess_extension(content_type or "") or ""
        return f"file{ext}"
    name = os.path.basename(urlsplit(url).path)
    name = _NAME.sub("_", name)[:200].lstrip(".")
    return name or "file"


def _decode_data(url: str) -> tuple[str, bytes]:
    match = _DATA.match(url)
    if match is None:
        raise FileError("a data: URI must look like data:[<type>][;base64],<data>")
    payload = url[match.end() :]
    try:
        if match.group("b64"):
            data = base64.b64decode(payload, validate=False)
        else:
            data = unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as e:
        raise FileError(f"the data: URI is not valid base64: {e}") from None
    return match.group("type") or "text/plain", data


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "xb") as f:
        f.write(data)


class Files:
    """The file side of predictions, with one HTTP client for downloads and uploads."""

    def __init__(self, upload_url: str | None = None) -> None:
        self.upload_url = upload_url
        self._session: aiohttp.ClientSession | None = None

    async def session(self) -> aiohttp.ClientSession:
        """The one client session; aiohttp's certificates loaded first (the server put
        them off when it imported aiohttp, and loads them in the background as it starts:
        a request in its first tenth of a second waits for them, off the event loop)."""
        if self._session is None:
            await asyncio.get_running_loop().run_in_executor(None, load_certificates)
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # -- inputs -------------------------------------------------------------------------

    async def fetch_inputs(
        self, arguments: dict[str, Argument], values: dict[str, Any], directory: str
    ) -> dict[str, Any]:
        """``values`` with every file URL replaced by the path of its file, stored under
        ``directory/inputs/<name>/``. Raises FileError."""
        fetched = dict(values)
        for name, argument in arguments.items():
            value = values.get(name)
            if not argument.is_file or value is None:
                continue
            folder = os.path.join(directory, "inputs", name)
            if argument.is_list:
                fetched[name] = [
                    await self.fetch(url, os.path.join(folder, str(i)), name)
                    for i, url in enumerate(value)
                ]
            else:
                fetched[name] = await self.fetch(value, folder, name)
        return fetched

    async def fetch(self, url: str, folder: str, name: str) -> str:
        """Store one input file in ``folder``; its path."""
        if url.startswith("data:"):
            content_type, data = await asyncio.to_thread(_decode_data, url)
            if len(data) > MAX_INPUT_FILE:
                raise FileError(f"input {name}: the file is larger than {MAX_INPUT_FILE} bytes")
            path = os.path.join(folder, _filename(url, content_type))
            await asyncio.to_thread(_write, path, data)
            return path
        path = os.path.join(folder, _filename(url))
        try:
            async with (await self.session()).get(url) as response:
                if response.status != 200:
                    raise FileError(f"input {name}: {url} answered HTTP {response.status}")
                if (response.content_length or 0) > MAX_INPUT_FILE:
                    raise FileError(f"input {name}: {url} is larger than {MAX_INPUT_FILE} bytes")
                await asyncio.to_thread(os.makedirs, folder, exist_ok=True)
                f = await asyncio.to_thread(open, path, "xb")
                try:
                    size = 0
                    async for chunk in response.content.iter_chunked(_CHUNK):
                        size += len(chunk)
                        if size > MAX_INPUT_FILE:
                            raise FileError(
                                f"input {name}: {url} is larger than {MAX_INPUT_FILE} bytes"
                            )
                        await asyncio.to_thread(f.write, chunk)
                finally:
                    await asyncio.to_thread(f.close)
        except aiohttp.ClientError as e:
            raise FileError(f"input {name}: cannot download {url}: {e or type(e).__name__}") from e
        except OSError as e:
            raise FileError(f"input {name}: cannot store {url}: {e.strerror or e}") from e
        return path

    # -- outputs ------------------------------------------------------------------------

    async def send(self, path: str) -> str:
        """An output file as the client gets it: a data: URI, or its uploaded URL."""
        if self.upload_url:
            return await self._upload(path)
        try:
            return await asyncio.to_thread(_data_uri, path)
        except OSError as e:
            raise FileError(f"the output file {path} cannot be read: {e.strerror or e}") from e

    async def _upload(self, path: str) -> str:
        name = os.path.basename(path)
        url = self.upload_url.rstrip("/") + "/" + name  # type: ignore[union-attr]
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        try:
            f = await asyncio.to_thread(open, path, "rb")
        except OSError as e:
            raise FileError(f"the output file {path} cannot be read: {e.strerror or e}") from e

        async def chunks():
            while chunk := await asyncio.to_thread(f.read, _CHUNK):
                yield chunk

        try:
            async with (await self.session()).put(
                url, data=chunks(), headers={"Content-Type": content_type}
            ) as response:
                if response.status >= 300:
                    raise FileError(f"uploading {name} to {url}: HTTP {response.status}")
                location = response.headers.get("Location") or url
        except aiohttp.ClientError as e:
            raise FileError(f"uploading {name} to {url}: {e or type(e).__name__}") from e
        finally:
            await asyncio.to_thread(f.close)
        parts = urlsplit(str(response.url.join(URL(location))))
        return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _data_uri(path: str) -> str:
    content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    with open(path, "rb") as f:
        encoded = base64.b64encode(f.read()).decode()
    return f"data:{content_type};base64,{encoded}"


def bytes_uri(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()
