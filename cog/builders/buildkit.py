"""The BuildKit builder: builds through BuildKit's gRPC control API (``Solve``/``Status``).

Addresses (``--buildkit-addr``, i.e. ``options["addr"]``):

- ``tcp://host:1234`` — a standalone ``buildkitd``; TLS when ``tls_ca``/``tls_cert``/
  ``tls_key`` are given (mutual TLS with cert+key), ``tls_server_name`` to check another name.
- ``unix:///run/buildkit/buildkitd.sock`` — a ``buildkitd`` on this machine.
- ``docker-grpc://`` (the default) — the BuildKit embedded in the Docker Engine of
  ``--docker-host``/``DOCKER_HOST``/the local socket, reached through the Engine API's
  ``/grpc`` endpoint (an HTTP upgrade to h2c, as ``docker buildx``'s docker driver does);
  ``docker-grpc:///var/run/docker.sock`` or ``docker-grpc://host:2375`` name the engine.
  grpcio cannot do that upgrade, so a private unix socket (in a 0700 directory, never a TCP
  port: it gives the engine's root-equivalent access) accepts grpcio's connections and
  upgrades a fresh engine connection for each.

The build context reaches BuildKit with no client session: the builder serves the context
tar (made on the fly from the package zip, :mod:`cog.builders.context`) over HTTP at an
unguessable per-build URL (``/context/<256-bit token>``; unknown tokens are 404). The URL
answers until the build ends, not just once: the embedded BuildKit here fetches it once per
build, but nothing promises that of every BuildKit, and a refused second fetch would fail
the build. The Dockerfile frontend is told ``context=<that URL>``; BuildKit fetches and
unpacks it. By default that server listens on 127.0.0.1, which is right for the local
engine and a local buildkitd. For a remote buildkitd set
``context_host`` (an address of this machine the buildkitd can reach; the server listens
there), optionally ``context_port`` (default: any free port) — or ``context_url`` (the base
URL the buildkitd should use, e.g. behind a proxy) with ``context_listen=HOST:PORT``.

Export, by what the BuildKit at hand can do (``exporter=auto|image|moby``, default auto):

- ``image`` with ``push=true,name=<image>``: a standalone buildkitd pushes to the
  registry itself (``registry_insecure=true`` for a plain-HTTP registry); the digest is the
  one BuildKit reports.
- ``moby``: the embedded BuildKit (worker ``moby``) has no ``image`` exporter; it tags the
  image into the engine's store, then :func:`cog.builders.push.push_events` pushes it
  through the Engine API of that same engine and reports the registry's digest.
  ``auto`` picks ``moby`` for ``docker-grpc://`` or a worker that says it is moby.
  That engine: the one ``docker-grpc://`` names; for ``unix://``, this machine's
  (``--docker-host``) unless ``docker_host=`` says otherwise; for ``tcp://`` only
  ``docker_host=`` can say (another machine's engine), and a moby worker there without it
  is refused at the build's start rather than pushed from the wrong engine.

Registry cache: ``cache_from=<ref>[,<ref>...]`` and ``cache_to=<ref>`` add BuildKit
``registry`` cache imports/exports (``mode=max``).

Progress: ``Status`` runs next to ``Solve``; vertexes and their log lines become
``BuildLog(stage="build")`` lines as they arrive, like ``docker build --progress=plain``
(``#3 [2/6] RUN ...``, its output, ``#3 DONE 4.2s``/``CACHED``/``ERROR: ...``).

Cancellation: closing the event iterator cancels the ``Solve`` call; BuildKit cancels the
job and kills the running step. A build cancelled through its task (client gone, server
stopping) says so in its own log first: ``buildkit at ADDR: build cancelled during step
#7 [5/6] RUN ...``, then the cancellation goes on. ``close()`` under a running build
fails it with a :class:`BuilderUnavailable` naming the step.

Tested here against the BuildKit embedded in dockerd 20.10.24 (BuildKit ~v0.8, no ``Info``)
through ``docker-grpc://``; through a TLS terminator in front of it for ``tcp://`` with
mutual TLS; and through a plain unix socket to it for ``unix://``: probing, context
serving, live logs, failing steps, cancellation, the ``moby`` export plus Engine API push.
NOT tested (this machine has no standalone buildkitd): the ``image`` exporter with
``push=true``, ``registry_insecure``, registry cache import/export, and a real buildkitd
(newer BuildKit, ``Info``, OCI/containerd workers); that code follows BuildKit's
documented exporter and cache attributes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import os
import secrets
import shutil
import tempfile
import urllib.parse
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import grpc
from aiohttp import web

from cog.builders import (
    Builder,
    BuilderConfigError,
    BuildError,
    BuilderSettings,
    BuilderUnavailable,
    BuildEvent,
    BuildLog,
    BuildRequest,
    BuiltImage,
    being_cancelled,
)
from cog.builders.buildkit_pb import messages as pb
from cog.builders.buildkit_pb import method_path
from cog.builders.context import build_context
from cog.builders.dockerfile import dockerfile_for_request
from cog.engine.client import engine_address
from cog.units import format_size

DEFAULT_ADDR = "docker-grpc://"
TAIL = 20
#: after Solve has answered, how long to wait for the Status stream's last messages
STATUS_GRACE = 3.0
MAX_MESSAGE = 64 * 1024 * 1024
#: an output line not ended after this many characters is shown as it is
MAX_PARTIAL = 64 * 1024
OPTIONS = frozenset(
    {
        "addr",
        "tls_ca",
        "tls_cert",
        "tls_key",
        "tls_server_name",
        "exporter",
        "registry_insecure",
        "cache_from",
        "cache_to",
        "context_host",
        "context_port",
        "context_url",
        "context_listen",
        "connect_timeout",
        "docker_host",
    }
)
_TLS_WORDS = ("ssl", "tls", "handshake", "certificate", "verification")


# ---- addresses ------------------------------------------------------------------------


@attrs.frozen
class Address:
    """Where BuildKit is, parsed from the operator's address."""

    #: as written (messages name the builder with it)
    text: str
    #: tcp, unix or docker-grpc
    scheme: str
    #: grpcio target for tcp/unix ("host:port", "unix:///path"); "" for docker-grpc
    target: str = ""
    #: host of a tcp address or of a tcp engine (to tell local from remote)
    host: str | None = None
    #: docker-grpc: the engine, "unix:///path" or "tcp://host:port"
    engine: str | None = None

    @property
    def is_local(self) -> bool:
        """Can BuildKit reach this machine's 127.0.0.1 (the default context URL)?"""
        return self.host is None or _is_loopback(self.host)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_address(text: str, docker_host: str | None = None) -> Address:
    """Parse a BuildKit address; BuilderConfigError for anything else."""
    url = urllib.parse.urlsplit(text)
    if url.scheme == "tcp":
        if not url.hostname or not url.port:
            raise BuilderConfigError(f"BuildKit address {text!r}: expected tcp://HOST:PORT")
        host = url.hostname if ":" not in url.hostname else f"[{url.hostname}]"
        return Address(text, "tcp", target=f"{host}:{url.port}", host=url.hostname)
    if url.scheme == "unix":
        path = url.netloc + url.path
        if not path.startswith("/"):
            raise BuilderConfigError(f"BuildKit address {text!r}: expected unix:///ABSOLUTE/PATH")
        return Address(text, "unix", target=f"unix://{path}")
    if url.scheme == "docker-grpc":
        if url.path and not url.netloc:
            engine = f"unix://{url.path}"
        elif url.netloc:
            engine = f"tcp://{url.netloc}"
        else:
            engine = engine_address(docker_host)
        return Address(text, "docker-grpc", engine=engine, host=_engine_host(engine, text))
    raise BuilderConfigError(
        f"BuildKit address {text!r}: use tcp://HOST:PORT, unix:///PATH or docker-grpc://[ENGINE]"
    )


