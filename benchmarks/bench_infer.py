"""Benchmark ``POST /infer`` of a no-op model: cog's inference server against the floor.

The floor is a bare aiohttp handler doing the same call (parse the same multipart form,
call the same model's run(), answer its text), served in the same way, measured in the
same run. Both servers are subprocesses on 127.0.0.1; the client is a minimal keep-alive
HTTP/1.1 client (asyncio streams, pre-encoded requests) so that it, not the servers, is
the lighter side. Rounds alternate between the two servers to spread machine noise.

Goal: p50 latency overhead under 1 ms over the floor and throughput >= 70% of it.

    python benchmarks/bench_infer.py [--clients 1,8] [--requests 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import NamedTuple

MODEL = textwrap.dedent(
    """
    import cog


    class Model(cog.Model):
        @cog.input("text", type=str)
        def run(self, text):
            return text
    """
)

FLOOR = textwrap.dedent(
    """
    import sys

    from aiohttp import web

    sys.path.insert(0, ".")
    from infer import Model

    model = Model()
    model.setup()


    async def infer(request):
        form = await request.post()
        return web.Response(text=model.run(**form))


    async def ping(request):
        return web.json_response({"status": "ready"})


    app = web.Application()
    app.router.add_post("/infer", infer)
    app.router.add_get("/ping", ping)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
    """
)

BOUNDARY = "cogbenchboundary"
BODY = (
    f"--{BOUNDARY}\r\n"
    'Content-Disposition: form-data; name="text"\r\n\r\n'
    "hello\r\n"
    f"--{BOUNDARY}--\r\n"
).encode()
EXPECTED = b"hello"
BOUND = 30.0  # seconds; the benchmark stops itself


class Result(NamedTuple):
    latencies: list[float]
    seconds: float
    errors: int

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) * 1000

    @property
    def p99(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_bytes(port: int) -> bytes:
    head = (
        "POST /infer HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    )
    return head.encode() + BODY


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def wait_ready(port: int) -> None:
    deadline = time.monotonic() + BOUND
    request = f"GET /ping HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.write(request)
        status, _ = await read_response(reader)
        writer.close()
        if status == 200:
            return
        await asyncio.sleep(0.05)
    raise SystemExit(f"the server on port {port} did not become ready")


async def drive(port: int, clients: int, requests: int) -> Result:
    """``requests`` inferences over ``clients`` keep-alive connections."""
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
                if status != 200 or body != EXPECTED:
                    errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(clients))), BOUND)
    return Result(latencies, time.perf_counter() - started, errors)


def merge(results: list[Result]) -> Result:
    return Result(
        [t for r in results for t in r.latencies],
        sum(r.seconds for r in results),
        sum(r.errors for r in results),
    )


async def benchmark(args: argparse.Namespace, ports: dict[str, int]) -> bool:
    for port in ports.values():
        await wait_ready(port)
        await drive(port, 4, 300)  # warm up both servers and their connections
    met = True
    print(f"{'clients':>7} {'server':<6} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
    for clients in args.clients:
        runs: dict[str, list[Result]] = {name: [] for name in ports}
        for _ in range(args.rounds):
            for name, port in ports.items():
                runs[name].append(await drive(port, clients, args.requests))
        merged = {name: merge(results) for name, results in runs.items()}
        for name, result in merged.items():
            errors = f"  ({result.errors} errors)" if result.errors else ""
            print(
                f"{clients:>7} {name:<6} {len(result.latencies):>8} {result.p50:>8.3f} "
                f"{result.p99:>8.3f} {result.rate:>8.0f}{errors}"
            )
        floor, cog = merged["floor"], merged["cog"]
        overhead = cog.p50 - floor.p50
        share = cog.rate / floor.rate
        ok = overhead < 1.0 and share >= 0.7 and not cog.errors and not floor.errors
        met = met and ok
        print(
            f"{'':>7} p50 overhead {overhead:+.3f} ms, throughput {share:.0%} of the floor: "
            f"{'goal met' if ok else 'GOAL NOT MET'}"
        )
    return met


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
        "--server-args",
        default="",
        help="extra arguments for python -m cog.runtime, e.g. '--log-level debug'",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cog-bench-") as directory:
        with open(os.path.join(directory, "cog.yaml"), "w") as f:
            f.write('model: "infer.py:Model"\n')
        with open(os.path.join(directory, "infer.py"), "w") as f:
            f.write(MODEL)
        with open(os.path.join(directory, "floor.py"), "w") as f:
            f.write(FLOOR)
        ports = {"floor": free_port(), "cog": free_port()}
        log = open(os.path.join(directory, "cog-server.log"), "w")  # noqa: SIM115
        commands = {
            "floor": [sys.executable, "floor.py", str(ports["floor"])],
            "cog": [
                *(sys.executable, "-m", "cog.runtime", "--host", "127.0.0.1"),
                *("--port", str(ports["cog"]), *args.server_args.split()),
            ],
        }
        processes = [
            subprocess.Popen(command, cwd=directory, stdout=subprocess.DEVNULL, stderr=log)
            for command in commands.values()
        ]
        try:
            print(
                f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, "
                f"cog.runtime {args.server_args or '(defaults)'}; model: run() returns its input"
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
