"""Benchmark the web page and predictions through the server.

1. The list with 10,000 packages: a real `cog server` (no builder) on a store holding
   10,000 records. Time to first byte of `/` and of the list's first page of data, and
   the full render of the list in Debian's headless Chromium (from navigation start to
   the first page of rows drawn), each the median of fresh page loads; the page's weight
   (bytes over the wire, gzip, images excluded) from the browser's resource timings.
   Goals: under 300 ms to render, under 100 KB.
2. A warm `POST /v1/packages/<id>/predictions` of examples/hello (a form) through a real
   `cog server` with the Docker builder, against the same request sent to the model's
   container directly, one client, keep-alive, alternating rounds. Goal: under 5 ms added
   at p50.

    python benchmarks/bench_web.py [--packages 10000] [--loads 15] [--requests 500]

Needs dockerd, the registry and the base image (contrib/setup-machine.sh) and chromium.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
COG = str(Path(sys.executable).parent / "cog")
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, *options: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [COG, "server", "--host", "127.0.0.1", "--port", str(port),
         "--storage", f"file://{store}", "--log-format", "json", *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=1):
                return process, url
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the server did not start")


def fill_store(store: Path, count: int) -> None:
    from cog.config import load_config
    from cog.server.records import PackageRecord, Status, encode_record

    config = load_config((ROOT / "examples" / "hello" / "cog.yaml").read_text())
    records = store / "records"
    records.mkdir(parents=True)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    statuses = [Status.READY] * 8 + [Status.FAILED, Status.BUILDING]
    for n in range(count):
        package_id = hashlib.sha256(f"package {n}".encode()).hexdigest()
        created = start + dt.timedelta(minutes=n)
        record = PackageRecord(
            id=package_id,
            name=f"team-{n % 37}/model-{n}",
            config=config,
            created=created,
            updated=created,
            status=statuses[n % len(statuses)],
            size=1000 + n * 7,
        )
        (records / f"{package_id}.json").write_bytes(encode_record(record))


async def ttfb(url: str, loads: int) -> float:
    """Median seconds to the first byte of the body, a new connection each time."""
    times = []
    for _ in range(loads):
        async with aiohttp.ClientSession(headers={"Accept-Encoding": "gzip"}) as session:
            began = time.perf_counter()
            async with session.get(url) as response:
                await response.content.readany()
                times.append(time.perf_counter() - began)
    return statistics.median(times)


async def render(url: str, loads: int) -> tuple[float, int, int]:
    """Median ms from navigation start to the first page of rows laid out; the page's bytes
    over the wire (images excluded) and the rows shown."""
    from playwright.async_api import async_playwright

    times, weight, rows = [], 0, 0
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox"]
        )
        for _ in range(loads):
            context = await browser.new_context(viewport={"width": 1280, "height": 800})
            page = await context.new_page()
            await page.goto(url, wait_until="commit")
            # The page marks the moment its rows are laid out, in the frame after it drew
            # them (User Timing): no polling from here adds to the figure.
            await page.wait_for_function(
                "() => performance.getEntriesByName('cog:list-drawn').length > 0"
            )
            times.append(
                await page.evaluate("performance.getEntriesByName('cog:list-drawn')[0].startTime")
            )
            weight = await page.evaluate(
                """() => {
                  const nav = performance.getEntriesByType('navigation')[0].transferSize;
                  return nav + performance.getEntriesByType('resource')
                    .filter(r => r.initiatorType !== 'img')
                    .reduce((sum, r) => sum + r.transferSize, 0);
                }"""
            )
            rows = await page.locator("table.packages tbody tr").count()
            await context.close()
        await browser.close()
    return statistics.median(times), weight, rows


async def latencies(url: str, body: bytes, content_type: str, n: int) -> list[float]:
    times = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            began = time.perf_counter()
            async with session.post(url, data=body, headers={"Content-Type": content_type}) as r:
                await r.read()
                assert r.status == 200, r.status
            times.append(time.perf_counter() - began)
    return times


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


async def predictions(requests: int, rounds: int) -> None:
    from tests.registry_helpers import EXAMPLES, package_bytes, post_package

    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp:
        process, url = start_server(Path(tmp) / "store", "--max-warm", "1")
        try:
            data, package_id = package_bytes(EXAMPLES / "hello")
            status, document = post_package(url, data)
            assert status == 200 and document["Status"] == "ready", document
            boundary = "benchboundary"
            body = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n'
                f"bench\r\n--{boundary}--\r\n"
            ).encode()
            kind = f"multipart/form-data; boundary={boundary}"
            server = f"{url}/v1/packages/{package_id}/predictions"
            await latencies(server, body, kind, 20)  # the container starts, warms up
            container = subprocess.run(
                ["docker", "ps", "--filter", "label=org.cog-models.role=run", "--filter",
                 f"ancestor={document['Artifacts'][0]['URI']}", "--format", "{{.Ports}}"],
                capture_output=True, text=True, check=True,
            ).stdout.split("\n")[0]  # fmt: skip
            port = container.split("->")[0].rsplit(":", 1)[1]
            direct = f"http://127.0.0.1:{port}/infer"
            through, straight = [], []
            for _ in range(rounds):
                straight += await latencies(direct, body, kind, requests // rounds)
                through += await latencies(server, body, kind, requests // rounds)
        finally:
            process.terminate()
            process.wait(timeout=30)
    for label, values in (("container directly", straight), ("through the server", through)):
        print(
            f"  {label:<20} p50 {statistics.median(values) * 1000:6.2f} ms"
            f"   p99 {percentile(values, 0.99) * 1000:6.2f} ms   ({len(values)} requests)"
        )
    added = (statistics.median(through) - statistics.median(straight)) * 1000
    print(f"  added at p50: {added:.2f} ms (goal: under 5 ms): {'met' if added < 5 else 'NOT met'}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", type=int, default=10_000)
    parser.add_argument("--loads", type=int, default=15)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp:
        store = Path(tmp) / "store"
        fill_store(store, args.packages)
        process, url = start_server(store, "--builder", "none")
        try:
            page_ttfb = await ttfb(f"{url}/", args.loads)
            data_ttfb = await ttfb(f"{url}/v1/packages/?limit=100", args.loads)
            rendered, weight, rows = await render(f"{url}/", args.loads)
        finally:
            process.terminate()
            process.wait(timeout=30)
    print(f"The list with {args.packages:,} packages ({args.loads} fresh loads, medians):")
    print(f"  time to first byte: / {page_ttfb * 1000:.1f} ms, first page of data "
          f"{data_ttfb * 1000:.1f} ms")  # fmt: skip
    met = "met" if rendered < 300 else "NOT met"
    print(f"  full render ({rows} rows drawn): {rendered:.0f} ms (goal: under 300 ms): {met}")
    met = "met" if weight < 100_000 else "NOT met"
    print(f"  page weight: {weight / 1000:.1f} KB over the wire (goal: under 100 KB): {met}")
    print("Warm POST /predictions (examples/hello, a form):")
    await predictions(args.requests, args.rounds)


if __name__ == "__main__":
    os.environ.setdefault("NO_COLOR", "1")
    asyncio.run(main())
