"""Models written for Cog in 2021, built unchanged as a new user would, with real `cog`
processes, a real server, engine and registry: run() with text; predict() with text; an
image model pinning Pillow 8.2.0 (wheels up to Python 3.9) with file examples, numeric
inputs, no python_version and cog.make_temp_path; the same written with predict() and
tempfile. Each builds on a Python 3.8 base image (the test stand-in of
tests/services/standins.py), passes its own examples in the image, and `cog infer`
reproduces its expected output files byte for byte. A Python that no base image has
fails naming it. Each fixture is built once for the module."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_cli import COG, cog_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cog2021"
#: fixture -> whether its cog.yaml names its Python
MODELS = {"shout": True, "reverse": False, "blur": False, "blur_predict": False}
DEFAULT_NOTE = "--> python_version not set: using 3.8, Cog's default"


class User:
    """`cog` as a user runs it: a config of their own, output piped (not a terminal)."""

    def __init__(self, home: Path):
        self.env = {
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / "config"),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        }

    def __call__(self, *argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [COG, *argv], capture_output=True, text=True, cwd=cwd, env=self.env, timeout=900
        )


@pytest.fixture(scope="module")
def built(tmp_path_factory, registry, standin_bases):
    """Each fixture copied as it is and built once with `cog build`: the user, the work
    folder, and per fixture the build's result and package ID."""
    home = tmp_path_factory.mktemp("cog2021")
    user = User(home)
    options = ("--docker-registry", registry, "--base-image", f"cpu={standin_bases}")
    with cog_server(home, user.env, *options) as url:
        assert user("remote", "set", url).returncode == 0
        results = {}
        for name in MODELS:
            model = shutil.copytree(FIXTURES / name, home / "models" / name)
            result = user("build", cwd=model)
            package_id = result.stdout.strip().splitlines()[-1].split()[-1]
            results[name] = (result, package_id)
        yield user, home, results


@pytest.mark.parametrize("name", list(MODELS))
def test_builds_unchanged_and_passes_its_own_examples(built, name):
    _, _, results = built
    result, package_id = results[name]
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == f"--> Built and pushed {package_id}"
    examples = yaml.safe_load((FIXTURES / name / "cog.yaml").read_text())["examples"]
    for number in range(1, len(examples) + 1):
        assert any(re.fullmatch(rf"\[cpu/test\] Example {number}: ok \(.*\)", x) for x in lines)
    # One line says when Cog's default Python is used; none when the package names it.
    assert lines.count(DEFAULT_NOTE) == (0 if MODELS[name] else 1)
    # Piped: plain text; the LABEL step short (it was a screen of escaped JSON).
    assert "\x1b" not in result.stdout + result.stderr
    (label,) = [x for x in lines if re.match(r"\[cpu/build\] Step \d+/\d+ : LABEL ", x)]
    assert len(label) < 400, label
    assert "Last lines of its output" not in result.stdout


@pytest.mark.parametrize("name", list(MODELS))
def test_the_image_runs_the_python_it_says(built, name):
    user, _, results = built
    _, package_id = results[name]
    shown = user("show", package_id[:12]).stdout
    assert "Python:   3.8" in shown
    # Named after its directory (none of them names itself).
    assert f"Name:     {name.replace('_', '-')}" in shown
    image = re.search(r"docker-cpu\s+(\S+)", shown)[1]
    ran = subprocess.run(
        ["docker", "run", "--rm", image, "python", "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert ran.stdout == "(3, 8)\n"


def infer_args(example: dict) -> list[str]:
    args = []
    for key, value in example["input"].items():
        args += ["-i", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return args


@pytest.mark.parametrize("name", ["shout", "reverse"])
def test_cog_infer_answers_the_text_examples(built, name):
    user, home, results = built
    _, package_id = results[name]
    for example in yaml.safe_load((FIXTURES / name / "cog.yaml").read_text())["examples"]:
        ran = user("infer", package_id[:12], *infer_args(example), cwd=home)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout == example["output"] + "\n"


@pytest.mark.parametrize("name", ["blur", "blur_predict"])
def test_cog_infer_reproduces_the_expected_files_byte_for_byte(built, name, tmp_path):
    """Run from a folder of the user's own (not the model's): the file input given with @
    from there, the output written there by default, and where it went said on stdout."""
    user, _, results = built
    _, package_id = results[name]
    examples = yaml.safe_load((FIXTURES / name / "cog.yaml").read_text())["examples"]
    for number, example in enumerate(examples):
        work = tmp_path / f"example-{number}"
        work.mkdir()
        args = []
        for key, value in example["input"].items():
            if isinstance(value, str) and value.startswith("@"):
                shutil.copy(FIXTURES / name / value[1:], work / Path(value[1:]).name)
                value = "@" + Path(value[1:]).name
            elif isinstance(value, bool):
                value = str(value).lower()
            args += ["-i", f"{key}={value}"]
        ran = user("infer", package_id[:12], *args, cwd=work)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout == "Written to output.png\n"
        expected = (FIXTURES / name / example["output"][1:]).read_bytes()
        assert (work / "output.png").read_bytes() == expected
        assert (work / "output.png").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_file_input_given_without_at_says_how(built, tmp_path):
    user, _, results = built
    _, package_id = results["blur"]
    ran = user("infer", package_id[:12], "-i", "input=examples/sample.png", cwd=tmp_path)
    assert ran.returncode == 1
    assert ran.stderr.endswith(
        "cog: error: input input is a file: write -i input=@examples/sample.png (a value "
        "without @ is sent as text)\n"
    )


def test_a_python_no_base_image_has_fails_naming_it(built):
    """3.12: no Debian suite ships it, and no stand-in is made of it."""
    user, home, _ = built
    model = shutil.copytree(FIXTURES / "shout", home / "models" / "shout-3.12")
    cog_yaml = model / "cog.yaml"
    cog_yaml.write_text(cog_yaml.read_text().replace('"3.8"', '"3.12"'))
    result = user("build", cwd=model)
    assert result.returncode == 1
    error = result.stderr.splitlines()[-1]
    assert error.startswith(
        "cog: error: no base image for Python 3.12: cog-test/python:3.12-slim is not on the "
        "Docker Engine (pulling it failed: "
    ), error
    assert "--base-image cpu=IMAGE" in error and "Traceback" not in result.stderr
