"""The model's worker process as the inference server starts it: its command, and a start
before the event loop runs (see :mod:`cog.runtime.__main__`).

Standard library only, and none of it heavy: ``python -m cog.runtime`` imports this
before aiohttp, so that the worker imports the model while the server imports aiohttp.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess

#: Requests that may wait for a free inference slot (``--max-queue``'s default)
DEFAULT_MAX_QUEUE = 64


def worker_command(python: str, model: str, concurrency: int, fd: int, cancel_fd: int) -> list[str]:
    """``python -m cog.worker`` for ``model``, talking on socket ``fd``, cancelled through
    the pipe ``cancel_fd``; run in the package's directory (the model is relative to it)."""
    return [
        python,
        "-m",
        "cog.worker",
        "--fd",
        str(fd),
        "--cancel-fd",
        str(cancel_fd),
        "--model",
        model,
        "--dir",
        ".",
        "--concurrency",
        str(concurrency),
    ]


def cannot_start(python: str, error: OSError) -> str:
    """Why the worker did not start, as its failed setup tells it."""
    return f"cannot start {python}: {error}"


class StartedWorker:
    """A worker process started before the server's event loop, with the server's ends of
    its socket and of its cancel pipe, for the supervisor to adopt
    (:meth:`cog.runtime.supervisor.ModelWorker.adopt`)."""

    def __init__(
        self,
        process: subprocess.Popen,
        sock: socket.socket,
        cancel_pipe: int,
        started_at: dt.datetime,
    ) -> None:
        self.process = process
        self.sock = sock
        self.cancel_pipe = cancel_pipe
        self.started_at = started_at


def start_worker(
    python: str,
    model: str,
    *,
    directory: str,
    concurrency: int,
    env: dict[str, str] | None = None,
) -> StartedWorker:
    """Start the worker as the supervisor would (the same command, working directory,
    environment, socket pair and cancel pipe). Raises OSError when ``python`` cannot run."""
    started_at = dt.datetime.now(dt.timezone.utc)
    ours, theirs = socket.socketpair()
    cancel_read, cancel_write = os.pipe()
    try:
        process = subprocess.Popen(
            worker_command(python, model, concurrency, theirs.fileno(), cancel_read),
            cwd=directory,
            env=dict(os.environ if env is None else env),
            stdin=subprocess.DEVNULL,
            pass_fds=(theirs.fileno(), cancel_read),
        )
    except BaseException:
        ours.close()
        os.close(cancel_write)
        raise
    finally:
        theirs.close()
        os.close(cancel_read)
    return StartedWorker(process, ours, cancel_write, started_at)
