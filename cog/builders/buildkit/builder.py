"""The BuildKit builder: its options, the probe that chooses an exporter, the ``Solve`` with
``Status`` alongside, the push of a ``moby`` export, and gRPC errors as builder errors."""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import urllib.parse
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import grpc

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
    ImageLoaded,
    being_cancelled,
)
from cog.builders.buildkit.address import Address, parse_address
from cog.builders.buildkit.connection import BuildKitConnection, TLSFiles
from cog.builders.buildkit.context_server import ContextServer
from cog.builders.buildkit.pb import messages as pb
from cog.builders.buildkit.progress import Progress
from cog.builders.dockerfile import dockerfile_for_request, missing_base_image
from cog.engine.client import engine_address

DEFAULT_ADDR = "docker-grpc://"
#: after Solve has answered, how long to wait for the Status stream's last messages
STATUS_GRACE = 3.0
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
        "pip_cache",
    }
)
#: The cache mount pip's downloads go to, shared by every package this BuildKit builds
DEFAULT_PIP_CACHE = "cog-pip"
_CACHE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TLS_WORDS = ("ssl", "tls", "handshake", "certificate", "verification")


@attrs.frozen
class BuildKitInfo:
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
        pip_cache = options.get("pip_cache", DEFAULT_PIP_CACHE)
        if pip_cache != "off" and not _CACHE_ID.fullmatch(pip_cache):
            raise BuilderConfigError(
                f"buildkit option pip_cache={pip_cache!r}: a cache ID (letters, digits, "
                "'.', '_', '-'), or off"
            )
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

    @property
    def pip_cache(self) -> str | None:
        """The ID of the cache mount for pip's downloads; None when the operator said off."""
        cache = self.settings.options.get("pip_cache", DEFAULT_PIP_CACHE)
        return None if cache == "off" else cache

    def dockerfile(self, request: BuildRequest) -> str:
        # A build without the cache gets no cache mount either: BuildKit keeps a cache
        # mount's contents through no-cache.
        return dockerfile_for_request(request, self.settings, pip_cache=self.pip_cache)

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
        self, exc: grpc.aio.AioRpcError, progress: Progress, context_url: str, build: BuildRequest
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
            base = step.removeprefix(RESOLVE_BASE)
            where = "where BuildKit looks for it (for a Docker Engine's BuildKit: that engine)"
            message = missing_base_image(
                build.config, build.target, self.settings, base, where, details
            )
            return BuilderUnavailable(f"{self.label}: {message}", step=step)
        if code == grpc.StatusCode.CANCELLED:
            running = ", ".join(progress.running_steps()) or None
            return BuildError(
                f"{self.label}: the build was cancelled: {details}", step=step or running
            )
        return BuildError(f"{self.label}: {details}", step=step, output=output)

    # -- building ----------------------------------------------------------------------

    async def probe(self) -> BuildKitInfo:
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
        return BuildKitInfo(
            version=version,
            workers=tuple(worker.ID for worker in workers),
            exporter=choose_exporter(self.exporter, self.address, workers),
        )

    def solve_request(
        self, ref: str, context_url: str, image: str, exporter: str, *, no_cache: bool = False
    ) -> Any:
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
        if no_cache:
            request.FrontendAttrs["no-cache"] = ""  # empty: no stage uses the cache
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
        buildkit = await self.probe()
        if buildkit.exporter == "moby" and self.push_engine is None:
            raise BuilderUnavailable(self._no_push_engine(buildkit))
        ref = f"cog-{secrets.token_hex(12)}"
        yield BuildLog(stage="build", line=f"{self.label}: {buildkit.describe()}")
        yield BuildLog(stage="build", line=f"{self.label}: solving {ref}")
        async with self._context.offer(request.package_zip, self.dockerfile(request)) as url:
            solve = self.solve_request(
                ref, url, request.image, buildkit.exporter, no_cache=request.no_cache
            )
            result: dict[str, str] = {}
            # aclosing: a build closed by its consumer cancels the Solve now, not when the
            # generator is collected.
            async with contextlib.aclosing(self._solve(solve, url, result, request)) as lines:
                async for line in lines:
                    yield BuildLog(stage="build", line=line)
        digest = result.get("containerimage.digest", "")
        if buildkit.exporter == "image":
            if not digest:
                raise BuildError(f"{self.label}: pushed {request.image} but reported no digest")
            yield BuildLog(stage="push", line=f"BuildKit pushed {request.image}: {digest}")
            yield BuiltImage(image=request.image, digest=digest)
            return
        from cog.builders.push import push_events  # aiodocker only for this path
        from cog.engine import Engine, EngineError, RegistryAuth

        where = self.push_engine
        assert where is not None  # a moby export without one was refused at the start
        if self._engine is None:
            try:
                self._engine = Engine(
                    where, registry_auth=RegistryAuth(self.settings.registry_auth)
                )
            except EngineError as exc:
                raise BuilderUnavailable(exc.message, step="push") from None
        yield BuildLog(
            stage="push",
            line=f"Image {digest or request.image} is in the Docker Engine at {where}; "
            "pushing it from there",
        )
        if engine_address(where) == engine_address(self.settings.docker_host):
            # The engine the server checks models on: the check may start now.
            yield ImageLoaded(request.image)
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

    def _no_push_engine(self, buildkit: BuildKitInfo) -> str:
        return (
            f"{self.label}: its worker ({', '.join(buildkit.workers)}) is a Docker Engine's "
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

    async def _solve(
        self, request: Any, context_url: str, result: dict, build: BuildRequest
    ) -> AsyncIterator[str]:
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
                raise self._solve_error(exc, progress, context_url, build) from None
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
