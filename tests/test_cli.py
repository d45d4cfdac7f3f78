"""The `cog` command as users run it: real processes, a real `cog server` (store-only, so
no Docker is needed here; builds through the CLI are in tests/test_registry_build.py)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.registry_helpers import make_model_dir, post_package, raw_zip

COG = str(Path(sys.executable).parent / "cog")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout}s")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    environment = dict(os.environ)
    environment.pop("COG_REMOTE", None)
    environment["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    environment["NO_COLOR"] = "1"
    return environment


@contextlib.contextmanager
def cog_server(tmp_path: Path, env: dict[str, str], *options: str) -> Iterator[str]:
    """A real `cog server` process on a free port with file storage under tmp_path; yields
    its URL. Its log goes to tmp_path/server.log."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [
        COG, "server", "--host", "127.0.0.1", "--port", str(port),
        "--storage", f"file://{tmp_path / 'store'}", *options,
    ]  # fmt: skip
    with open(tmp_path / "server.log", "w") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for(f"{url}/ping")
            yield url
        finally:
            process.terminate()
            process.wait(timeout=30)


@pytest.fixture
def server(tmp_path: Path, env: dict[str, str]):
    with cog_server(tmp_path, env, "--builder", "none", "--cache-ttl", "0.2") as url:
        yield url


