"""The server's own temporary directory, and the sweep of those that dead servers left.

Uploads are spooled, rebuilds fetch their zip, builds keep their live log and checks make
their model's socket directory in a directory of this server's own,
``<root>/server-<pid>-<random>`` (root: ``--tmp-dir``, else ``cog-server`` under the
system's temp dir, the same at every start). The server holds an exclusive lock
(``flock``) on its ``.lock`` file for as long as it runs; the kernel lets go of it when
the process ends, however it ends. So when a server starts, every sibling directory
whose lock it can take belonged to a server that is gone (killed outright, say), and is
removed; those of servers still running (several may share a root) are left alone. A
clean stop removes its own directory.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import structlog

log = structlog.get_logger("cog.server")

PREFIX = "server-"
LOCK = ".lock"
#: a directory without its lock file this old was left by a server that died starting
UNLOCKED_GRACE = 60.0


def default_root() -> Path:
    return Path(tempfile.gettempdir()) / "cog-server"


class WorkDir:
    """This server's temporary directory; see the module docstring."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir(mode=0o700)
        # Locked under another name, then named: whoever finds a .lock finds it held.
        making = self.path / f"{LOCK}.new"
        self._lock = os.open(making, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(making, self.path / LOCK)

    def sweep(self) -> list[Path]:
        """Remove the directories of servers that are gone; the files they held."""
        left: list[Path] = []
        for directory in sorted(self.root.glob(f"{PREFIX}*")):
            if directory == self.path or not directory.is_dir():
                continue
            if _owner_gone(directory):
                left += [p for p in directory.rglob("*") if p.is_file() and p.name != LOCK]
                shutil.rmtree(directory, ignore_errors=True)
        if left:
            log.info(
                "removed what stopped servers left",
                files=len(left),
                bytes=sum(_size(p) for p in left),
                root=str(self.root),
            )
        return left

    def close(self) -> None:
        """A clean stop: the directory goes, then the lock with the process."""
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock)


def _owner_gone(directory: Path) -> bool:
    try:
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        try:
            return time.time() - directory.stat().st_mtime > UNLOCKED_GRACE
        except FileNotFoundError:
            return False  # removed meanwhile by another server's sweep
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # its server holds it: alive
    finally:
        os.close(fd)  # our lock, if we took it, goes with the descriptor
    return True


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
