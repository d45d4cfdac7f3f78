"""Stand-in base images for Pythons that no Debian suite ships (3.8, 3.10), so that builds
on them are tested for real: the CPython that pyenv built on this machine, copied onto the
bookworm base image, tagged ``cog-test/python:<version>-slim``.

A test fixture, not the product's way: cog's base images come from Debian's suites
(contrib/setup-machine.sh). They live in a repository of their own, so the names of the
product's images (``python:3.8-slim``) keep meaning what the operator built; a server
under test reaches them with ``--base-image cpu=cog-test/python:{python_version}-slim``.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

from tests.services.docker import CPU_BASE

#: The server's base image template that finds the stand-ins.
STANDIN_TEMPLATE = "cog-test/python:{python_version}-slim"
STANDIN_VERSIONS = ("3.8", "3.10")
_LABEL = "org.cog-models.test-standin"
#: What the stand-in leaves out of pyenv's tree: CPython's own test suite (a third of it)
#: and GUI modules; and site-packages' .pth hooks, which this machine's own setup may have
#: added (a base image has none).
_SKIPPED = ("test", "idlelib", "tkinter")
#: Extension modules a model's packages need from the interpreter; the stand-in must load them.
_NEEDED = "ssl, ctypes, sqlite3, lzma, bz2, zlib, ensurepip, venv"


def pyenv_root() -> Path:
    return Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")


def pyenv_python(version: str) -> Path:
    """pyenv's newest build of a major.minor version (its prefix, e.g. .../versions/3.8.18)."""
    builds = sorted(
        (p for p in (pyenv_root() / "versions").glob(f"{version}.*") if p.name.count(".") == 2),
        key=lambda p: int(p.name.split(".")[2]),
    )
    if not builds:
        pytest.fail(
            f"no Python {version} under {pyenv_root()}/versions: the stand-in base images "
            "are made from the CPython builds pyenv has on these machines"
        )
    return builds[-1]


def _image_label(tag: str) -> str | None:
    result = subprocess.run(
        ["docker", "image", "inspect", "--format", f'{{{{index .Config.Labels "{_LABEL}"}}}}', tag],
        capture_output=True,
        text=True,
    )
    return result.stdout.strip() if result.returncode == 0 else None


def _image_id(ref: str) -> str:
    return subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", ref],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def _kept(version: str, info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    parts = Path(info.name).parts
    library = ("python", "lib", f"python{version}")
    if parts[:3] == library and len(parts) > 3 and parts[3] in _SKIPPED:
        return None
    if parts[:4] == (*library, "site-packages") and info.name.endswith(".pth"):
        return None
    return info


def build_standin(version: str) -> str:
    """The stand-in image for ``version`` (built once; again when pyenv's build or the
    bookworm base changes); its tag."""
    prefix = pyenv_python(version)
    tag = STANDIN_TEMPLATE.format(python_version=version)
    dockerfile = (
        f"FROM {CPU_BASE}\n"
        # The same place as on this machine: pyenv's build finds its libpython by that path.
        f"COPY python/ {prefix}/\n"
        # First on the PATH (python, python3, pip), before the distribution's Python, which
        # stays for apt's own use. Not symlinks: a linked interpreter may take the link's
        # folder for its prefix.
        f"ENV PATH={prefix}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    )
    recipe = hashlib.sha256(dockerfile.encode()).hexdigest()[:12]
    label = f"{prefix.name} on {_image_id(CPU_BASE)}, recipe {recipe}"
    if _image_label(tag) == label:
        return tag
    dockerfile += f'LABEL {_LABEL}="{label}"\n'
    with tempfile.TemporaryFile() as context:
        with tarfile.open(fileobj=context, mode="w") as tar:
            data = dockerfile.encode()
            info = tarfile.TarInfo("Dockerfile")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            tar.add(prefix, arcname="python", filter=lambda i: _kept(version, i))
        context.seek(0)
        subprocess.run(
            ["docker", "build", "-q", "--force-rm", "-t", tag, "-"],
            stdin=context,
            capture_output=True,
            check=True,
        )
    check = f'import sys, {_NEEDED}; print("%d.%d" % sys.version_info[:2], sys.prefix, end="")'
    ran = subprocess.run(
        ["docker", "run", "--rm", tag, "python", "-c", check], capture_output=True, text=True
    )
    if ran.returncode != 0 or ran.stdout != f"{version} {prefix}":
        subprocess.run(["docker", "rmi", tag], capture_output=True)
        pytest.fail(f"the stand-in {tag} does not run Python {version}: {ran.stdout}{ran.stderr}")
    return tag


@pytest.fixture(scope="session")
def standin_bases(base_images) -> str:
    """The base image template of a server whose CPU images are built on the stand-ins
    (3.8 and 3.10, from pyenv's builds); any other Python has no base image there."""
    for version in STANDIN_VERSIONS:
        build_standin(version)
    return STANDIN_TEMPLATE
