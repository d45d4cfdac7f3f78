"""cog.wheel_install, the cog step of every image: run as the Dockerfile runs it (from the
server's wheel, by another Python: a virtualenv's), on real wheels of this cog."""

from __future__ import annotations

import os
import subprocess
import sys
import venv

from cog.builders.runtime import model_wheel, runtime_wheel


def _wheels(tmp_path):
    paths = []
    for kind, (name, data) in (("server", runtime_wheel()), ("model", model_wheel())):
        (tmp_path / kind).mkdir()
        (tmp_path / kind / name).write_bytes(data)
        paths.append(str(tmp_path / kind / name))
    return paths


def _install(python, server, env_dir, model):
    env = {**os.environ, "PYTHONPATH": server}
    return subprocess.run(
        [python, "-m", "cog.wheel_install", server, str(env_dir), model],
        env=env, capture_output=True, text=True, timeout=120, cwd=os.path.dirname(server),
    )  # fmt: skip


def test_both_wheels_are_unpacked_and_compiled_without_pip(tmp_path):
    server, model = _wheels(tmp_path)
    venv.create(tmp_path / "venv", with_pip=False)  # no pip: the fast path needs none
    python = str(tmp_path / "venv" / "bin" / "python")
    result = _install(python, server, tmp_path / "runtime", model)
    assert result.returncode == 0, result.stderr
    runtime = tmp_path / "runtime" / "cog"
    assert (runtime / "runtime" / "__init__.py").exists()  # the whole package
    assert list((runtime / "__pycache__").glob("*.pyc"))
    found = subprocess.run(
        [python, "-c", "import cog, cog.worker, sys; print(cog.__file__, sys.prefix)"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    ).stdout.split()  # fmt: skip
    assert found[0].startswith(found[1]), found  # in the virtualenv's own site-packages
    site = os.path.dirname(os.path.dirname(found[0]))
    # Only the model's files there: no server module, and pip sees the distribution.
    assert not os.path.exists(os.path.join(site, "cog", "runtime"))
    assert os.path.exists(os.path.join(site, f"cog-{model_wheel()[0].split('-')[1]}.dist-info"))


def test_a_cog_installed_already_goes_through_pip(tmp_path):
    """One of the model's packages brought a cog: pip replaces it (here the virtualenv has
    no pip, so the attempt is what shows that the fast path was not taken)."""
    server, model = _wheels(tmp_path)
    venv.create(tmp_path / "venv", with_pip=False)
    python = str(tmp_path / "venv" / "bin" / "python")
    first = _install(python, server, tmp_path / "runtime", model)
    assert first.returncode == 0, first.stderr
    again = _install(python, server, tmp_path / "runtime", model)
    assert again.returncode != 0
    assert "No module named pip" in again.stderr
    assert sys.executable  # the test's own Python is never touched
