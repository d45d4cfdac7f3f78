"""``python -m cog.worker --fd N --cancel-fd M --model predict.py:Predictor``: the model's
process. It imports the model, runs its setup, tells the server its signature, then runs
the predictions the server hands over (see :mod:`cog.worker.protocol`).

- A synchronous model runs in the main thread, one prediction at a time (a 2021 model
  with ``--concurrency`` above 1 in as many threads). Cancelling interrupts it: the server
  writes the prediction's ID to the cancel pipe and sends SIGUSR1, whose handler raises
  ``cog.CancelationException`` in the prediction (Cog's behaviour).
- An ``async`` model runs on an event loop, up to ``--concurrency`` predictions at once;
  cancelling cancels its task (``asyncio.CancelledError``).
- What the model prints from Python is sent to the server line by line, tagged with the
  prediction (or setup) it belongs to; output written to the file descriptors directly
  (a C library, a subprocess) goes to the container's log untagged.

Standard library only: this runs in the model's own Python (3.8+).
"""

from __future__ import annotations

import argparse
import asyncio
import collections.abc
import contextvars
import ctypes
import inspect
import os
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, Iterator, List

from cog import model as cog_model
from cog.signature import SignatureError
from cog.types import CancelationException
from cog.worker.loader import ModelLoadError, describe, load_reference, setup_arguments
from cog.worker.protocol import Decoder, encode
from cog.worker.values import Encoder, OutputError, model_inputs

#: The prediction the running code belongs to (None: setup).
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("cog_id", default=None)
#: A partial line longer than this is sent as it is (progress bars never end a line).
_MAX_PENDING = 64 * 1024


