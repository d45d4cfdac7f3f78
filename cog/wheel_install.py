"""Unpacks cog's two wheels for an image, in one Python start and no pip start.

The Dockerfile's cog stage (:mod:`cog.builders.dockerfile`) runs it from the server's
wheel itself (on ``PYTHONPATH``), on the image's Python::

    python -m cog.wheel_install SERVER_WHEEL MODEL_WHEEL ROOT

Both wheels are pure Python with no dependencies (:mod:`cog.builders.runtime`), so
installing one is what pip does with it: unpack it and compile its modules. The server's
goes to ``ROOT/opt/cog-runtime`` (its environment), the model's to ``ROOT/opt/cog-model``
(first on the image Python's path, by ``PYTHONPATH``, so that no cog of the model's
packages can shadow it). ROOT is a tree of ``/``: the final stage copies it in whole.

The modules are compiled against their sources' hashes, not their times: a copy into
another stage keeps them valid whatever it does to the files' times.

Standard library only, Python 3.8 and later: it runs on the image's Python.
"""

from __future__ import annotations

import compileall
import py_compile
import sys
import zipfile
from pathlib import Path

SERVER_ENV = "/opt/cog-runtime"
MODEL_ENV = "/opt/cog-model"


def unpack(wheel: str, root: Path, target: str) -> None:
    """The wheel's files into ``root/target``, its package compiled as found at target."""
    where = root / target.lstrip("/")
    where.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(where)
    compiled = compileall.compile_dir(
        str(where / "cog"),
        ddir=f"{target}/cog",  # the path tracebacks show, where the files end up
        quiet=1,
        invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
    )
    if not compiled:
        raise SystemExit(f"cog: could not compile the modules of {wheel} in {where}")


def main(argv: list[str]) -> None:
    server_wheel, model_wheel, root = argv
    unpack(server_wheel, Path(root), SERVER_ENV)
    unpack(model_wheel, Path(root), MODEL_ENV)


if __name__ == "__main__":
    main(sys.argv[1:])
