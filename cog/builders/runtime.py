"""The cog runtime that goes into every image: a wheel of this very cog installation.

The wheel holds the installed ``cog`` package as it is (so the image runs the same code,
at the same version, as the server that built it) and declares only the runtime's
dependencies: the server-only ones (aiodocker, structlog, ...) are never imported inside
an image. It is deterministic, the same installed files giving the same bytes, so
Docker's layer cache recognises it from build to build.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import zipfile
from pathlib import Path

import cog
from cog.config import RUNTIME_MIN_PYTHON

#: What ``import cog`` and ``python -m cog.runtime`` need inside an image.
RUNTIME_REQUIREMENTS = ("aiohttp>=3.9", "attrs>=22.1", "pyyaml>=5.4")
_EPOCH = (1980, 1, 1, 0, 0, 0)


@functools.lru_cache(maxsize=1)
def runtime_wheel() -> tuple[str, bytes]:
    """The wheel's file name and bytes (built once per process)."""
    version = cog.__version__
    package_dir = Path(cog.__file__).resolve().parent
    dist_info = f"cog-{version}.dist-info"
    files: list[tuple[str, bytes]] = []
    for path in sorted(package_dir.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo"):
            continue
        files.append(("cog/" + path.relative_to(package_dir).as_posix(), path.read_bytes()))
    metadata = "\n".join(
        [
            "Metadata-Version: 2.1",
            "Name: cog",
            f"Version: {version}",
            "Summary: cog model runtime",
            "Requires-Python: >={}.{}".format(*RUNTIME_MIN_PYTHON),
            *(f"Requires-Dist: {req}" for req in RUNTIME_REQUIREMENTS),
            "",
        ]
    )
    wheel = "Wheel-Version: 1.0\nGenerator: cog\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files += [(f"{dist_info}/METADATA", metadata.encode()), (f"{dist_info}/WHEEL", wheel.encode())]
    record = [f"{name},sha256={_digest(data)},{len(data)}" for name, data in files]
    record.append(f"{dist_info}/RECORD,,")
    files.append((f"{dist_info}/RECORD", ("\n".join(record) + "\n").encode()))

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in files:
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data, compresslevel=6)
    return f"cog-{version}-py3-none-any.whl", out.getvalue()


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