class Connection:
    """The socket to the server; sends are whole messages, from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        #: set while a message is being sent: a cancel signal then waits (see _Cancels)
        self.sending = False
        self.after_send: Callable[[], None] | None = None

    def send(self, message: Dict[str, Any]) -> None:
        data = encode(message)
        with self._lock:
            self.sending = True
            try:
                self.sock.sendall(data)
            finally:
                self.sending = False
        if self.after_send is not None:
            self.after_send()


class LogStream:
    """sys.stdout/sys.stderr of the model: lines go to the server, tagged."""

    def __init__(self, connection: Connection, name: str, wrapped: Any) -> None:
        self.connection = connection
        self.name = name
        self.wrapped = wrapped
        self._pending: Dict[str | None, str] = {}
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        key = _current.get()
        with self._lock:
            data = self._pending.pop(key, "") + text
            lines = data.splitlines(True)
            if lines and not lines[-1].endswith(("\n", "\r")):
                rest = lines.pop()
                if len(rest) > _MAX_PENDING:
                    lines.append(rest)
                else:
                    self._pending[key] = rest
        for line in lines:
            self._send(key, line)
        return len(text)

    def flush_id(self, key: str | None) -> None:
        with self._lock:
            rest = self._pending.pop(key, "")
        if rest:
            self._send(key, rest)

    def _send(self, key: str | None, line: str) -> None:
        line = line.rstrip("\r\n")
        if line.strip():
            self.connection.send({"op": "log", "id": key, "stream": self.name, "line": line})

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


class _Cancels:
    """Cancellation of the synchronous prediction in the main thread, by SIGUSR1."""

    def __init__(self, fd: int, connection: Connection) -> None:
        self.fd = fd
        self.ids: set = set()
        self.current: str | None = None
        self.deferred = False
        self.connection = connection
        os.set_blocking(fd, False)
        signal.signal(signal.SIGUSR1, self._on_signal)
        connection.after_send = self._after_send

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            if not data:
                return
            self.ids.update(line for line in data.decode().split("\n") if line)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._read()
        if self.current is None or self.current not in self.ids:
            return
        if self.connection.sending:  # a half-sent message must not be cut
            self.deferred = True
            return
        raise CancelationException(f"prediction {self.current} was canceled")

    def _after_send(self) -> None:
        if self.deferred and threading.current_thread() is threading.main_thread():
            self.deferred = False
            if self.current is not None and self.current in self.ids:
                raise CancelationException(f"prediction {self.current} was canceled")

    def start(self, prediction: str) -> None:
        self._read()
        if prediction in self.ids:
            raise CancelationException(f"prediction {prediction} was canceled")
        self.current = prediction

    def end(self, prediction: str) -> None:
        self.current = None
        self.ids.discard(prediction)


class Worker:
    def __init__(self, connection: Connection, args: argparse.Namespace) -> None:
        self.connection = connection
        self.args = args
        self.instance: Any = None
        self.signature: Any = None
        self.method: Any = None
        self.is_async = False
        self.stdout: LogStream | None = None
        self.stderr: LogStream | None = None
        self._yields = False

    # -- setup ------------------------------------------------------------------------

    def load(self) -> Dict[str, Any]:
        """Import the model, describe it and create it (setup comes next)."""
        model_class = load_reference(self.args.dir, self.args.model)
        self.signature, name, self.is_async = describe(model_class)
        if self.args.concurrency > 1 and not self.is_async and self.signature.kind != "model":
            raise SignatureError(
                [f"concurrency {self.args.concurrency} needs an async {name}() (Cog's rule)"]
            )
        self.instance = model_class()
        self.method = getattr(self.instance, name)
        output = self.signature.output
        #: annotated Iterator[...]: any iterator it returns is its items
        self._yields = output is not None and output.iterator
        return {
            "signature": self.signature.to_json(),
            "name": model_class.__name__,
            "doc": inspect.getdoc(model_class) or "",
            "async": self.is_async,
        }

    # -- one prediction ----------------------------------------------------------------

    def _inputs(self, message: Dict[str, Any], opened: List[Any]) -> Dict[str, Any]:
        return model_inputs(self.signature, message.get("inputs") or {}, opened)

    def _done(self, message: Dict[str, Any], outcome: Dict[str, Any]) -> None:
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.flush_id(message["id"])
        self.connection.send({"op": "done", "id": message["id"], **outcome})

    def _failed(self, error: BaseException) -> Dict[str, Any]:
        if isinstance(error, OutputError):
            return {"status": "failed", "error": str(error)}
        traceback.print_exception(type(error), error, error.__traceback__)
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        return {"status": "failed", "error": text}

    def predict_sync(self, message: Dict[str, Any], cancels: _Cancels | None) -> None:
        prediction = message["id"]
        token = _current.set(prediction)
        cog_model._request.directory = _directory_maker(message.get("dir") or "")
        encoder = Encoder(message.get("dir") or "/tmp")
        opened: List[Any] = []
        started = time.perf_counter()
        outcome: Dict[str, Any]
        try:
            try:
                if cancels is not None:
                    cancels.start(prediction)
                value = self.method(**self._inputs(message, opened))
                if inspect.isgenerator(value) or (self._yields and _is_iterator(value)):
                    for item in value:
                        self.connection.send(
                            {"op": "output", "id": prediction, "value": encoder.encode(item)}
                        )
                    value = None
                outcome = {"status": "succeeded", "value": encoder.encode(value)}
            finally:
                if cancels is not None:
                    cancels.end(prediction)
        except CancelationException:
            outcome = {"status": "canceled"}
        except BaseException as e:  # SystemExit from a model must not end the worker
            outcome = self._failed(e)
        finally:
            cog_model._request.directory = None
            for f in opened:
                f.close()
            _current.reset(token)
        outcome["seconds"] = time.perf_counter() - started
        self._done(message, outcome)

    async def predict_async(self, message: Dict[str, Any]) -> None:
        prediction = message["id"]
        _current.set(prediction)  # this task's own context
        encoder = Encoder(message.get("dir") or "/tmp")
        opened: List[Any] = []
        started = time.perf_counter()
        outcome: Dict[str, Any]
        try:
            value = self.method(**self._inputs(message, opened))
            if inspect.isasyncgen(value) or (
                self._yields and isinstance(value, collections.abc.AsyncIterator)
            ):
                async for item in value:
                    self.connection.send(
                        {"op": "output", "id": prediction, "value": encoder.encode(item)}
                    )
                value = None
            elif inspect.isawaitable(value):
                value = await value
            outcome = {"status": "succeeded", "value": encoder.encode(value)}
        except asyncio.CancelledError:
            outcome = {"status": "canceled"}
        except BaseException as e:
            outcome = self._failed(e)
        finally:
            for f in opened:
                f.close()
        outcome["seconds"] = time.perf_counter() - started
        self._done(message, outcome)


def _is_iterator(value: Any) -> bool:
    return isinstance(value, collections.abc.Iterator) and not isinstance(value, (str, bytes))


def _directory_maker(path: str) -> Callable[[], str]:
    def make() -> str:
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    return make


# -- the loops --------------------------------------------------------------------------


def _messages(sock: socket.socket) -> Iterator[Dict[str, Any]]:
    """The server's messages as they arrive, until it closes its end."""
    decoder = Decoder()
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return
        yield from decoder.feed(data)


def _serve_inline(worker: Worker, sock: socket.socket, cancels: _Cancels) -> None:
    """One synchronous prediction at a time, in the main thread."""
    for message in _messages(sock):
        if message["op"] == "predict":
            worker.predict_sync(message, cancels)


