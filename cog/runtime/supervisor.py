"""The model's worker process, seen from the inference server: start it, hand it
predictions, cancel them, and restart it when it dies.

The worker (``python -m cog.worker``, :mod:`cog.worker.main`) runs in the image's own
Python, whose environment holds the model's packages and nothing of cog but its
pure-Python API; this server runs in an environment of its own. They talk over a socket
(:mod:`cog.worker.protocol`).

Predictions beyond ``concurrency`` wait here, up to ``max_queue`` of them; more are
refused (:class:`Busy`). A queued prediction whose caller gives up is dropped; a running
one is cancelled in the worker when asked (``cancel``), and when it does not stop within
``cancel_grace`` seconds the worker is killed and started again. A worker that dies makes
its running predictions fail with its exit status; it is started again (the state is
``defunct`` meanwhile, and stays so if its setup then fails). Its first process may have
been started before the event loop (:mod:`cog.runtime.worker_process`): it is adopted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import enum
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Any, Callable

import attrs

from cog.runtime.worker_process import (
    DEFAULT_MAX_QUEUE,
    StartedWorker,
    cannot_start,
    worker_command,
)
from cog.signature import Argument, Signature
from cog.worker.protocol import Decoder, ProtocolError, encode

logger = logging.getLogger("cog.runtime")
model_logger = logging.getLogger("cog.model")

#: Seconds a cancelled synchronous prediction may take to stop before its worker is killed.
DEFAULT_CANCEL_GRACE = 5.0
#: The setup logs /health-check keeps (the last ones).
_SETUP_LOG_LINES = 1000


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    DEFUNCT = "defunct"
    STOPPING = "stopping"


class NotReady(Exception):
    """The model cannot take a prediction now (starting, failed, defunct or stopping)."""

    def __init__(self, state: State, error: str | None = None) -> None:
        self.state = state
        self.error = error
        messages = {
            State.STARTING: "the model is starting",
            State.FAILED: f"the model failed to start: {error}",
            State.DEFUNCT: f"the model's process died: {error}",
            State.STOPPING: "the server is shutting down",
        }
        super().__init__(messages.get(state, state.value))


class Busy(Exception):
    """Every prediction slot and queue place is taken."""


class ModelError(Exception):
    """What the model raised, as the worker told it ("ValueError: ...")."""


@attrs.frozen
class Outcome:
    """What one prediction did: a value, or why it failed or was canceled; its seconds."""

    value: Any
    error: BaseException | None
    seconds: float
    canceled: bool = False


@attrs.define
class Setup:
    """The setup of the model, as /health-check tells it."""

    started_at: dt.datetime | None = None
    completed_at: dt.datetime | None = None
    #: starting, succeeded or failed
    status: str = "starting"
    logs: collections.deque[str] = attrs.field(
        factory=lambda: collections.deque(maxlen=_SETUP_LOG_LINES)
    )


@attrs.define(eq=False)
class _Job:
    id: str
    message: dict[str, Any]
    future: asyncio.Future[Outcome | None]
    on_output: Callable[[Any], None] | None
    on_log: Callable[[str], None] | None
    on_start: Callable[[], None] | None = None
    running: bool = False
    cancel_asked: bool = False
    #: the caller no longer waits: the outcome goes to on_abandon
    on_abandon: Callable[[], None] | None = None
    abandoned: bool = False
    #: what an iterator yielded, when nobody takes the items as they come
    collected: list[Any] | None = None


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class _Channel(asyncio.Protocol):
    def __init__(self, owner: ModelWorker) -> None:
        self.owner = owner
        self.decoder = Decoder()

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
        except ProtocolError as e:
            logger.error("the model's worker sent garbage (%s); restarting it", e)
            self.owner._kill()
            return
        handle = self.owner._handle
        for message in messages:
            handle(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost(self)


class _AdoptedProcess:
    """A worker started with subprocess.Popen before the event loop ran, with what the
    supervisor uses of an asyncio.subprocess.Process (pid, returncode, wait, kill).

    A thread waits for its exit, as asyncio's own child watcher does for the processes it
    starts (one thread each): the event loop never blocks on it."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.returncode: int | None = None
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = loop.create_future()
        self._thread = threading.Thread(
            target=self._wait, args=(loop,), name=f"wait-worker-{self.pid}", daemon=True
        )
        self._thread.start()

    def _wait(self, loop: asyncio.AbstractEventLoop) -> None:
        code = self._popen.wait()
        # A closed loop: the server is gone, and nobody waits any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._exit, code)

    def _exit(self, code: int) -> None:
        self.returncode = code
        if not self._exited.done():
            self._exited.set_result(code)

    async def wait(self) -> int:
        # Shielded: a caller's timeout must not end the watch for everyone else.
        return await asyncio.shield(self._exited)

    async def waited(self) -> None:
        """The thread that waited for the exit has ended too (it tells the exit just
        before it ends): nothing of it runs on while the interpreter shuts down."""
        await self.wait()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def kill(self) -> None:
        # Popen knows whether its waiter reaped the PID already (then it may be another's).
        self._popen.kill()


