"""``python -m cog.runtime``: serve the model named in ./cog.yaml.

Options (each also from the environment): ``--port`` ($PORT, default 5000), ``--host``
($COG_HOST, default 0.0.0.0), ``--unix-socket`` ($COG_UNIX_SOCKET: listen on this Unix
socket instead of a port, as the cog server and ``cog infer`` ask of a model that runs
with no network), ``--concurrency`` ($COG_CONCURRENCY or Cog's $COG_MAX_CONCURRENCY;
default cog.yaml's ``concurrency.max``, else 1: predictions at once), ``--max-queue``
($COG_MAX_QUEUE, default 64: requests that may wait for one), ``--dir`` (the package
directory, default the working directory), ``--python`` ($COG_WORKER_PYTHON: the Python
that runs the model, default this one), ``--upload-url`` ($COG_UPLOAD_URL: where file
outputs of predictions are uploaded), ``--log-level``
($COG_LOG_LEVEL, default info; debug adds a line per inference).

The model's worker process starts first, before this server imports aiohttp (its
largest import), so that the model is imported and set up while the server starts; the
port is open as soon as the server is, and ``/ping`` answers 503 ``starting`` until the
model's setup is over. On SIGTERM (or SIGINT) the server
finishes the running inferences (and sends their responses), answers the queued and any
new ones with 503 at once, and exits 0; a second signal exits at once with status 1.
Logs (including the model's stdout/stderr) go to stderr.
"""

from __future__ import annotations

# Standard library only (and the small worker_process) until the model's worker runs: it
# imports the model and runs its setup while this process imports aiohttp and the server.
import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from cog.runtime.worker_process import (
    DEFAULT_MAX_QUEUE,
    StartedWorker,
    cannot_start,
    start_worker,
)

if TYPE_CHECKING:
    from cog.runtime.app import InferenceServer
    from cog.runtime.model_ref import ModelRef

logger = logging.getLogger("cog.runtime")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        sys.exit(f"${name} must be an integer, not {value!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cog.runtime", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default=os.environ.get("COG_HOST", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=_env_int("PORT", 5000))
    parser.add_argument(
        "--unix-socket",
        default=os.environ.get("COG_UNIX_SOCKET") or None,
        help="listen on this Unix socket (made writable by anyone: its directory says who "
        "may reach it) instead of --host/--port",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        # $COG_MAX_CONCURRENCY: Cog's name for the same
        default=_env_int("COG_CONCURRENCY", 0) or _env_int("COG_MAX_CONCURRENCY", 0) or None,
        help="predictions that may run at once (default: cog.yaml's concurrency.max, or 1)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=_env_int("COG_MAX_QUEUE", DEFAULT_MAX_QUEUE),
        help="requests that may wait for a free inference slot; more get 503",
    )
    parser.add_argument("--dir", default=".", help="the package directory (with cog.yaml)")
    parser.add_argument(
        "--upload-url",
        default=os.environ.get("COG_UPLOAD_URL") or None,
        help="upload file outputs of predictions here (PUT <url>/<name>) instead of data: URIs",
    )
    parser.add_argument(
        "--python",
        default=os.environ.get("COG_WORKER_PYTHON") or sys.executable,
        help="the Python that runs the model (its environment needs only cog's model API)",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("COG_LOG_LEVEL", "info").lower(),
        choices=["debug", "info", "warning", "error"],
        help="debug adds a line per inference (status and time)",
    )
    args = parser.parse_args(argv)
    if args.concurrency is not None and args.concurrency < 1:
        parser.error("--concurrency must be 1 or more")
    if args.max_queue < 0:
        parser.error("--max-queue must be 0 or more")
    return args


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)  # the real stderr, before it is wrapped
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level.upper())


async def serve(
    server: InferenceServer, host: str, port: int, unix_socket: str | None = None
) -> int:
    """Serve until SIGTERM/SIGINT, then shut down gracefully; the exit status."""
    import asyncio
    import signal

    from aiohttp import web

    from cog.tls import load_certificates_in_background

    loop = asyncio.get_running_loop()
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (force if stop.is_set() else stop).set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)

    # handler_cancellation: a client that hangs up cancels its request, so a queued
    # inference nobody waits for any more is skipped instead of run.
    app_runner = web.AppRunner(
        server.app, handle_signals=False, access_log=None, handler_cancellation=True
    )
    await app_runner.setup()
    if unix_socket:
        # Whoever runs the container may be another user than the model's: the socket's
        # directory (made by them) says who can reach it, not the socket's own mode.
        site: web.BaseSite = web.UnixSite(app_runner, unix_socket)
        await site.start()
        os.chmod(unix_socket, 0o666)
        logger.info("listening on unix:%s", unix_socket)
    else:
        site = web.TCPSite(app_runner, host, port)
        await site.start()
        for address in app_runner.addresses:
            logger.info("listening on http://%s:%s", *address[:2])
    # aiohttp's certificates (put off at its import): before any prediction needs them.
    load_certificates_in_background(lambda: logger.debug("aiohttp's certificates loaded"))

    await stop.wait()
    running, refused = server.runner.stop()
    logger.info(
        "shutting down: finishing %d running inference(s); refused %d queued request(s) "
        "and refusing new ones",
        running,
        refused,
    )
    drain = asyncio.ensure_future(server.runner.drain())
    forced = asyncio.ensure_future(force.wait())
    await asyncio.wait([drain, forced], return_when=asyncio.FIRST_COMPLETED)
    if force.is_set():
        logger.warning("second signal: exiting without waiting")
        server.runner.kill_now()
        return 1
    forced.cancel()
    await app_runner.cleanup()
    logger.info("stopped")
    return 0


def start_early(args: argparse.Namespace) -> tuple[ModelRef | None, StartedWorker | None, str]:
    """Read the model in cog.yaml and start its worker, before aiohttp is imported: the
    model (None when cog.yaml names none), its started worker, and why there is none (no
    model, or a --python that cannot run)."""
    from cog.runtime.model_ref import ModelLoadError, ModelRef

    try:
        model = ModelRef.from_directory(args.dir)
    except ModelLoadError as e:
        return None, None, str(e)
    try:
        started = start_worker(
            args.python,
            model.reference,
            directory=model.directory,
            concurrency=args.concurrency or model.concurrency,
            env=model.worker_env(),
        )
    except OSError as e:
        return model, None, cannot_start(args.python, e)
    logger.info("started the model's worker process (pid %d)", started.process.pid)
    return model, started, ""


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    model, started, error = start_early(args)

    import asyncio

    from cog.tls import certificates_put_off, import_aiohttp

    import_aiohttp()  # its certificates put off: loaded once listening (see serve)
    from cog.runtime.app import InferenceServer

    logger.debug(
        "imported the inference server (%d certificate loads of aiohttp's put off)",
        certificates_put_off(),
    )
    settings = {
        "concurrency": args.concurrency,
        "max_queue": args.max_queue,
        "python": args.python,
        "upload_url": args.upload_url,
    }
    if model is None:  # /ping says why
        server = InferenceServer("-", directory=args.dir, load_error=error, **settings)
    else:
        server = InferenceServer(model, load_error=error or None, started=started, **settings)
    status = asyncio.run(serve(server, args.host, args.port, args.unix_socket))
    sys.stdout.flush()
    sys.stderr.flush()
    if status:
        os._exit(status)


if __name__ == "__main__":
    main()
