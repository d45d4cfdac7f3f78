"""The model's life in the server: load and setup once, then inferences in worker threads.

Model code never runs on the event loop: setup() in a daemon thread (so a SIGTERM during a
long setup does not wait for it), run() in a pool of ``concurrency`` threads (1 by
default: GPU models are not re-entrant). Requests beyond ``concurrency`` wait, up to
``max_queue`` of them; more are refused (:class:`Busy`). A queued request whose client
hangs up is dropped; on shutdown the queued ones are refused at once and the running
ones finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import queue
import threading
import time
from typing import Any, Callable

import attrs

from cog import model as cog_model
from cog.model import Model, signature_of
from cog.runtime.console import call_tagged
from cog.runtime.model_ref import ModelLoadError
from cog.signature import Argument, Signature, SignatureError

logger = logging.getLogger("cog.runtime")

DEFAULT_MAX_QUEUE = 64


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"


class NotReady(Exception):
    """The model cannot take an inference now (starting, failed or stopping)."""

    def __init__(self, state: State, error: str | None = None) -> None:
        self.state = state
        self.error = error
        messages = {
            State.STARTING: "the model is starting",
            State.FAILED: f"the model failed to start: {error}",
            State.STOPPING: "the server is shutting down",
        }
        super().__init__(messages.get(state, state.value))


class Busy(Exception):
    """Every inference slot and queue place is taken."""


class _Status(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    #: not to be run: its client hung up, or shutdown refused it, while it waited
    SKIPPED = "skipped"


@attrs.define(eq=False)
class _Job:
    future: asyncio.Future[Outcome | None]
    inputs: dict[str, Any]
    tag: str
    on_abandon: Callable[[], None] | None
    #: makes and returns the request's temporary directory (cog.request_directory())
    directory: Callable[[], str] | None
    #: changed under ModelRunner._claim only: a worker and the loop may race for a job
    status: _Status = _Status.QUEUED
    #: the request was cancelled while running: _finish calls on_abandon
    abandoned: bool = False


@attrs.frozen
class Outcome:
    """What one run() did: a value, or the exception it raised; and how long it took."""

    value: Any
    error: BaseException | None
    seconds: float


class ModelRunner:
    """Loads the model, runs setup() once, and runs inferences with bounded concurrency."""

    def __init__(
        self,
        load: Callable[[], type[Model]],
        *,
        concurrency: int = 1,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be 1 or more, not {concurrency}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be 0 or more, not {max_queue}")
        self.concurrency = concurrency
        self.max_queue = max_queue
        self.state = State.STARTING
        #: why setup failed (one line; the traceback is in the log)
        self.error: str | None = None
        self.model_class: type[Model] | None = None
        self.signature: Signature | None = None
        #: the signature's arguments by name
        self.arguments: dict[str, Argument] = {}
        #: seconds that creating the model and its setup() took
        self.setup_time: float | None = None
        self._load = load
        self._model: Model | None = None
        self._jobs: queue.SimpleQueue[_Job | None] | None = None
        self._setup: asyncio.Future[Any] | None = None
        self._idle: asyncio.Event | None = None
        self._admitted = 0
        #: jobs queued or running in a worker thread, until _finish
        self._pending = 0
        #: guards every job's status, _waiting and _running (worker threads and the loop)
        self._claim = threading.Lock()
        #: jobs queued and not yet taken by a worker
        self._waiting: set[_Job] = set()
        #: jobs in run() now
        self._running = 0

    @property
    def admitted(self) -> int:
        """Requests between admission and their response (running, queued, or reading input)."""
        return self._admitted

    async def start(self) -> None:
        """Begin loading and setup in the background; /ping tells when it is done."""
        loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()  # created on the running loop (3.8 binds it then)
        self._jobs = queue.SimpleQueue()
        for n in range(self.concurrency):
            # Daemon threads: a run() that never returns must not keep the process alive
            # after shutdown has given up on it.
            worker = threading.Thread(
                target=self._work, args=(loop,), name=f"cog-run-{n}", daemon=True
            )
            worker.start()
        self._setup = _in_daemon_thread(loop, call_tagged, "setup", self._load_and_setup)
        self._setup.add_done_callback(self._setup_finished)

    async def wait_started(self) -> State:
        """Wait until setup has finished (or failed); the state then."""
        if self._setup is not None:
            await asyncio.wait([self._setup])
        return self.state

    def _load_and_setup(self) -> tuple[type[Model], Model, float]:
        started = time.perf_counter()
        model_class = self._load()
        signature_of(model_class)
        loaded = time.perf_counter()
        logger.info("loaded %s in %.3fs", model_class.__qualname__, loaded - started)
        model = model_class()
        model.setup()
        return model_class, model, time.perf_counter() - loaded

    def _setup_finished(self, future: asyncio.Future[Any]) -> None:
        error = future.exception()
        if error is not None:
            if isinstance(error, SignatureError):
                self.error = f"the model's inputs are declared wrongly:\n{error}"
            elif isinstance(error, ModelLoadError):
                self.error = str(error)
            else:
                self.error = f"{type(error).__name__}: {error}"
            logger.error("setup failed: %s", self.error, exc_info=error)
            if self.state is State.STARTING:
                self.state = State.FAILED
            return
        self.model_class, self._model, self.setup_time = future.result()
        self.signature = signature_of(self.model_class)
        self.arguments = {argument.name: argument for argument in self.signature.arguments}
        logger.info("setup() done in %.3fs; ready", self.setup_time)
        if self.state is State.STARTING:
            self.state = State.READY

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

    async def run(
        self,
        inputs: dict[str, Any],
        tag: str,
        on_abandon: Callable[[], None] | None = None,
        directory: Callable[[], str] | None = None,
    ) -> Outcome:
        """Run the model on ``inputs`` in a worker thread, after the runs queued before it.

        Raises NotReady if shutdown began before it started. If the request is cancelled,
        ``on_abandon`` is called once run() no longer needs the inputs: at once for a job
        still queued (it is dropped), after run() for a running one. ``directory`` is what
        ``cog.request_directory()`` calls in run().
        """
        assert self._jobs is not None
        if self.state is State.STOPPING:
            raise NotReady(self.state)
        job = _Job(asyncio.get_running_loop().create_future(), inputs, tag, on_abandon, directory)
        with self._claim:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "[%s] queued (%d running, %d waiting before it)",
                    tag,
                    self._running,
                    len(self._waiting),
                )
            self._waiting.add(job)
        self._pending += 1
        self._jobs.put(job)
        try:
            outcome = await job.future
        except asyncio.CancelledError:
            if job.future.done() and not job.future.cancelled():
                # Cancelled after _finish handed over the outcome: nobody else will clean up.
                if on_abandon is not None:
                    on_abandon()
                raise
            with self._claim:
                dropped = job.status is _Status.QUEUED
                if dropped:
                    job.status = _Status.SKIPPED
                    self._waiting.discard(job)
                else:
                    job.abandoned = True  # running: _finish calls on_abandon after run()
            if dropped:
                logger.info("[%s] the client hung up; dropped from the queue", tag)
                if on_abandon is not None:
                    on_abandon()
            raise
        if outcome is None:
            raise NotReady(State.STOPPING)
        return outcome

    def _work(self, loop: asyncio.AbstractEventLoop) -> None:
        """A worker thread: take jobs in order, run them, hand the outcome to the loop.

        The queue is here, not on the loop, so one run follows another without waiting
        for the event loop in between.
        """
        assert self._jobs is not None
        while True:
            job = self._jobs.get()
            if job is None:
                return
            outcome = None
            with self._claim:  # a job the loop dropped or refused is never started
                start = job.status is _Status.QUEUED
                if start:
                    job.status = _Status.RUNNING
                    self._waiting.discard(job)
                    self._running += 1
            if start:
                try:
                    outcome = call_tagged(job.tag, self._timed_run, job)
                finally:
                    with self._claim:
                        self._running -= 1
            try:
                loop.call_soon_threadsafe(self._finish, job, outcome)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return

    def _timed_run(self, job: _Job) -> Outcome:
        assert self._model is not None
        started = time.perf_counter()
        cog_model._request.directory = job.directory
        try:
            value = self._model.run(**job.inputs)
        except BaseException as e:  # SystemExit from a model must not end a worker thread
            return Outcome(None, e, time.perf_counter() - started)
        finally:
            cog_model._request.directory = None
        return Outcome(value, None, time.perf_counter() - started)

    def _finish(self, job: _Job, outcome: Outcome | None) -> None:
        self._pending -= 1
        if job.abandoned:
            if job.on_abandon is not None:
                job.on_abandon()
        elif not job.future.done():
            job.future.set_result(outcome)
        self._check_idle()

    def stop(self) -> tuple[int, int]:
        """Begin shutdown: refuse new inferences, and the queued ones at once (their
        requests get NotReady); the running ones go on. Returns (running, refused)."""
        self.state = State.STOPPING
        with self._claim:
            refused = list(self._waiting)
            self._waiting.clear()
            for job in refused:
                job.status = _Status.SKIPPED
            running = self._running
        for job in refused:
            if not job.future.done():
                job.future.set_result(None)
        self._check_idle()
        return running, len(refused)

    async def drain(self) -> None:
        """Stop (see stop()) and wait until the running inferences and every admitted
        request have finished."""
        if self.state is not State.STOPPING:
            self.stop()
        if self._idle is None:
            return
        self._check_idle()
        await self._idle.wait()

    def _check_idle(self) -> None:
        idle = self._admitted == 0 and self._pending == 0
        if self.state is State.STOPPING and self._idle is not None and idle:
            self._idle.set()

    async def close(self) -> None:
        if self._jobs is not None:
            for _ in range(self.concurrency):
                self._jobs.put(None)


def _in_daemon_thread(
    loop: asyncio.AbstractEventLoop, function: Callable[..., Any], *args: Any
) -> asyncio.Future[Any]:
    """Run ``function`` in a new daemon thread; a future on ``loop`` for its result."""
    future = loop.create_future()

    def settle(error: BaseException | None, result: Any) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            result = function(*args)
        except Exception as e:
            outcome: tuple[BaseException | None, Any] = (e, None)
        except BaseException as e:  # e.g. SystemExit: reported, not re-raised on the loop
            outcome = (RuntimeError(f"{type(e).__name__}: {e}"), None)
        else:
            outcome = (None, result)
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=target, name="cog-setup", daemon=True).start()
    return future