def cog(*args: str, env: dict[str, str], cwd: Path | None = None, check: bool = True):
    result = subprocess.run(
        [COG, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )
    if check and result.returncode != 0:
        raise AssertionError(f"cog {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def test_the_readme_flow_without_images(server, env, tmp_path):
    result = cog("remote", "set", server, env=env)
    assert server in result.stdout
    assert cog("remote", "show", env=env).stdout.strip() == server

    model = make_model_dir(tmp_path / "hello", name="test/hello")
    built = cog("build", env=env, cwd=model)
    last = built.stdout.strip().splitlines()[-1]
    assert last.startswith("--> Built ")
    package_id = last.split()[-1]
    assert len(package_id) == 64
    assert "Received package" in built.stdout

    listing = cog("list", env=env).stdout.splitlines()
    assert listing[0].split() == ["ID", "NAME", "STATUS", "CREATED"]
    assert listing[1].split()[:3] == [package_id[:12], "test/hello", "ready"]
    assert "ago" in listing[1] or "just now" in listing[1]

    shown = cog("show", package_id[:7], env=env).stdout
    assert package_id in shown and "infer.py:Model" in shown and "text (str" in shown
    document = json.loads(cog("show", package_id[:9], "--json", env=env).stdout)
    assert document["ID"] == package_id
    assert json.loads(cog("list", "--json", env=env).stdout)[0]["ID"] == package_id

    target = tmp_path / "pkg.zip"
    cog("download", package_id[:8], "-o", str(target), env=env)
    assert hashlib.sha256(target.read_bytes()).hexdigest() == package_id
    with urllib.request.urlopen(f"{server}/v1/packages/{package_id}.zip") as response:
        assert response.read() == target.read_bytes()

    events = cog("logs", package_id[:8], env=env, check=False)
    assert events.returncode == 1 and "no build log" in events.stderr  # store-only server

    assert "Deleted" in cog("delete", package_id[:10], env=env).stdout
    gone = cog("show", package_id, env=env, check=False)
    assert gone.returncode == 1
    assert gone.stderr.startswith("cog: error: no package matches")


def test_build_refuses_bad_config_with_every_problem(server, env, tmp_path):
    model = make_model_dir(tmp_path / "bad")
    (model / "cog.yaml").write_text(
        "model: infer.py:Nope\nenvironment:\n  python_packages: [numpy]\n  bogus: 1\n"
    )
    result = cog("--remote", server, "build", str(model), env=env, check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    for words in ("numpy", "bogus", "Nope"):
        assert words in result.stderr


def test_cog_remote_env_overrides_saved(server, env):
    cog("remote", "set", "http://127.0.0.1:9", env=env)
    env = {**env, "COG_REMOTE": server}
    assert cog("remote", "show", env=env).stdout.strip() == server
    assert cog("list", env=env).returncode == 0


def test_errors_are_one_line_without_traceback(env, tmp_path):
    env = {**env, "COG_REMOTE": f"http://127.0.0.1:{free_port()}"}
    for args in (("list",), ("show", "abcdef123"), ("download", "abcdef123")):
        result = cog(*args, env=env, check=False)
        assert result.returncode == 1, args
        assert result.stderr.count("\n") == 1, result.stderr
        assert "cannot reach the cog server" in result.stderr
        assert "Traceback" not in result.stderr
    result = cog("build", str(tmp_path), env=env, check=False)
    assert result.returncode == 1 and "no cog.yaml" in result.stderr
    result = cog("remote", "set", "ftp://x", env=env, check=False)
    assert result.returncode == 1 and "not a server URL" in result.stderr


def test_unknown_and_short_ids(server, env):
    env = {**env, "COG_REMOTE": server}
    result = cog("show", "abc", env=env, check=False)
    assert result.returncode == 1
    assert "package ID prefix 'abc' is too short: give at least 7 characters" in result.stderr
    result = cog("show", "0123456789", env=env, check=False)
    assert result.returncode == 1 and "no package matches" in result.stderr


def test_server_refuses_unknown_storage_scheme(env, tmp_path):
    result = cog(
        "server", "--port", str(free_port()), "--storage", "nosuch://x", env=env, check=False
    )
    assert result.returncode == 1
    assert "no storage backend for scheme 'nosuch'" in result.stderr
    assert "file" in result.stderr and "Traceback" not in result.stderr


def built_package(server: str, env: dict[str, str], tmp_path: Path) -> str:
    model = make_model_dir(tmp_path / "hello", name="test/hello")
    built = cog("--remote", server, "build", str(model), env=env)
    return built.stdout.strip().splitlines()[-1].split()[-1]


def one_error_line(result) -> str:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("cog: error: ")
    return result.stderr


def test_download_to_a_directory_or_a_path_that_cannot_be_written(server, env, tmp_path):
    env = {**env, "COG_REMOTE": server}
    package_id = built_package(server, env, tmp_path)

    into = tmp_path / "downloads"
    into.mkdir()
    result = cog("download", package_id[:8], "-o", str(into), env=env)
    saved = into / f"test-hello-{package_id[:12]}.zip"
    assert str(saved) in result.stdout
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == package_id
    assert sorted(p.name for p in into.iterdir()) == [saved.name]

    missing = tmp_path / "no" / "such" / "dir" / "x.zip"
    error = one_error_line(
        cog("download", package_id[:8], "-o", str(missing), env=env, check=False)
    )
    assert str(missing.parent) in error and "does not exist" in error

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    result = cog("download", package_id[:8], "-o", str(not_a_dir / "x.zip"), env=env, check=False)
    assert "is not a directory" in one_error_line(result)

    # A directory where nobody may create files, root included (sysfs): the OS's own error,
    # one line naming the file asked for (not the temp file beside it).
    if Path("/sys/kernel").is_dir():
        target = Path("/sys/kernel/cog-test.zip")
        error = one_error_line(
            cog("download", package_id[:8], "-o", str(target), env=env, check=False)
        )
        assert error == f"cog: error: {target}: Permission denied\n"
    assert not [p for p in tmp_path.rglob(".cog-download-*")]


def test_delete_json(server, env, tmp_path):
    env = {**env, "COG_REMOTE": server}
    package_id = built_package(server, env, tmp_path)
    result = json.loads(cog("delete", package_id[:8], "--json", env=env).stdout)
    assert result == {"ID": package_id, "Deleted": True}


@pytest.mark.parametrize(
    ("options", "refusal"),
    [
        ((), None),
        (("--max-unpacked-size", "2MiB"), "over the limit of 2.0 MiB"),
        (("--ratio-threshold", "1MiB", "--max-ratio", "50"), "over the ratio limit of 50"),
        (("--max-members", "2"), "over the limit of 2 (list what"),
        (("--max-text-size", "16"), "cog.yaml is too large to read as text"),
    ],
)
def test_package_limits_are_server_options(env, tmp_path, options, refusal):
    """The zip-bomb limits as an operator sets them: one package (3 files; 3 MiB of zeros
    deflated to a few kB) is taken or refused by a real `cog server`."""
    model = make_model_dir(tmp_path / "zeros", name="test/zeros")
    members = {p.name: p.read_bytes() for p in model.iterdir()}
    data = raw_zip({**members, "zeros.bin": bytes(3 * 1024 * 1024)})
    with cog_server(tmp_path, env, "--builder", "none", *options) as url:
        status, body = post_package(url, data)
    if refusal is None:
        assert status == 200 and body["Status"] == "ready", body
    else:
        assert status == 400 and refusal in body["error"], body


def test_package_limit_options_are_checked(env):
    for option, value in (
        ("--max-ratio", "0"),
        ("--max-members", "-1"),
        ("--max-unpacked-size", "lots"),
    ):
        result = cog("server", option, value, env=env, check=False)
        assert result.returncode == 2, (option, result)
        assert f"argument {option}" in result.stderr and "Traceback" not in result.stderr


def test_server_defaults_are_the_servers_own():
    """`cog server` with no options means what ServerSettings and PackageLimits default
    to: the flags' defaults are copies, and this keeps them from drifting apart."""
    from cog.cli.main import build_parser
    from cog.cli.serve import settings_from_args
    from cog.package import PackageLimits
    from cog.server.app import ServerSettings

    settings = settings_from_args(build_parser().parse_args(["server"]))
    assert settings.package_limits == PackageLimits()
    defaults = ServerSettings()
    assert (settings.max_upload_bytes, settings.cache_ttl) == (
        defaults.max_upload_bytes,
        defaults.cache_ttl,
    )
