"""A third-party storage plugin (contrib/cog-sqlite-storage), installed with pip into a
virtual environment of its own as an operator would, runs cog's shipped contract suite
(cog.testing) from its own tests: a plugin needs nothing from cog's repository but the
installed cog."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parent.parent / "contrib" / "cog-sqlite-storage"


@pytest.fixture(scope="module")
def before_install() -> str:
    return installed_here()


@pytest.fixture(scope="module")
def plugin_python(tmp_path_factory, before_install) -> str:
    """The python of a throwaway venv holding the plugin; cog and the test tools come
    from the environment running these tests (its site directory, .pth files and all),
    so nothing is downloaded and the running environment is left as it was."""
    venv = tmp_path_factory.mktemp("plugin-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    host = sysconfig.get_path("purelib")
    Path(site, "cog-host.pth").write_text(f"import site; site.addsitedir({host!r})\n")
    # Built with the host's setuptools (--no-build-isolation), so no index is needed; from
    # a copy, as setuptools leaves build/ and *.egg-info in the tree it builds.
    source = tmp_path_factory.mktemp("plugin-source") / "plugin"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__", ".pytest_cache"))  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--no-index", str(source)],
        check=True,
    )  # fmt: skip
    return python


def installed_here() -> str:
    return subprocess.run(
        [sys.executable, "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_the_plugin_is_installed_only_in_its_venv(plugin_python, before_install):
    assert installed_here() == before_install  # this environment was left alone
    found = subprocess.run(
        [plugin_python, "-c", "from cog.storage import available_schemes as a; print(a())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "'sqlite'" in found


def test_the_plugin_passes_the_shipped_contract(plugin_python):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    result = subprocess.run(
        [plugin_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"],
        cwd=PLUGIN,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # The contract's own tests ran there (not only the plugin's), none skipped.
    assert "test_streams_in_bounded_memory" not in result.stdout  # -q: names only on failure
    passed = int(summary.split(" passed")[0].split()[-1])
    from cog.testing.storage import StorageContract

    contract = [name for name in dir(StorageContract) if name.startswith("test_")]
    assert passed > len(contract), summary
    assert "skipped" not in summary and "failed" not in summary, summary
