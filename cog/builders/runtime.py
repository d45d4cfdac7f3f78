"""The two wheels of this very cog installation that go into every image.

- :func:`runtime_wheel`, the inference server's: the installed ``cog`` package as it is
  (so the image runs the same code, at the same version, as the server that built it),
  installed into an environment of its own (``/opt/cog-runtime``) beside aiohttp, attrs
  and pyyaml. The server-only modules (aiodocker, structlog, ...) are never imported there.
- :func:`model_wheel`, the model's: only the pure-Python model API and the worker
  (:data:`MODEL_FILES`), with no dependencies at all, installed into the image's own
  Python, whose packages are the model's alone.

Both are deterministic, the same installed files giving the same bytes, so Docker's layer
cache recognises them from build to build.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import cog
from cog.config import RUNTIME_MIN_PYTHON

#: What the inference server (``python -m cog.runtime``) needs inside an image.
RUNTIME_REQUIREMENTS = ("aiohttp>=3.9", "attrs>=22.1", "pyyaml>=5.4")
_EPOCH = (1980, 1, 1, 0, 0, 0)


#: The files of the model's wheel (relative to the cog package): standard library only.
MODEL_FILES = (
    "__init__.py",
    "declarations.py",
    "model.py",
    "predictor.py",
    "signature.py",
    "types.py",
    "worker/",
)


@functools.lru_cache(maxsize=1)
def runtime_wheel() -> tuple[str, bytes]:
    """The inference server's wheel: its file name and bytes (built once per process)."""
    return _wheel(lambda relative: True, RUNTIME_REQUIREMENTS, "cog inference server")


@functools.lru_cache(maxsize=1)
def model_wheel() -> tuple[str, bytes]:
    """The model's wheel: the same file name as the server's (they go to different
    folders of the build context) and only MODEL_FILES."""
    return _wheel(_model_file, (), "cog model API (pure Python)")


def _model_file(relative: str) -> bool:
    return any(
        relative == name or (name.endswith("/") and relative.startswith(name))
        for name in MODEL_FILES
    )


def _wheel(
    include: Callable[[str], bool], requires: tuple[str, ...], summary: str
) -> tuple[str, bytes]:
    version = cog.__version__
    package_dir = Path(cog.__file__).resolve().parent
    dist_info = f"cog-{version}.dist-info"
    files: list[tuple[str, bytes]] = []
    for path in sorted(package_dir.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo"):
            continue
        relative = path.relative_to(package_dir).as_posix()
        if include(relative):
            files.append(("cog/" + relative, path.read_bytes()))
    metadata = "\n".join(
        [
            "Metadata-Version: 2.1",
            "Name: cog",
            f"Version: {version}",
            f"Summary: {summary}",
            "Requires-Python: >={}.{}".format(*RUNTIME_MIN_PYTHON),
            *(f"Requires-Dist: {req}" for req in requires),
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
