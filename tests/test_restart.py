"""A server killed outright (kill -9) leaves temporary files; the next one to start sweeps
them, and leaves alone those of servers still running. Real `cog server` processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.registry_helpers import make_model_dir, package_bytes
from tests.test_cli import COG, free_port, wait_for

BOUNDARY = "cogtestboundary"


class Server:
    def __init__(self, tmp_path: Path, env: dict[str, str], *options: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log = open(tmp_path / f"server-{self.port}.log", "w")  # noqa: SIM115 (the process's)
        self.process = subprocess.Popen(
            [COG, "server", "--port", str(self.port), "--builder", "none",
             "--storage", f"file://{tmp_path / 'store'}", *options],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        log.close()
        wait_for(f"{self.url}/ping")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def start_upload(server: Server, data: bytes) -> socket.socket:
    """An upload that stops halfway: the server is spooling it, and waits for the rest."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="p.zip"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    ).encode()
    filler = b"\0" * (2 * 1024 * 1024)
    request = (
        f"POST /v1/packages/upload HTTP/1.1\r\nHost: test\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(head) + len(data) + len(filler) * 2 + 100}\r\n\r\n"
    ).encode()
    connection = socket.create_connection(("127.0.0.1", server.port))
    connection.sendall(request + head + data + filler)
    return connection


def until(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {timeout:g}s"
        time.sleep(0.01)


def files(root: Path) -> list[Path]:
    """Every file under root but the servers' own lock files."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".lock")


@pytest.mark.parametrize("where", ["--tmp-dir", "TMPDIR"])
def test_a_restart_sweeps_what_a_killed_server_left(tmp_path, servers, where):
    root = tmp_path / "spool"
    env = {k: v for k, v in os.environ.items() if k != "COG_REMOTE"}
    options: tuple[str, ...] = ()
    if where == "--tmp-dir":
        options = ("--tmp-dir", str(root))
    else:  # the default: a directory under the system's temp dir, the same at each start
        env["TMPDIR"] = str(tmp_path / "system-tmp")
        (tmp_path / "system-tmp").mkdir()
        root = tmp_path / "system-tmp" / "cog-server"
    data, _ = package_bytes(make_model_dir(tmp_path / "hello"))

    def uploads() -> set[Path]:
        return set(root.rglob("upload-*"))

    # One server runs on throughout, in the middle of an upload...
    alive = Server(tmp_path, env, *options)
    servers.append(alive)
    alive_upload = start_upload(alive, data)
    until(lambda: len(uploads()) == 1, "spooling")
    its_own = uploads()
    # ...while another is killed in the middle of one.
    doomed = Server(tmp_path, env, *options)
    servers.append(doomed)
    doomed_upload = start_upload(doomed, data)
    until(lambda: len(uploads()) == 2, "spooling")
    doomed.kill()
    doomed_upload.close()
    left = files(root)
    assert len(left) == 2 and {p.name.split("-")[0] for p in left} == {"upload"}

    # The next one to start removes what the killed one left, and nothing of the other's.
    servers.append(Server(tmp_path, env, *options))
    assert files(root) == sorted(its_own)
    alive_upload.close()
    for server in servers:
        server.stop()
    assert files(root) == []
    assert [p.name for p in root.iterdir()] == []  # a clean stop removes its directory