def _serve_threads(worker: Worker, sock: socket.socket, threads: int) -> None:
    """A 2021 model with --concurrency N: N threads take predictions in turn."""
    import queue

    jobs: queue.SimpleQueue = queue.SimpleQueue()
    running: Dict[str, int] = {}

    def work() -> None:
        while True:
            message = jobs.get()
            running[message["id"]] = threading.get_ident()
            try:
                worker.predict_sync(message, None)
            finally:
                running.pop(message["id"], None)

    for n in range(threads):
        threading.Thread(target=work, name=f"cog-predict-{n}", daemon=True).start()
    for message in _messages(sock):
        if message["op"] == "predict":
            jobs.put(message)
        elif message["op"] == "cancel" and message["id"] in running:
            # The best a thread allows: raised at its next Python instruction.
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(running[message["id"]]), ctypes.py_object(CancelationException)
            )


class _AsyncChannel(asyncio.Protocol):
    """The socket of an async model: each prediction a task, as soon as it arrives."""

    def __init__(self, worker: Worker, closed: asyncio.Future) -> None:
        self.worker = worker
        self.closed = closed
        self.decoder = Decoder()
        self.tasks: Dict[str, asyncio.Task] = {}

    def data_received(self, data: bytes) -> None:
        for message in self.decoder.feed(data):
            if message["op"] == "predict":
                key = message["id"]
                task = asyncio.ensure_future(self.worker.predict_async(message))
                self.tasks[key] = task
                task.add_done_callback(lambda _t, key=key: self.tasks.pop(key, None))
            elif message["op"] == "cancel" and message["id"] in self.tasks:
                self.tasks[message["id"]].cancel()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def _serve_async(worker: Worker, sock: socket.socket, setup: Any) -> None:
    loop = asyncio.get_running_loop()
    closed = loop.create_future()
    transport, _ = await loop.connect_accepted_socket(lambda: _AsyncChannel(worker, closed), sock)
    main_thread = threading.get_ident()

    def send(message: Dict[str, Any]) -> None:
        data = encode(message)
        if threading.get_ident() == main_thread:
            transport.write(data)
        else:  # printed from a thread the model started
            loop.call_soon_threadsafe(transport.write, data)

    worker.connection.send = send  # type: ignore[method-assign]
    if await _setup(worker, setup):
        await closed
    transport.close()


async def _setup(worker: Worker, setup: Any) -> bool:
    """Run setup (awaited when async) and tell the server; False when it failed."""
    started = time.perf_counter()
    try:
        result = setup()
        if inspect.isawaitable(result):
            await result
    except BaseException as e:
        _setup_failed(worker, e)
        return False
    worker.connection.send({"op": "ready", "setup_time": time.perf_counter() - started})
    return True


def _setup_failed(worker: Worker, error: BaseException) -> None:
    if isinstance(error, (SignatureError, ModelLoadError)):
        text = str(error)
        if isinstance(error, SignatureError):
            text = f"the model's inputs are declared wrongly:\n{error}"
    else:
        traceback.print_exception(type(error), error, error.__traceback__)
        text = f"{type(error).__name__}: {error}"
    for stream in (worker.stdout, worker.stderr):
        if stream is not None:
            stream.flush_id(None)
    worker.connection.send({"op": "failed", "error": text})


def _die_with_the_server() -> None:
    """Linux: the kernel kills this process when its parent (the server) dies."""
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cog.worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--cancel-fd", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dir", default=".")
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args(argv)
    _die_with_the_server()
    sock = socket.socket(fileno=args.fd)
    connection = Connection(sock)
    worker = Worker(connection, args)
    worker.stdout = LogStream(connection, "stdout", sys.stdout)
    worker.stderr = LogStream(connection, "stderr", sys.stderr)
    sys.stdout, sys.stderr = worker.stdout, worker.stderr  # type: ignore[assignment]
    try:
        described = worker.load()
    except BaseException as e:
        _setup_failed(worker, e)
        return
    connection.send({"op": "loaded", **described})
    setup = lambda: worker.instance.setup(**setup_arguments(worker.instance))  # noqa: E731
    if worker.is_async:
        asyncio.run(_serve_async(worker, sock, setup))
        return
    cancels = _Cancels(args.cancel_fd, connection) if args.concurrency == 1 else None
    setup_done = asyncio.run(_setup(worker, setup)) if _is_async_setup(worker) else None
    if setup_done is None:
        try:
            started = time.perf_counter()
            setup()
        except BaseException as e:
            _setup_failed(worker, e)
            return
        connection.send({"op": "ready", "setup_time": time.perf_counter() - started})
    elif not setup_done:
        return
    if cancels is not None:
        _serve_inline(worker, sock, cancels)
    else:
        _serve_threads(worker, sock, args.concurrency)


def _is_async_setup(worker: Worker) -> bool:
    return inspect.iscoroutinefunction(getattr(worker.instance, "setup", None))
