"""How cog reaches a model that runs with no network: a Unix socket in a directory it
shares with the container.

A model container runs with ``--network none``: it has a loopback and nothing else, so
its code cannot open a connection to the cog server, the Docker Engine, any service of
the host, other containers or anything beyond (docs/security.md says why this and not a
firewalled bridge). Its runtime listens on a socket in a directory bind-mounted from
this machine (:class:`SocketDirectory`), and cog talks HTTP to it there
(:class:`ModelSocketConnector`).

The directory is writable from inside the container, so the model's code can put
something else where the socket should be: a symlink to a socket of the host (the
Docker Engine's, say) would have cog's requests, and their answers in a build log, go
there. The connector never follows one: it opens the path without following links,
checks that it is a socket, and connects through that open file.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

#: where the directory is mounted in the container, and the socket in it
CONTAINER_DIR = "/run/cog"
SOCKET_NAME = "model.sock"
#: the variable that tells the runtime (``python -m cog.runtime``) to listen there
SOCKET_ENV = "COG_UNIX_SOCKET"
#: what the directories are called, so that a sweep knows them
PREFIX = "cog-model-"


class NotASocket(OSError):
    """What is at the socket's path is not a socket (a link, a file): never connected to."""


class SocketDirectory:
    """A private directory (mode 0700, under `root`) holding one world-writable
    subdirectory that is mounted into the container: the model, whoever it runs as, can
    make its socket there; nobody else on this machine can reach it."""

    def __init__(self, root: Path | None = None):
        base = Path(root) if root is not None else Path(tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=base))
        self.shared = self.path / "run"
        self.shared.mkdir()
        os.chmod(self.shared, 0o777)

    @property
    def socket(self) -> Path:
        return self.shared / SOCKET_NAME

    def mount(self) -> dict[str, Any]:
        """The container's mount of the shared directory (Engine API ``Mounts``). A bind
        mount's source must exist on the engine's machine: an engine elsewhere refuses it."""
        return {"Type": "bind", "Source": str(self.shared), "Target": CONTAINER_DIR}

    def env(self) -> str:
        return f"{SOCKET_ENV}={CONTAINER_DIR}/{SOCKET_NAME}"

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def remove_directory_of(mount_source: str) -> None:
    """After its container is gone: remove a socket directory given its mount's source,
    if it is one of ours on this machine."""
    shared = Path(mount_source)
    if shared.name == "run" and shared.parent.name.startswith(PREFIX):
        shutil.rmtree(shared.parent, ignore_errors=True)


def open_socket(path: Path) -> int:
    """An O_PATH descriptor of the socket at path; NotASocket for anything else (a
    symlink is not followed: it is opened as the link it is)."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise NotASocket(errno.ENOTSOCK, f"{path} is not a socket")
    except BaseException:
        os.close(fd)
        raise
    return fd


class ModelSocketConnector(aiohttp.UnixConnector):
    """A Unix-socket connector that connects only to a socket, never through a link (see
    the module docstring). Connections are made one at a time: each points the
    connector at the descriptor it has just opened."""

    def __init__(self, path: Path, **kwargs: Any):
        super().__init__(str(path), **kwargs)
        self.socket_path = path
        self._connecting = asyncio.Lock()

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
        async with self._connecting:
            try:
                fd = open_socket(self.socket_path)
            except OSError as exc:
                raise aiohttp.ClientConnectorError(req.connection_key, exc) from None
            try:
                # /proc/self/fd/N reaches the very socket that was checked, whatever the
                # model has put at its path since.
                self._path = f"/proc/self/fd/{fd}"
                return await super()._create_connection(req, traces, timeout)
            finally:
                self._path = str(self.socket_path)
                os.close(fd)
