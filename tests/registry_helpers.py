"""Helpers for registry tests: packages made from real directories, uploads, stored state."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import aiohttp

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


async def stored_keys(storage) -> list[str]:
    return sorted([info.key async for info in storage.list("")])
