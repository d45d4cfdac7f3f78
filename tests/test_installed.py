"""cog as a wheel installs it: built from this checkout and installed into a virtual
environment of its own, its contract suites, data files and runtime all import from
there (not from this checkout)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import pathlib, sys
import cog, cog.testing, cog.testing.storage, cog.testing.builder, cog.cuda
import cog.builders.buildkit.pb
from cog.testing import BuilderContract, StorageContract
here = pathlib.Path(cog.__file__).resolve().parent
assert str(here).startswith(sys.prefix), here
assert cog.cuda.known_torch(), "the CUDA table is in the wheel"
assert (here / "builders" / "buildkit" / "pb" / "control.proto").is_file()
print("ok", here)
"""


def test_an_installed_cog_imports_its_contract_suites(tmp_path):
    # Built from a copy: setuptools leaves build/ and *.egg-info in the tree it builds.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".tox"))  # fmt: skip
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "-w", str(wheels), str(source)],
        check=True,
    )  # fmt: skip
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # Its dependencies (and pytest) from this environment's site directory, as a plain
    # path: its .pth files (an editable cog's finder among them) are not run.
    Path(site, "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    [wheel] = wheels.glob("cog-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
         str(wheel)],
        check=True,
    )  # fmt: skip
    result = subprocess.run([python, "-c", CHECK], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok ")
