"""Installs cog's two wheels in an image being built, in one Python start and no pip start.

The Dockerfile's cog step (:mod:`cog.builders.dockerfile`) runs it from the server's wheel
itself (on ``PYTHONPATH``)::

    python -m cog.wheel_install SERVER_WHEEL SERVER_ENV MODEL_WHEEL

Both wheels are pure Python with no dependencies (:mod:`cog.builders.runtime`), so
installing one is what pip does with it: unpack it into its directory and compile its
modules. The server's goes into its own environment; the model's into the image's Python
(its purelib), unless a ``cog`` is installed there already (one of the model's packages
brought it), or that Python's purelib is not on its path: then pip installs it (replacing
the other cog), as before.

Standard library only, Python 3.8 and later: it runs on the image's Python.
"""

from __future__ import annotations

import compileall
import importlib.metadata
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path


def unpack(wheel: str, target: Path) -> None:
    """The wheel's files into target, its package compiled."""
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    if not compileall.compile_dir(str(target / "cog"), quiet=1):
        raise SystemExit(f"cog: could not compile the modules of {wheel} in {target}")


def cog_installed(purelib: Path, ours: str) -> bool:
    """Whether the image's Python has a cog already (not counting the wheel we run from,
    nor the directory we run in, which ``-m`` puts on the path)."""
    skip = {ours, os.getcwd()}
    path = [entry for entry in sys.path if entry and os.path.abspath(entry) not in skip]
    if any(True for _ in importlib.metadata.distributions(name="cog", path=path)):
        return True
    return (purelib / "cog").exists()


def main(argv: list[str]) -> None:
    server_wheel, server_env, model_wheel = argv
    unpack(server_wheel, Path(server_env))
    purelib = Path(sysconfig.get_path("purelib"))
    # Some Pythons name a purelib that is not on their path (Debian's before 3.10): pip
    # knows where it installs there.
    on_path = str(purelib) in {os.path.abspath(entry) for entry in sys.path if entry}
    if on_path and not cog_installed(purelib, os.path.abspath(server_wheel)):
        unpack(model_wheel, purelib)
        return
    # pip removes the other cog first; it must not see the wheel this runs from.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    pip = [sys.executable, "-m", "pip", "install", "--no-cache-dir", "--no-deps"]
    raise SystemExit(subprocess.run([*pip, "--force-reinstall", model_wheel], env=env).returncode)


if __name__ == "__main__":
    main(sys.argv[1:])
