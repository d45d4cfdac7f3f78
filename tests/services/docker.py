"""The real Docker engine, registry and base images, for integration tests.

They are started by contrib/setup-machine.sh (idempotent), which the fixtures run when a
service is missing. Set COG_TEST_SKIP_SERVICES=1 to skip these tests in a quick local
loop; CI never sets it, so there a missing service fails loudly.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from cog.testing.builder import registry_digest  # noqa: F401  (the tests' one way)

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = os.environ.get("COG_TEST_REGISTRY", "127.0.0.1:5000")
CPU_BASE = "python:3.11-slim"


def _skip_or_setup(what: str) -> None:
    if os.environ.get("COG_TEST_SKIP_SERVICES") == "1":
        pytest.skip(f"{what} not available and COG_TEST_SKIP_SERVICES=1")
    result = subprocess.run(
        ["bash", str(ROOT / "contrib" / "setup-machine.sh")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        pytest.fail(f"contrib/setup-machine.sh failed:\n{result.stdout}\n{result.stderr}")


def docker_ok() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def registry_ok() -> bool:
    try:
        with urllib.request.urlopen(f"http://{REGISTRY}/v2/", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def image_exists(ref: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", ref], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """The Docker Engine address the tests use (DOCKER_HOST or the default socket)."""
    if not docker_ok():
        _skip_or_setup("dockerd")
    return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")


@pytest.fixture(scope="session")
def registry(docker_engine) -> str:
    """host:port of a real registry that accepts pushes."""
    if not registry_ok():
        _skip_or_setup("the registry")
    return REGISTRY


@pytest.fixture(scope="session")
def base_images(docker_engine) -> dict[str, str]:
    if not image_exists(CPU_BASE):
        _skip_or_setup("the base images")
    return {"cpu": CPU_BASE}


def containers() -> set[str]:
    """IDs of every container on the engine (running or not)."""
    out = subprocess.run(
        ["docker", "ps", "-aq", "--no-trunc"], capture_output=True, text=True, check=True
    ).stdout
    return set(out.split())


@pytest.fixture
def no_leaked_containers(docker_engine):
    """Fails the test if it leaves a container behind.

    The engine removes a cancelled build step's container shortly after the client goes
    away, so removals get a few seconds to settle. It assumes no one else is using the
    engine meanwhile (true in CI).
    """
    before = containers()
    yield
    deadline = time.monotonic() + 10
    while (leaked := containers() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not leaked, f"containers left behind: {sorted(leaked)}"
