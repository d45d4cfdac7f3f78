"""Helpers for registry tests: packages made from real directories, uploads, stored state."""

from __future__ import annotations

import asyncio
import io
import json
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path

import aiohttp

from cog.events import NDJSON
from cog.package import write_package

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

HELLO_MODEL = """\
import cog


class Model(cog.Model):
    def setup(self):
        self.greeting = "hello"

    @cog.input("text", type=str, help="Who to greet")
    def run(self, text):
        return f"{self.greeting} {text}"
"""


def make_model_dir(root: Path, *, name: str = "test/hello", extra: str = "") -> Path:
    """A small valid model directory (stdlib only)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "cog.yaml").write_text(
        f"name: {name}\nmodel: infer.py:Model\nenvironment:\n  python_version: '3.11'\n"
    )
    (root / "infer.py").write_text(HELLO_MODEL + extra)
    return root


def package_bytes(root: Path) -> tuple[bytes, str]:
    out = io.BytesIO()
    package_id = write_package(root, out)
    return out.getvalue(), package_id


def raw_zip(members: dict[str, bytes | str]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out.getvalue()


def form(data: bytes, field: str = "file") -> aiohttp.FormData:
    body = aiohttp.FormData()
    body.add_field(field, data, filename="package.zip", content_type="application/zip")
    return body


def spooled(root: Path) -> list[Path]:
    """The files a server holds under its temporary directory root (in its own directory
    there, see cog.server.workdir), but for its lock."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".lock")


async def nothing_spooled(root: Path, within: float = 10.0) -> None:
    """Wait until the server holds no upload under root. An upload's file is removed as
    its handler ends, which is just after a streamed answer's last byte has gone: a
    client can read the end of the answer before the removal."""
    deadline = asyncio.get_running_loop().time() + within
    while left := spooled(root):
        assert asyncio.get_running_loop().time() < deadline, f"left after {within:g}s: {left}"
        await asyncio.sleep(0.01)


async def stored_keys(storage) -> list[str]:
    return sorted([info.key async for info in storage.list("")])


def post_package(url: str, data: bytes, query: str = "") -> tuple[int, dict]:
    """Upload a zip to a server process as `curl -F file=@pkg.zip URL/v1/packages/upload`
    does: the status and the JSON answer."""
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
        f"{url}/v1/packages/upload{query}",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


async def upload_then_hang_up(client, data: bytes, marker: bytes) -> None:
    """Upload with a live build stream and leave, as a user pressing Ctrl-C does, once a
    line holding marker has arrived."""
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            client.make_url("/v1/packages/upload"), data=form(data), headers={"Accept": NDJSON}
        )
        async for line in response.content:
            if marker in line:
                break
        response.close()