def _engine_host(engine: str, text: str) -> str | None:
    url = urllib.parse.urlsplit(engine)
    if url.scheme == "unix":
        return None
    if url.scheme in ("tcp", "http") and url.hostname and url.port:
        if os.environ.get("DOCKER_TLS_VERIFY"):
            raise BuilderConfigError(
                f"BuildKit address {text!r}: the engine {engine} wants TLS, which docker-grpc "
                "does not do; run a buildkitd and use tcp:// with --buildkit-tls-*"
            )
        return url.hostname
    raise BuilderConfigError(
        f"BuildKit address {text!r}: engine {engine!r} is neither unix:///PATH nor tcp://HOST:PORT"
    )


# ---- the docker-grpc tunnel -----------------------------------------------------------


class EngineTunnel:
    """A private unix socket; each connection is spliced to an upgraded engine ``/grpc``."""

    def __init__(self, engine: str):
        self.engine = engine
        #: why the last upgrade failed (added to "unreachable" messages), None if it did not
        self.last_error: str | None = None
        self._dir: str | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> str:
        """Listen; returns the grpcio target of the socket."""
        self._dir = tempfile.mkdtemp(prefix="cog-buildkit-")  # mode 0700
        path = os.path.join(self._dir, "grpc.sock")
        self._server = await asyncio.start_unix_server(self._handle, path)
        return f"unix://{path}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def _open_engine(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        url = urllib.parse.urlsplit(self.engine)
        if url.scheme == "unix":
            return await asyncio.open_unix_connection(url.netloc + url.path)
        return await asyncio.open_connection(url.hostname, url.port)

    async def _upgrade(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            reader, writer = await self._open_engine()
        except OSError as exc:
            self.last_error = f"cannot connect to the Docker Engine at {self.engine}: {exc}"
            return None
        writer.write(
            b"POST /grpc HTTP/1.1\r\nHost: docker\r\nConnection: Upgrade\r\n"
            b"Upgrade: h2c\r\nContent-Length: 0\r\n\r\n"
        )
        try:
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.last_error = f"the Docker Engine at {self.engine} broke off the upgrade: {exc!r}"
            writer.close()
            return None
        except BaseException:
            writer.close()
            raise
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        if " 101 " not in f"{status} ":
            self.last_error = (
                f"the Docker Engine at {self.engine} answered {status!r} to the /grpc upgrade "
                "(an engine without BuildKit, or an Engine API older than 1.31?)"
            )
            writer.close()
            return None
        self.last_error = None
        return reader, writer

    async def _handle(self, client_reader, client_writer) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        engine_writer = None
        try:
            upgraded = await self._upgrade()
            if upgraded is None:
                return
            engine_reader, engine_writer = upgraded
            pipes = [
                asyncio.ensure_future(_pipe(client_reader, engine_writer)),
                asyncio.ensure_future(_pipe(engine_reader, client_writer)),
            ]
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
        except asyncio.CancelledError:
            # Only close() cancels these tasks. Ending normally matters: asyncio's stream
            # server reports a handler task that ends cancelled as an unhandled error.
            pass
        finally:
            for writer in (client_writer, engine_writer):
                if writer is not None:
                    writer.close()
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()


# ---- the context server ---------------------------------------------------------------


class ContextServer:
    """Serves each build's context tar at an unguessable URL while that build runs."""

    def __init__(self, listen_host: str, listen_port: int, public_base: str | None):
        self.listen_host = listen_host
        self.listen_port = listen_port
        self._public_base = public_base
        self._offers: dict[str, tuple[Path, str]] = {}
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/context/{token}", self._serve, allow_head=False)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.listen_host, self.listen_port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise BuilderConfigError(
                f"cannot serve build contexts on {self.listen_host}:{self.listen_port}: {exc}"
            ) from None
        self._runner = runner
        port = runner.addresses[0][1]  # the real port when 0 was asked
        host = self.listen_host if ":" not in self.listen_host else f"[{self.listen_host}]"
        self.base_url = (self._public_base or f"http://{host}:{port}").rstrip("/")

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._offers.clear()

    @contextlib.asynccontextmanager
    async def offer(self, zip_path: Path, dockerfile: str) -> AsyncIterator[str]:
        """The URL of this context's tar, valid until the block ends."""
        token = secrets.token_urlsafe(32)
        self._offers[token] = (zip_path, dockerfile)
        try:
            yield f"{self.base_url}/context/{token}"
        finally:
            # close() may have forgotten every offer already (server shutdown mid-build).
            self._offers.pop(token, None)

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        offer = self._offers.get(request.match_info["token"])
        if offer is None:
            raise web.HTTPNotFound(text="no such build context")
        zip_path, dockerfile = offer
        response = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
        await response.prepare(request)
        try:
            async with contextlib.aclosing(build_context(zip_path, dockerfile)) as chunks:
                async for chunk in chunks:
                    await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:
            pass  # BuildKit went away (build cancelled); its Solve reports why
        return response


