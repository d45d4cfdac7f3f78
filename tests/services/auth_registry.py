"""A real registry that wants a login: Debian's docker-registry (CNCF distribution) with
its htpasswd backend, on a free loopback port, one per test session.

The Docker Engine talks plain HTTP to registries on 127.0.0.0/8, so no TLS is needed
for it to send the basic-auth credentials. The htpasswd line is bcrypt, the only hash
distribution accepts (the `bcrypt` package of the test extra makes it).
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

USER, PASSWORD = "cog-pusher", "s3cret-for-tests"


@attrs.frozen
class AuthRegistry:
    #: host:port
    address: str
    user: str
    password: str

    def docker_config(self, password: str | None = None) -> dict:
        """A Docker config.json document with this registry's login (or a wrong one)."""
        secret = f"{self.user}:{self.password if password is None else password}"
        return {"auths": {self.address: {"auth": base64.b64encode(secret.encode()).decode()}}}

    def write_config(self, path: Path, password: str | None = None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.docker_config(password)))
        return path


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
    except urllib.error.HTTPError as error:
        return error.code == 401
    except OSError:
        return False
    return False


@pytest.fixture(scope="session")
def auth_registry(docker_engine) -> Iterator[AuthRegistry]:
    import bcrypt

    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.fail("docker-registry is not installed (contrib/setup-machine.sh installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(tempfile.mkdtemp(prefix="cog-auth-registry-"))
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    (root / "htpasswd").write_text(f"{USER}:{hashed}\n")
    (root / "config.yml").write_text(
        "version: 0.1\n"
        "log: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {root / 'data'}}}, delete: {{enabled: true}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}'}}\n"
        f"auth: {{htpasswd: {{realm: cog-test, path: {root / 'htpasswd'}}}}}\n"
    )
    with open(root / "registry.log", "w") as log:
        process = subprocess.Popen(
            [binary, "serve", str(root / "config.yml")], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 20
        while not _answers(f"http://127.0.0.1:{port}/v2/"):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"the htpasswd registry did not start: {(root / 'registry.log').read_text()}"
                )
            time.sleep(0.1)
        yield AuthRegistry(f"127.0.0.1:{port}", USER, PASSWORD)
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)
