"""cog.wheel_install, the cog step of every image: run as the Dockerfile runs it (from the
server's wheel, by another Python: a virtualenv's), on real wheels of this cog."""

from __future__ import annotations

import os
import subprocess
import venv

from cog.builders.runtime import model_wheel, runtime_wheel


def _wheels(tmp_path):
    paths = []
    for kind, (name, data) in (("server", runtime_wheel()), ("model", model_wheel())):
        (tmp_path / kind).mkdir()
        (tmp_path / kind / name).write_bytes(data)
        paths.append(str(tmp_path / kind / name))
    return paths


def _install(python, server, model, root):
    env = {**os.environ, "PYTHONPATH": server}
    return subprocess.run(
        [python, "-m", "cog.wheel_install", server, model, str(root)],
        env=env, capture_output=True, text=True, timeout=120, cwd=os.path.dirname(server),
    )  # fmt: skip


def test_both_wheels_are_unpacked_and_compiled_without_pip(tmp_path):
    server, model = _wheels(tmp_path)
    venv.create(tmp_path / "venv", with_pip=False)  # no pip: none is needed
    python = str(tmp_path / "venv" / "bin" / "python")
    result = _install(python, server, model, tmp_path / "root")
    assert result.returncode == 0, result.stderr
    runtime = tmp_path / "root" / "opt" / "cog-runtime" / "cog"
    assert (runtime / "runtime" / "__init__.py").exists()  # the whole package
    assert list((runtime / "__pycache__").glob("*.pyc"))
    model_env = tmp_path / "root" / "opt" / "cog-model"
    # Only the model's files there: no server module, and pip would see the distribution.
    assert (model_env / "cog" / "worker" / "main.py").exists()
    assert not (model_env / "cog" / "runtime").exists()
    assert (model_env / f"cog-{model_wheel()[0].split('-')[1]}.dist-info").is_dir()
    # Compiled against the sources' hashes (a copy into another stage may change the
    # files' times), and naming the paths where the files end up.
    pyc = next((model_env / "cog" / "__pycache__").glob("__init__.*.pyc")).read_bytes()
    assert int.from_bytes(pyc[4:8], "little") == 0b11  # hash-based, checked
    assert b"/opt/cog-model/cog/__init__.py" in pyc


def test_the_models_cog_wins_over_one_its_packages_brought(tmp_path):
    """The image's Python has /opt/cog-model first on its path (PYTHONPATH): a cog that
    one of the model's packages installed into site-packages does not shadow it."""
    server, model = _wheels(tmp_path)
    venv.create(tmp_path / "venv", with_pip=False)
    python = str(tmp_path / "venv" / "bin" / "python")
    assert _install(python, server, model, tmp_path / "root").returncode == 0
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    os.makedirs(os.path.join(site, "cog"))
    with open(os.path.join(site, "cog", "__init__.py"), "w") as other:
        other.write("raise ImportError('the other cog')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "root" / "opt" / "cog-model")}
    found = subprocess.run(
        [python, "-c", "import cog, cog.worker; print(cog.__file__)"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == str(
        tmp_path / "root" / "opt" / "cog-model" / "cog" / "__init__.py"
    )