# ---- progress -------------------------------------------------------------------------


def _seconds(timestamp: Any) -> float:
    return timestamp.seconds + timestamp.nanos / 1e9


@attrs.define
class _Vertex:
    name: str = ""
    number: int = 0
    started: float | None = None
    finished: bool = False
    cached: bool = False
    error: str = ""
    partial: dict[int, str] = attrs.field(factory=dict)
    tail: collections.deque = attrs.field(factory=lambda: collections.deque(maxlen=TAIL))
    done_statuses: set[str] = attrs.field(factory=set)


class Progress:
    """``Status`` responses -> readable lines in order, like ``--progress=plain``.

    Every vertex gets a number when it is first shown: ``#3 [2/6] RUN ...``; its output
    lines follow as ``#3 <line>``; it ends with ``#3 DONE 4.2s``, ``#3 CACHED`` or
    ``#3 ERROR: <message>``. Finished sub-tasks (exporting layers, naming the image,
    downloads with their size) show once as ``#9 <what> done``.
    """

    def __init__(self) -> None:
        self._vertexes: dict[str, _Vertex] = {}
        self._count = 0
        #: has any Status response arrived?
        self.seen = False

    def _vertex(self, digest: str) -> _Vertex:
        return self._vertexes.setdefault(digest, _Vertex())

    def _announce(self, vertex: _Vertex) -> list[str]:
        if vertex.number:
            return []
        self._count += 1
        vertex.number = self._count
        return [f"#{vertex.number} {vertex.name}"]

    def feed(self, response: Any) -> list[str]:
        self.seen = True
        lines: list[str] = []
        completed = []
        for update in response.vertexes:
            vertex = self._vertex(update.digest)
            vertex.name = update.name or vertex.name
            if update.HasField("started"):
                vertex.started = _seconds(update.started)
                lines += self._announce(vertex)
            if update.HasField("completed") and not vertex.finished:
                completed.append((vertex, update))
        for log in response.logs:
            vertex = self._vertex(log.vertex)
            lines += self._announce(vertex)
            lines += self._output(vertex, log.stream, log.msg.decode("utf-8", "replace"))
        for status in response.statuses:
            vertex = self._vertex(status.vertex)
            if status.HasField("completed") and status.ID not in vertex.done_statuses:
                vertex.done_statuses.add(status.ID)
                lines += self._announce(vertex)
                size = (
                    f" {format_size(status.current)}" if status.total or status.current > 1 else ""
                )
                if status.total:
                    size += f" / {format_size(status.total)}"
                lines.append(f"#{vertex.number} {status.name or status.ID}{size} done")
        for warning in response.warnings:
            vertex = self._vertex(warning.vertex)
            lines += self._announce(vertex)
            lines.append(f"#{vertex.number} WARNING: {warning.short.decode('utf-8', 'replace')}")
        for vertex, update in completed:
            lines += self._announce(vertex)
            lines += self._flush(vertex)
            vertex.finished = True
            if update.error:
                vertex.error = update.error
                lines.append(f"#{vertex.number} ERROR: {update.error}")
            elif update.cached:
                vertex.cached = True
                lines.append(f"#{vertex.number} CACHED")
            else:
                took = _seconds(update.completed) - (vertex.started or _seconds(update.completed))
                lines.append(f"#{vertex.number} DONE {max(took, 0.0):.1f}s")
        return lines

    def _output(self, vertex: _Vertex, stream: int, text: str) -> list[str]:
        *complete, rest = (vertex.partial.pop(stream, "") + text).split("\n")
        # Only a redrawn line's last state matters; and no unended line grows without bound.
        if "\r" in rest:
            segments = [segment for segment in rest.split("\r") if segment]
            rest = (segments[-1] if segments else "") + ("\r" if rest.endswith("\r") else "")
        if len(rest) > MAX_PARTIAL:
            complete.append(rest)
            rest = ""
        vertex.partial[stream] = rest
        return [line for line in (self._line(vertex, raw) for raw in complete) if line]

    def _line(self, vertex: _Vertex, raw: str) -> str:
        # A carriage return redraws a progress bar: only its last state is a line.
        text = raw.rstrip("\r").rsplit("\r", 1)[-1].rstrip()
        if not text.strip():
            return ""
        vertex.tail.append(text)
        return f"#{vertex.number} {text}"

    def _flush(self, vertex: _Vertex) -> list[str]:
        rests, vertex.partial = vertex.partial.values(), {}
        return [line for line in (self._line(vertex, rest) for rest in rests) if line]

    def flush(self) -> list[str]:
        """Output not yet ended by a newline, for when the stream ends."""
        lines: list[str] = []
        for vertex in self._vertexes.values():
            lines += self._flush(vertex)
        return lines

    def running_steps(self) -> list[str]:
        """The steps started and not finished, as shown: ``#3 [2/6] RUN ...``."""
        running = [v for v in self._vertexes.values() if v.number and not v.finished]
        return [f"#{v.number} {v.name}" for v in sorted(running, key=lambda v: v.number)]

    def failed_step(self) -> tuple[str | None, tuple[str, ...]]:
        """The failing vertex's name and the last lines of its output."""
        failed = [v for v in self._vertexes.values() if v.error]
        # A step killed because another one failed says "context canceled": prefer the cause.
        failed.sort(key=lambda v: ("context canceled" in v.error, v.number))
        if not failed:
            return None, ()
        return failed[0].name, tuple(failed[0].tail)