class ModelWorker:
    """The model in its worker process, with bounded concurrency and a bounded queue."""

    def __init__(
        self,
        model: str,
        *,
        directory: str = ".",
        concurrency: int = 1,
        max_queue: int = DEFAULT_MAX_QUEUE,
        python: str | None = None,
        env: dict[str, str] | None = None,
        cancel_grace: float = DEFAULT_CANCEL_GRACE,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be 1 or more, not {concurrency}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be 0 or more, not {max_queue}")
        #: "predict.py:Predictor" (relative to directory) or "module.name:Class"
        self.model = model
        self.directory = directory
        self.concurrency = concurrency
        self.max_queue = max_queue
        self.python = python or sys.executable
        self.env = env
        self.cancel_grace = cancel_grace
        self.state = State.STARTING
        #: why setup failed or the worker died (one line; the traceback is in the log)
        self.error: str | None = None
        self.signature: Signature | None = None
        #: the signature's arguments by name
        self.arguments: dict[str, Argument] = {}
        #: some input is a file (predictions then fetch their URLs)
        self.has_files = False
        self.model_name = ""
        self.model_doc = ""
        self.is_async = False
        #: seconds the model's setup took
        self.setup_time: float | None = None
        self.setup = Setup()
        self._ids = itertools.count(1)
        self._process: asyncio.subprocess.Process | _AdoptedProcess | None = None
        self._transport: asyncio.Transport | None = None
        self._channel: _Channel | None = None
        self._cancel_pipe: int | None = None
        self._running: dict[str, _Job] = {}
        self._waiting: collections.deque[_Job] = collections.deque()
        self._admitted = 0
        self._ready: asyncio.Future[None] | None = None
        self._idle: asyncio.Event | None = None
        self._restarting = False
        self._closing = False
        self._exit_watch: asyncio.Future[None] | None = None

    # -- life ---------------------------------------------------------------------------

    @property
    def admitted(self) -> int:
        """Requests between admission and their answer (running, queued or reading input)."""
        return self._admitted

    @property
    def busy(self) -> bool:
        """Every slot is taken."""
        return len(self._running) >= self.concurrency

    async def start(self) -> None:
        """Start the worker; setup runs in the background (see wait_started)."""
        self._idle = asyncio.Event()
        await self._spawn()

    async def adopt(self, started: StartedWorker) -> None:
        """Take over a worker already started (with this worker's command, see
        :mod:`cog.runtime.worker_process`) instead of starting one; as start() otherwise."""
        self._idle = asyncio.Event()
        self._ready = asyncio.get_running_loop().create_future()
        self.setup = Setup(started_at=started.started_at)
        self._process = _AdoptedProcess(started.process)
        await self._connect(started.sock, started.cancel_pipe)

    def fail(self, error: str) -> None:
        """The model cannot even be started (its cog.yaml names none): a failed setup."""
        self._ready = asyncio.get_running_loop().create_future()
        self.setup = Setup(started_at=now())
        self._setup_over(State.FAILED, error)

    async def wait_started(self) -> State:
        """Wait until setup has finished (or failed); the state then."""
        if self._ready is not None:
            await asyncio.wait([self._ready])
        return self.state

    async def _spawn(self) -> None:
        self._ready = asyncio.get_running_loop().create_future()
        self.setup = Setup(started_at=now())
        ours, theirs = socket.socketpair()
        cancel_read, cancel_write = os.pipe()
        env = dict(os.environ if self.env is None else self.env)
        try:
            self._process = await asyncio.create_subprocess_exec(
                *worker_command(
                    self.python, self.model, self.concurrency, theirs.fileno(), cancel_read
                ),
                cwd=self.directory,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(), cancel_read),
            )
        except OSError as e:
            ours.close()
            os.close(cancel_write)
            self._setup_over(State.FAILED, cannot_start(self.python, e))
            return
        finally:
            theirs.close()
            os.close(cancel_read)
        await self._connect(ours, cancel_write)
        logger.info("started the model's worker process (pid %d)", self._process.pid)

    async def _connect(self, ours: socket.socket, cancel_write: int) -> None:
        self._cancel_pipe = cancel_write
        self._transport, self._channel = await asyncio.get_running_loop().create_connection(
            lambda: _Channel(self), sock=ours
        )

    def _setup_over(self, state: State, error: str | None = None) -> None:
        self.setup.completed_at = now()
        self.setup.status = "succeeded" if state is State.READY else "failed"
        if self.state is not State.STOPPING:
            if state is not State.READY and self._restarting:
                state = State.DEFUNCT  # it worked once, and does not any more
            self.state = state
        self.error = error
        self._restarting = False
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)
        if state is State.READY:
            self._dispatch()
        else:
            for job in list(self._waiting):
                self._waiting.remove(job)
                self._settle(job, Outcome(None, ModelError(str(NotReady(state, error))), 0.0))

    # -- messages from the worker -------------------------------------------------------

    def _handle(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "log":
            job = self._running.get(message.get("id") or "")
            line = message.get("line", "")
            tag = job.id if job is not None else "setup"
            model_logger.info(
                "[%s] %s: %s", tag, message.get("stream"), line, extra={"request_id": tag}
            )
            if job is not None:
                if job.on_log is not None:
                    job.on_log(line)
            elif message.get("id") is None:
                self.setup.logs.append(line)
        elif op == "output":
            job = self._running.get(message["id"])
            if job is None:
                return
            if job.on_output is not None:
                job.on_output(message.get("value"))
            else:
                if job.collected is None:
                    job.collected = []
                job.collected.append(message.get("value"))
        elif op == "done":
            job = self._running.pop(message["id"], None)
            if job is None:
                return
            status = message.get("status")
            value = message.get("value")
            if job.collected is not None and value is None:
                value = job.collected  # an iterator's items are its output
            outcome = Outcome(
                value,
                ModelError(message.get("error") or "failed") if status == "failed" else None,
                float(message.get("seconds") or 0.0),
                canceled=status == "canceled",
            )
            self._settle(job, outcome)
            self._dispatch()
        elif op == "loaded":
            self.signature = Signature.from_json(message["signature"])
            self.arguments = {a.name: a for a in self.signature.arguments}
            self.has_files = any(a.is_file for a in self.signature.arguments)
            self.model_name = message.get("name") or ""
            self.model_doc = message.get("doc") or ""
            self.is_async = bool(message.get("async"))
            logger.info("loaded %s", self.model_name)
        elif op == "ready":
            self.setup_time = float(message.get("setup_time") or 0.0)
            logger.info("setup() done in %.3fs; ready", self.setup_time)
            self._setup_over(State.READY)
        elif op == "failed":
            error = message.get("error") or "setup failed"
            logger.error("setup failed: %s", error)
            self._setup_over(State.FAILED, error)

    def _lost(self, channel: _Channel) -> None:
        """The worker's socket closed: it exited (or was killed)."""
        if channel is not self._channel:
            return
        self._channel = self._transport = None
        if self._cancel_pipe is not None:
            os.close(self._cancel_pipe)
            self._cancel_pipe = None
        self._exit_watch = asyncio.ensure_future(self._after_exit())

    async def _after_exit(self) -> None:
        code = await self._process.wait() if self._process is not None else None
        if self._closing:
            return
        if self.state in (State.FAILED, State.DEFUNCT) and not self._running:
            return  # its setup failed: it had nothing more to do
        why = f"the model's process exited (code {code})"
        if code is not None and code < 0:
            why = f"the model's process was killed ({signal.Signals(-code).name})"
        if self.setup.completed_at is None:
            # It died before its setup was over: starting it again would do the same.
            logger.error("%s during setup", why)
            self._setup_over(State.FAILED, f"{why} during setup")
            return
        logger.error("%s; starting it again", why)
        for job in list(self._running.values()):
            self._running.pop(job.id, None)
            canceled = job.cancel_asked
            self._settle(job, Outcome(None, None if canceled else ModelError(why), 0.0, canceled))
        if self.state is State.STOPPING:
            self._check_idle()
            return
        self.state = State.DEFUNCT
        self.error = why
        self._restarting = True
        await self._spawn()

    # -- predictions --------------------------------------------------------------------

    def admit(self) -> None:
        """Take a place for one request, or raise NotReady or Busy. Pair with release()."""
        if self.state is not State.READY:
            raise NotReady(self.state, self.error)
        if self._admitted >= self.concurrency + self.max_queue:
            raise Busy(
                f"busy: {self.concurrency} running and {self.max_queue} waiting; try again later"
            )
        self._admitted += 1

    def release(self) -> None:
        self._admitted -= 1
        self._check_idle()

    def new_id(self) -> str:
        return f"p{next(self._ids)}"

    async def run(
        self,
        inputs: dict[str, Any],
        tag: str,
        *,
        directory: str = "",
        on_output: Callable[[Any], None] | None = None,
        on_log: Callable[[str], None] | None = None,
        on_abandon: Callable[[], None] | None = None,
        cancel_on_abandon: bool = False,
        on_start: Callable[[], None] | None = None,
    ) -> Outcome:
        """Run one prediction in the worker, after those queued before it.

        Raises NotReady if shutdown began before it started. If the caller is cancelled,
        a queued prediction is dropped (``on_abandon`` at once); a running one is
        cancelled in the worker when ``cancel_on_abandon`` (else it finishes), and
        ``on_abandon`` is called when it is over.
        """
        if self.state is State.STOPPING:
            raise NotReady(self.state)
        if tag in self._running or any(job.id == tag for job in self._waiting):
            raise ValueError(f"a prediction {tag} is running already")
        message = {"op": "predict", "id": tag, "inputs": inputs, "dir": directory}
        future = asyncio.get_running_loop().create_future()
        job = _Job(tag, message, future, on_output, on_log, on_start)
        job.on_abandon = on_abandon
        if self.state is State.READY and not self._waiting and not self.busy:
            self._send_job(job)
        else:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "[%s] queued (%d running, %d waiting before it)",
                    tag,
                    len(self._running),
                    len(self._waiting),
                )
            self._waiting.append(job)
        try:
            outcome = await job.future  # cancelling the caller cancels this future only
        except asyncio.CancelledError:
            if not job.future.cancelled():  # the outcome came with the cancellation
                if on_abandon is not None:
                    on_abandon()
                raise
            job.abandoned = True
            if job in self._waiting:
                self._waiting.remove(job)
                logger.info("[%s] the client hung up; dropped from the queue", tag)
                if on_abandon is not None:
                    on_abandon()
            elif cancel_on_abandon:
                self.cancel(tag)
            raise
        if outcome is None:
            raise NotReady(State.STOPPING)
        return outcome

    def _send_job(self, job: _Job) -> None:
        assert self._transport is not None
        job.running = True
        self._running[job.id] = job
        self._transport.write(encode(job.message))
        if job.on_start is not None:
            job.on_start()

    def _dispatch(self) -> None:
        while self._waiting and not self.busy and self.state is State.READY:
            self._send_job(self._waiting.popleft())

    def _settle(self, job: _Job, outcome: Outcome | None) -> None:
        if job.abandoned:
            if job.on_abandon is not None:
                job.on_abandon()
        elif not job.future.done():
            job.future.set_result(outcome)
        self._check_idle()

    def cancel(self, tag: str) -> bool:
        """Cancel a queued or running prediction; False if there is none of that ID."""
        for job in self._waiting:
            if job.id == tag:
                self._waiting.remove(job)
                self._settle(job, Outcome(None, None, 0.0, canceled=True))
                return True
        job = self._running.get(tag)
        if job is None:
            return False
        if job.cancel_asked:
            return True
        job.cancel_asked = True
        if self.is_async or self.concurrency > 1:
            if self._transport is not None:
                self._transport.write(encode({"op": "cancel", "id": tag}))
        elif self._cancel_pipe is not None and self._process is not None:
            os.write(self._cancel_pipe, tag.encode() + b"\n")
            os.kill(self._process.pid, signal.SIGUSR1)
        asyncio.get_running_loop().call_later(self.cancel_grace, self._stuck, job)
        return True

    def _stuck(self, job: _Job) -> None:
        """A cancelled prediction still running after the grace period: kill the worker."""
        if self._running.get(job.id) is job:
            logger.error(
                "[%s] still running %gs after it was cancelled; restarting the model",
                job.id,
                self.cancel_grace,
            )
            self._kill()

    def _kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()

    # -- shutdown -----------------------------------------------------------------------

    def stop(self) -> tuple[int, int]:
        """Begin shutdown: refuse new predictions, and the queued ones at once; the
        running ones go on. Returns (running, refused)."""
        self.state = State.STOPPING
        refused = list(self._waiting)
        self._waiting.clear()
        for job in refused:
            self._settle(job, None)
        self._check_idle()
        return len(self._running), len(refused)

    async def drain(self) -> None:
        """Stop (see stop()) and wait until the running predictions and every admitted
        request have finished."""
        if self.state is not State.STOPPING:
            self.stop()
        if self._idle is None:
            return
        self._check_idle()
        await self._idle.wait()

    def _check_idle(self) -> None:
        idle = self._admitted == 0 and not self._running and not self._waiting
        if self.state is State.STOPPING and self._idle is not None and idle:
            self._idle.set()

    async def close(self) -> None:
        """End the worker: its socket closes (it exits), then a kill if it lingers."""
        self._closing = True
        if self._transport is not None:
            self._transport.close()
        process = self._process
        if process is not None and process.returncode is None:
            try:
                await asyncio.wait_for(process.wait(), 2.0)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()
        if isinstance(process, _AdoptedProcess):
            await process.waited()

    def kill_now(self) -> None:
        """For an exit that cannot wait (a second signal)."""
        self._closing = True
        self._kill()
