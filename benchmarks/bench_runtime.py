"""Benchmark ``POST /predictions``: this runtime against replicate's own and a bare handler.

The same trivial predictor (``str -> "hello " + str``, ``async``, ``concurrency.max`` 16)
is served three ways, each a subprocess on 127.0.0.1, measured in one run with rounds
alternating between them:

- ``bare``: an aiohttp JSON handler that calls the predictor in its own process (the
  floor: no validation, no worker process);
- ``cog``: this project's runtime (``python -m cog.runtime``: the model in a worker
  process);
- ``replicate``: replicate's runtime, from ``pip install cog`` into a separate virtualenv
  (``--replicate-venv``, made when missing; never this project's), which brings its Rust
  server (coglet). It is given the OpenAPI schema this project writes (Cog's shape), so
  it validates inputs as it does in a built image.

The client is a minimal keep-alive HTTP/1.1 client (asyncio streams, pre-encoded
requests). Every answer is checked (HTTP 200, succeeded, the output); a 409 counts as an
error. Goal: ahead of replicate's runtime on latency and throughput, and p50 within 1.5x
of the bare handler.

    python benchmarks/bench_runtime.py [--clients 1,8] [--requests 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

from bench_infer import BOUND, Result, free_port, merge, read_response

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cog.openapi import openapi_document
from cog.server.source import static_signature

PREDICTOR = textwrap.dedent(
    """
    from cog import BasePredictor


    class Predictor(BasePredictor):
        async def predict(self, text: str) -> str:
            return "hello " + text
    """
)
CONFIG = (
    'build:\n  python_version: "3.11"\npredict: "predict.py:Predictor"\nconcurrency:\n  max: 16\n'
)

BARE = textwrap.dedent(
    """
    import json
    import sys

    from aiohttp import web

    sys.path.insert(0, ".")
    from predict import Predictor

    predictor = Predictor()


    async def predictions(request):
        body = await request.json()
        output = await predictor.predict(**body["input"])
        return web.Response(
            body=json.dumps({"status": "succeeded", "output": output}).encode(),
            content_type="application/json",
        )


    async def health(request):
        return web.json_response({"status": "READY"})


    app = web.Application()
    app.router.add_post("/predictions", predictions)
    app.router.add_get("/health-check", health)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
    """
)

BODY = json.dumps({"input": {"text": "world"}}).encode()


def request_bytes(port: int) -> bytes:
    head = (
        "POST /predictions HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    )
    return head.encode() + BODY


def answered(status: int, body: bytes) -> bool:
    if status != 200:
        return False
    answer = json.loads(body)
    return answer.get("status") == "succeeded" and answer.get("output") == "hello world"


async def wait_ready(port: int) -> None:
    deadline = time.monotonic() + BOUND
    request = f"GET /health-check HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.write(request)
        status, body = await read_response(reader)
        writer.close()
        if status == 200 and json.loads(body).get("status") == "READY":
            return
        await asyncio.sleep(0.05)
    raise SystemExit(f"the server on port {port} did not become ready")


async def drive(port: int, clients: int, requests: int) -> Result:
    payload = request_bytes(port)
    latencies: list[float] = []
    errors = 0
    remaining = requests

    async def client() -> None:
        nonlocal remaining, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                writer.write(payload)
                status, body = await read_response(reader)
                latencies.append(time.perf_counter() - started)
                if not answered(status, body):
                    errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), BOUND * 4)
    return Result(latencies, time.perf_counter() - started, errors)


async def benchmark(args: argparse.Namespace, ports: dict[str, int]) -> bool:
    for port in ports.values():
        await wait_ready(port)
        await drive(port, 4, 300)  # warm up every server and its connections
    met = True
    print(
        f"{'clients':>7} {'server':<10} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'req/s':>8} {'p50/bare':>9} {'req/s/bare':>10}"
    )
    for clients in args.clients:
        runs: dict[str, list[Result]] = {name: [] for name in ports}
        for _ in range(args.rounds):
            for name, port in ports.items():
                runs[name].append(await drive(port, clients, args.requests))
        merged = {name: merge(results) for name, results in runs.items()}
        bare = merged["bare"]
        for name, result in merged.items():
            errors = f"  ({result.errors} errors)" if result.errors else ""
            print(
                f"{clients:>7} {name:<10} {len(result.latencies):>8} {result.p50:>8.3f} "
                f"{result.p99:>8.3f} {result.rate:>8.0f} {result.p50 / bare.p50:>9.2f} "
                f"{result.rate / bare.rate:>10.2f}{errors}"
            )
        ours = merged["cog"]
        ok = ours.p50 <= 1.5 * bare.p50 and not ours.errors
        if "replicate" in merged:
            theirs = merged["replicate"]
            ok = ok and ours.p50 < theirs.p50 and ours.rate > theirs.rate
        met = met and ok
        print(f"{'':>7} {'goal met' if ok else 'GOAL NOT MET'}")
    return met


def replicate_python(venv: str) -> str | None:
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        print(f"making {venv} with replicate's cog (pip install cog)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        installed = subprocess.run([python, "-m", "pip", "install", "-q", "cog"], check=False)
        if installed.returncode:
            return None
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--clients",
        type=lambda s: [int(n) for n in s.split(",")],
        default=[1, 8],
        help="concurrent clients, comma-separated (default 1,8)",
    )
    parser.add_argument("--requests", type=int, default=3000, help="per round and server")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--replicate-venv",
        default=os.path.join(tempfile.gettempdir(), "cog-bench-replicate"),
        help="a virtualenv with replicate's cog (made when missing); 'none' to skip it",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cog-bench-") as directory:
        for name, text in (("cog.yaml", CONFIG), ("predict.py", PREDICTOR), ("bare.py", BARE)):
            with open(os.path.join(directory, name), "w") as f:
                f.write(text)
        # The schema a build writes for replicate's runtime (in Cog's shape; ours makes it).
        signature = static_signature(PREDICTOR, "Predictor", "predict.py")
        os.makedirs(os.path.join(directory, ".cog"))
        with open(os.path.join(directory, ".cog", "openapi_schema.json"), "w") as f:
            json.dump(openapi_document(signature), f)
        ports = {"bare": free_port(), "cog": free_port()}
        commands = {
            "bare": ([sys.executable, "bare.py", str(ports["bare"])], {}),
            "cog": (
                [
                    *(sys.executable, "-m", "cog.runtime", "--host", "127.0.0.1"),
                    *("--port", str(ports["cog"]), "--log-level", "warning"),
                ],
                {},
            ),
        }
        replicate = None if args.replicate_venv == "none" else replicate_python(args.replicate_venv)
        if replicate is not None:
            ports["replicate"] = free_port()
            commands["replicate"] = (
                [replicate, "-m", "cog.server.http", "--host", "127.0.0.1"],
                {
                    # coglet starts its worker with the `python` on PATH: the venv's.
                    "PATH": os.path.dirname(replicate) + os.pathsep + os.environ["PATH"],
                    "PORT": str(ports["replicate"]),
                    "COG_PREDICT_TYPE_STUB": "predict.py:Predictor",
                    "COG_MAX_CONCURRENCY": "16",
                    "RUST_LOG": "warn",
                },
            )
        log = open(os.path.join(directory, "servers.log"), "w")  # noqa: SIM115
        processes = [
            subprocess.Popen(
                command,
                cwd=directory,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, **extra},
            )
            for command, extra in commands.values()
        ]
        try:
            version = ""
            if replicate is not None:
                version = subprocess.run(
                    [replicate, "-c", "import cog; print(cog.__version__)"],
                    cwd=tempfile.gettempdir(),
                    capture_output=True,
                    text=True,
                ).stdout.strip()
            print(
                f"python {sys.version.split()[0]}, {os.cpu_count()} cpus; predictor: async, "
                f"concurrency.max 16; replicate's cog {version or '(not run)'}"
            )
            met = asyncio.run(benchmark(args, ports))
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(BOUND)
            log.close()
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