# ---- the gRPC connection --------------------------------------------------------------


@attrs.frozen
class TLSFiles:
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str | None = None


class BuildKitConnection:
    """A gRPC channel to BuildKit's Control service (and the docker-grpc tunnel if any)."""

    def __init__(self, address: Address, tls: TLSFiles | None = None):
        self.address = address
        self.tls = tls
        self.tunnel: EngineTunnel | None = None
        self.channel: grpc.aio.Channel | None = None
        #: set by close(): a call cancelled after this was cancelled by the closing channel
        self.closed = False

    async def open(self) -> None:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
        target = self.address.target
        if self.address.scheme == "docker-grpc":
            assert self.address.engine is not None
            self.tunnel = EngineTunnel(self.address.engine)
            target = await self.tunnel.start()
        if self.tls is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self.tls.ca,
                private_key=self.tls.key,
                certificate_chain=self.tls.cert,
            )
            if self.tls.server_name:
                options.append(("grpc.ssl_target_name_override", self.tls.server_name))
            self.channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)

    async def close(self) -> None:
        self.closed = True
        if self.channel is not None:
            await self.channel.close()  # cancels calls still running
            self.channel = None
        if self.tunnel is not None:
            await self.tunnel.close()
            self.tunnel = None

    def _call(self, method: str, request_type: Any, response_type: Any, streaming=False):
        assert self.channel is not None, "open() the connection first"
        make = self.channel.unary_stream if streaming else self.channel.unary_unary
        return make(
            method_path(method),
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )

    async def list_workers(self, timeout: float) -> list[Any]:
        call = self._call("ListWorkers", pb.ListWorkersRequest, pb.ListWorkersResponse)
        return list((await call(pb.ListWorkersRequest(), timeout=timeout)).record)

    async def info(self, timeout: float) -> Any | None:
        """InfoResponse, or None for a BuildKit before v0.11 (no Info call)."""
        call = self._call("Info", pb.InfoRequest, pb.InfoResponse)
        try:
            return await call(pb.InfoRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise

    def solve(self, request: Any) -> grpc.aio.UnaryUnaryCall:
        return self._call("Solve", pb.SolveRequest, pb.SolveResponse)(request)

    def status(self, ref: str) -> grpc.aio.UnaryStreamCall:
        call = self._call("Status", pb.StatusRequest, pb.StatusResponse, streaming=True)
        return call(pb.StatusRequest(Ref=ref))


# ---- the builder ----------------------------------------------------------------------


@attrs.frozen
class Daemon:
    """What a probe found out about the BuildKit at an address."""

    version: str | None
    workers: tuple[str, ...]
    exporter: str

    def describe(self) -> str:
        version = self.version or "version unknown (no Info call: BuildKit older than v0.11)"
        how = (
            "exporter moby into the engine's image store, then a push through the Engine API"
            if self.exporter == "moby"
            else "exporter image, pushed to the registry by BuildKit"
        )
        return f"BuildKit {version}; workers: {', '.join(self.workers)}; {how}"


def choose_exporter(option: str, address: Address, workers: Iterable[Any]) -> str:
    """``image`` for a buildkitd, ``moby`` for the BuildKit embedded in a Docker Engine."""
    if option != "auto":
        return option
    if address.scheme == "docker-grpc":
        return "moby"
    for worker in workers:
        if worker.ID == "moby" or any(
            key.startswith("org.mobyproject.buildkit.worker.moby.") for key in worker.Labels
        ):
            return "moby"
    return "image"


def _read(settings_key: str, path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise BuilderConfigError(f"buildkit option {settings_key}={path!r}: {exc}") from None


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise BuilderConfigError(f"buildkit option context_listen={text!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _push_engine(address: Address, exporter: str, settings: BuilderSettings) -> str | None:
    """Which Docker Engine pushes a ``moby`` export: the one whose BuildKit built it.

    docker-grpc:// names it; a unix:// BuildKit is on this machine, so its engine is the
    local one (``--docker-host``) unless ``docker_host`` says otherwise; behind tcp:// it
    is another machine's engine, which only the operator can name (``docker_host``):
    None without it.
    """
    option = settings.options.get("docker_host") or None
    if address.scheme == "docker-grpc":
        if option:
            raise BuilderConfigError(
                f"buildkit option docker_host: {address.text} names its Docker Engine "
                "already (docker-grpc://ENGINE); leave docker_host out"
            )
        return address.engine
    if option:
        if urllib.parse.urlsplit(option).scheme not in ("unix", "tcp", "http", "https"):
            raise BuilderConfigError(
                f"buildkit option docker_host={option!r}: expected unix:///PATH or "
                "tcp://HOST:PORT (a Docker Engine API address)"
            )
        return option
    if address.scheme == "unix":
        return engine_address(settings.docker_host)
    if exporter == "moby":
        raise BuilderConfigError(
            f"buildkit exporter=moby with {address.text}: the image stays in the Docker "
            "Engine of that BuildKit; set --builder-opt docker_host=<that engine's API "
            "address, e.g. tcp://HOST:2375> so cog can push it"
        )
    return None


#: BuildKit's name for the vertex that resolves a FROM image
RESOLVE_BASE = "[internal] load metadata for "


class BuildKitBuilder(Builder):
    name = "buildkit"

    def __init__(
        self,
        settings: BuilderSettings,
        address: Address,
        *,
        tls: TLSFiles | None,
        exporter: str,
        context: ContextServer,
        connect_timeout: float,
        push_engine: str | None = None,
    ):
        self.settings = settings
        self.address = address
        self.tls = tls
        self.exporter = exporter
        self.connect_timeout = connect_timeout
        #: the Docker Engine holding a moby export, which pushes it; None when cog cannot
        #: know it (behind tcp:// without docker_host: only a moby worker needs it)
        self.push_engine = push_engine
        self._context = context
        self._connection: BuildKitConnection | None = None
        self._engine: Any = None  # cog.engine.Engine for the moby export's push

    @property
    def label(self) -> str:
        return f"buildkit at {self.address.text}"

    @classmethod
    def from_settings(cls, settings: BuilderSettings) -> BuildKitBuilder:
        options: Mapping[str, str] = settings.options
        unknown = sorted(set(options) - OPTIONS)
        if unknown:
            raise BuilderConfigError(
                f"unknown buildkit option(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(OPTIONS))})"
            )
        address = parse_address(options.get("addr") or DEFAULT_ADDR, settings.docker_host)
        tls = None
        if any(options.get(k) for k in ("tls_ca", "tls_cert", "tls_key", "tls_server_name")):
            if address.scheme != "tcp":
                raise BuilderConfigError(
                    f"BuildKit TLS options need a tcp:// address, not {address.text!r}"
                )
            tls = TLSFiles(
                ca=_read("tls_ca", options.get("tls_ca")),
                cert=_read("tls_cert", options.get("tls_cert")),
                key=_read("tls_key", options.get("tls_key")),
                server_name=options.get("tls_server_name") or None,
            )
            if (tls.cert is None) != (tls.key is None):
                raise BuilderConfigError("buildkit options tls_cert and tls_key go together")
        exporter = options.get("exporter", "auto")
        if exporter not in ("auto", "image", "moby"):
            raise BuilderConfigError(f"buildkit option exporter={exporter!r}: auto, image or moby")
        try:
            connect_timeout = float(options.get("connect_timeout", "10"))
            port = int(options.get("context_port", "0"))
        except ValueError as exc:
            raise BuilderConfigError(f"buildkit options: {exc}") from None
        context_url = options.get("context_url") or None
        if context_url:
            if not context_url.startswith(("http://", "https://")):
                raise BuilderConfigError(
                    f"buildkit option context_url={context_url!r}: not http(s)"
                )
            host, port = _listen(options.get("context_listen") or f"0.0.0.0:{port}")
        elif options.get("context_listen"):
            raise BuilderConfigError("buildkit option context_listen needs context_url")
        elif options.get("context_host"):
            host = options["context_host"]
        elif address.is_local:
            host = "127.0.0.1"
        else:
            raise BuilderConfigError(
                f"{address.text} is another machine: set --builder-opt context_host=<an address "
                "of this machine that BuildKit can reach> (or context_url=...) so it can fetch "
                "build contexts from this server"
            )
        context = ContextServer(host, port, context_url)
        return cls(
            settings,
            address,
            tls=tls,
            exporter=exporter,
            context=context,
            connect_timeout=connect_timeout,
            push_engine=_push_engine(address, exporter, settings),
        )

    # -- lifecycle: nothing here talks to BuildKit, so a server starts while it is down --

    async def open(self) -> None:
        if self._connection is not None:
            return
        await self._context.start()
        connection = BuildKitConnection(self.address, self.tls)
        try:
            await connection.open()
        except BaseException:
            await self._context.close()
            raise
        self._connection = connection

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        await self._context.close()
        if self._engine is not None:
            await self._engine.close()
            self._engine = None

    def dockerfile(self, request: BuildRequest) -> str:
        return dockerfile_for_request(request, self.settings)

    # -- errors ------------------------------------------------------------------------

    def _unreachable(self, exc: grpc.aio.AioRpcError) -> BuilderUnavailable:
        details = exc.details() or exc.code().name
        tunnel = self._connection.tunnel if self._connection else None
        if tunnel is not None and tunnel.last_error:
            details = tunnel.last_error
        low = details.lower()
        if self.tls is not None and any(word in low for word in _TLS_WORDS):
            return BuilderUnavailable(f"{self.label}: TLS handshake failed: {details}")
        closed = ("socket closed", "connection reset")
        if self.tls is not None and any(word in low for word in closed):
            # What a server that refuses our (missing) client certificate looks like.
            wants = "a client certificate (tls_cert/tls_key)" if self.tls.cert is None else "TLS"
            return BuilderUnavailable(
                f"{self.label}: TLS handshake failed: the server closed the connection "
                f"(does it want {wants}?): {details}"
            )
        if self.tls is None and self.address.scheme == "tcp" and any(w in low for w in closed):
            # What a TLS server does with a plain HTTP/2 preface.
            return BuilderUnavailable(
                f"{self.label}: the server closed the plain (non-TLS) connection; if it wants "
                "TLS, set --buildkit-tls-ca (and --buildkit-tls-cert/-key for mutual TLS): "
                f"{details}"
            )
        return BuilderUnavailable(f"{self.label} is not reachable: {details}")

    def _solve_error(
        self, exc: grpc.aio.AioRpcError, progress: Progress, context_url: str
    ) -> BuildError:
        code, details = exc.code(), exc.details() or exc.code().name
        step, output = progress.failed_step()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return self._unreachable(exc)
        base = context_url.rsplit("/context/", 1)[0]
        # Only BuildKit's own fetch can name this build's URL: the token is in no step.
        if context_url in details:
            return BuilderUnavailable(
                f"{self.label} could not fetch the build context from {base}: {details} "
                "(set --builder-opt context_host= to an address of this server BuildKit reaches)"
            )
        if code == grpc.StatusCode.UNIMPLEMENTED or (
            "could not be found" in details and ("exporter" in details or "frontend" in details)
        ):
            hint = " (--builder-opt exporter=moby for a Docker Engine's BuildKit)"
            return BuilderUnavailable(
                f"{self.label} lacks a feature cog needs: {details}"
                + (hint if "exporter" in details else "")
            )
        if step and step.startswith(RESOLVE_BASE):
            # The FROM image cannot be had: the server's setup, not the package's fault.
            return BuilderUnavailable(
                f"{self.label}: base image {step.removeprefix(RESOLVE_BASE)} not found where "
                "BuildKit looks for it; build it there (contrib/setup-machine.sh for a "
                f"Docker Engine's BuildKit) or set --base-image ({details})",
                step=step,
            )
        if code == grpc.StatusCode.CANCELLED:
            running = ", ".join(progress.running_steps()) or None
            return BuildError(
                f"{self.label}: the build was cancelled: {details}", step=step or running
            )
        return BuildError(f"{self.label}: {details}", step=step, output=output)

    # -- building ----------------------------------------------------------------------

    async def probe(self) -> Daemon:
        """Ask BuildKit for its workers and version; BuilderUnavailable if it cannot answer."""
        if self._connection is None:
            await self.open()
        assert self._connection is not None
        try:
            workers = await self._connection.list_workers(self.connect_timeout)
            info = await self._connection.info(self.connect_timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise BuilderUnavailable(
                    f"{self.label} does not speak BuildKit's control API: {exc.details()}"
                ) from None
            raise self._unreachable(exc) from None
        if not workers:
            raise BuilderUnavailable(f"{self.label} has no workers")
        version = None
        if info is not None and info.HasField("buildkitVersion"):
            version = info.buildkitVersion.version or None
        return Daemon(
            version=version,
            workers=tuple(worker.ID for worker in workers),
            exporter=choose_exporter(self.exporter, self.address, workers),
        )

    def solve_request(self, ref: str, context_url: str, image: str, exporter: str) -> Any:
        options = self.settings.options
        request = pb.SolveRequest(
            Ref=ref,
            Frontend="dockerfile.v0",
            FrontendAttrs={"context": context_url, "filename": "Dockerfile"},
            # The single-exporter fields: newer BuildKits still honour them, older ones
            # ignore the repeated Exporters field that replaced them.
            Exporter=exporter,
            ExporterAttrs={"name": image},
        )
        if exporter == "image":
            request.ExporterAttrs["push"] = "true"
            if options.get("registry_insecure", "").lower() in ("1", "true", "yes"):
                request.ExporterAttrs["registry.insecure"] = "true"
        for cache_ref in filter(None, options.get("cache_from", "").split(",")):
            request.Cache.Imports.add(Type="registry", Attrs={"ref": cache_ref.strip()})
        if options.get("cache_to"):
            request.Cache.Exports.add(
                Type="registry", Attrs={"ref": options["cache_to"], "mode": "max"}
            )
        return request

    async def build(self, request: BuildRequest) -> AsyncIterator[BuildEvent]:
        daemon = await self.probe()
        if daemon.exporter == "moby" and self.push_engine is None:
            raise BuilderUnavailable(self._no_push_engine(daemon))
        ref = f"cog-{secrets.token_hex(12)}"
        yield BuildLog(stage="build", line=f"{self.label}: {daemon.describe()}")
        yield BuildLog(stage="build", line=f"{self.label}: solving {ref}")
        async with self._context.offer(request.package_zip, self.dockerfile(request)) as url:
            solve = self.solve_request(ref, url, request.image, daemon.exporter)
            result: dict[str, str] = {}
            # aclosing: a build closed by its consumer cancels the Solve now, not when the
            # generator is collected.
            async with contextlib.aclosing(self._solve(solve, url, result)) as lines:
                async for line in lines:
                    yield BuildLog(stage="build", line=line)
        digest = result.get("containerimage.digest", "")
        if daemon.exporter == "image":
            if not digest:
                raise BuildError(f"{self.label}: pushed {request.image} but reported no digest")
            yield BuildLog(stage="push", line=f"BuildKit pushed {request.image}: {digest}")
            yield BuiltImage(image=request.image, digest=digest)
            return
        from cog.builders.push import push_events  # aiodocker only for this path
        from cog.engine import Engine, EngineError

        where = self.push_engine
        assert where is not None  # a moby export without one was refused at the start
        if self._engine is None:
            try:
                self._engine = Engine(where)
            except EngineError as exc:
                raise BuilderUnavailable(exc.message, step="push") from None
        yield BuildLog(
            stage="push",
            line=f"Image {digest or request.image} is in the Docker Engine at {where}; "
            "pushing it from there",
        )
        try:
            async with contextlib.aclosing(push_events(self._engine, request.image)) as events:
                async for event in events:
                    yield event
        except asyncio.CancelledError:
            # Dropping the push request stops the engine's push (see engine_stream).
            yield BuildLog(
                stage="push",
                line=f"{self.label}: build cancelled while pushing {request.image} "
                f"through the Docker Engine at {where}",
            )
            raise

    def _no_push_engine(self, daemon: Daemon) -> str:
        return (
            f"{self.label}: its worker ({', '.join(daemon.workers)}) is a Docker Engine's "
            "BuildKit, which leaves the image in that engine, and cog does not know which "
            "engine that is: set --builder-opt docker_host=<that engine's API address, e.g. "
            "tcp://HOST:2375> so cog pushes it from there (or use docker-grpc://HOST:2375)"
        )

    def _cancelled(self, progress: Progress) -> str:
        running = progress.running_steps()
        if running:
            during = "during step " + ", ".join(running)
        else:
            during = "before any step ran" if not progress.seen else "between steps"
        return f"{self.label}: build cancelled {during}; its Solve was cancelled in BuildKit too"

    async def _solve(self, request: Any, context_url: str, result: dict) -> AsyncIterator[str]:
        """Run Solve with Status alongside: progress lines, then result filled in."""
        connection = self._connection
        assert connection is not None
        progress = Progress()
        solve_call = connection.solve(request)
        status_call = connection.status(request.Ref)
        queue: asyncio.Queue = asyncio.Queue(maxsize=64)  # bounded: BuildKit waits for us
        end = object()

        async def pump() -> None:
            try:
                async for response in status_call:
                    await queue.put(response)
            except grpc.aio.AioRpcError as exc:
                await queue.put(exc)
            await queue.put(end)

        async def solved() -> Any:
            return await solve_call

        pumping = asyncio.ensure_future(pump())
        solving = asyncio.ensure_future(solved())
        getter: asyncio.Future | None = None

        def stop() -> None:
            # Cancelling Solve makes BuildKit cancel the job and kill the running step.
            solve_call.cancel()
            status_call.cancel()
            for task in (pumping, solving, getter):
                if task is not None:
                    task.cancel()

        try:
            while True:
                if solving.done():
                    # Status ends right after Solve, except when the job never started
                    # (then BuildKit answers "no such job" only after some seconds).
                    grace = STATUS_GRACE if progress.seen else 0.5
                    try:
                        item = await asyncio.wait_for(queue.get(), grace)
                    except asyncio.TimeoutError:
                        break
                else:
                    getter = asyncio.ensure_future(queue.get())
                    await asyncio.wait({getter, solving}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()  # the item, if any, stays queued for the next get
                        getter = None
                        continue
                    item, getter = getter.result(), None
                if item is end or isinstance(item, grpc.aio.AioRpcError):
                    break  # a Status failure costs only progress lines; Solve decides
                for line in progress.feed(item):
                    yield line
            for line in progress.flush():
                yield line
            try:
                response = await solving
            except grpc.aio.AioRpcError as exc:
                raise self._solve_error(exc, progress, context_url) from None
            except asyncio.CancelledError:
                # grpcio cancels the calls of a channel being closed: close() while
                # building. Anything else is our consumer's cancellation (below).
                if being_cancelled() or not connection.closed:
                    raise
                raise BuilderUnavailable(
                    f"{self.label}: the build was cancelled: the connection to BuildKit was "
                    "closed (is the server stopping?)",
                    step=", ".join(progress.running_steps()) or None,
                ) from None
            result.update(response.ExporterResponse)
        except asyncio.CancelledError:
            # Cancelled by the consumer's task (client gone, server stopping): tell BuildKit
            # first, then say which step it stopped, in the build's own log. The one line
            # delays the cancellation by one item, it does not swallow it: the next
            # __anext__ raises it again.
            stop()
            yield self._cancelled(progress)
            raise
        finally:
            stop()
            waiting = [task for task in (pumping, solving, getter) if task is not None]
            await asyncio.gather(*waiting, return_exceptions=True)


__all__ = [
    "Address",
    "BuildKitBuilder",
    "BuildKitConnection",
    "ContextServer",
    "Daemon",
    "EngineTunnel",
    "Progress",
    "TLSFiles",
    "choose_exporter",
    "parse_address",
]
