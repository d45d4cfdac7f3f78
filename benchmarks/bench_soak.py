"""A soak of one cog server with the Docker builder, as hostile users would load it (not a
test: figures, each next to the target the trust issue names).

    flock /tmp/cog-integration.lock .venv/bin/python benchmarks/bench_soak.py

Needs the machine of contrib/setup-machine.sh (dockerd, the registry on 127.0.0.1:5000,
python:3.11-slim); the engine is shared, so hold the integration lock while it runs.

1. Concurrency: 8 parallel uploads of one new package and 4 different new packages at the
   same time, all with build streams: every upload must end `ready`, and the server's log
   must show one build per package ID. The server's peak RSS (VmHWM) through it.
2. A check whose model answers 1 GiB (its example expects a 64 KiB file): the server's
   peak RSS through that check. Target: under 150 MiB.
3. `/ping` every 5 ms while configs at the bounds (256 KiB, 100 examples, ~19,000 values)
   and over them (8 MB) are uploaded, 4 at a time: p50, p99, max. Target: p99 under 50 ms.
4. kill -9 of the server during each phase (an upload being spooled, a build, a check, a
   rebuild), then a restart on the same storage and temp dir: the files left in the temp
   dir and the check containers left on the engine, after the restart (targets: zero),
   and, after the stale limit (--stale-after 8 here), the records still `building`
   (target: zero).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cog.events import NDJSON  # noqa: E402
from cog.package import write_package  # noqa: E402
from tests.test_cli import free_port, wait_for  # noqa: E402

COG = str(Path(sys.executable).parent / "cog")
MiB = 1024 * 1024
STALE_AFTER = 8.0
#: uploads of each heavy config in phase 3
ROUNDS = 40
MODEL = """\
import time

import cog


class Model(cog.Model):
    def setup(self):
        time.sleep({setup_sleep})

    @cog.input("text", type=str, default="hi")
    def run(self, text):
{run}
"""
ECHO = "        return text.upper()"
GIGABYTE = """\
        path = cog.request_directory() / "answer.bin"
        with open(path, "wb") as out:
            out.truncate(1024 ** 3)
        return cog.Path(path)"""


def model(
    root: Path,
    name: str,
    *,
    run: str = ECHO,
    setup_sleep: float = 0,
    output: str = "HI",
    extra_env: str = "",
    files: dict[str, bytes] | None = None,
) -> Path:
    root.mkdir(parents=True)
    (root / "cog.yaml").write_text(
        f"name: {name}\nmodel: infer.py:Model\nenvironment:\n  python_version: '3.11'\n"
        f"{extra_env}examples:\n  - input: {{text: hi}}\n    output: '{output}'\n"
        f"# {uuid.uuid4().hex}\n"  # a new package each run
    )
    (root / "infer.py").write_text(MODEL.format(run=run, setup_sleep=setup_sleep))
    for file_name, data in (files or {}).items():
        (root / file_name).write_bytes(data)
    return root


def zipped(root: Path) -> tuple[bytes, str]:
    with tempfile.SpooledTemporaryFile() as out:
        package_id = write_package(root, out)
        out.seek(0)
        return out.read(), package_id


class Server:
    def __init__(self, work: Path, registry: str):
        self.work, self.registry = work, registry
        self.tmp = work / "tmp"
        self.log = work / "server.log"
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> None:
        port = free_port()
        args = [
            COG, "server", "--host", "127.0.0.1", "--port", str(port),
            "--storage", f"file://{self.work / 'store'}", "--tmp-dir", str(self.tmp),
            "--docker-registry", self.registry, "--log-format", "json",
            "--stale-after", str(STALE_AFTER), "--check-timeout", "120", "--max-builds", "2",
        ]  # fmt: skip
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        wait_for(f"{self.url}/ping", timeout=60)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)

    def reset_peak(self) -> None:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def peak_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
        return float("nan")

    def builds_started(self) -> collections.Counter[str]:
        counts: collections.Counter[str] = collections.Counter()
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("event") == "build started":
                    counts[entry["package_id"]] += 1
        return counts


async def upload(
    session: aiohttp.ClientSession,
    url: str,
    data: bytes,
    until: str = "",
    seen: asyncio.Event | None = None,
) -> list:
    """An upload with a build stream: its events. `seen` is set at the first event that
    holds `until`; the stream is read on (leaving it would cancel the build)."""
    form = aiohttp.FormData()
    form.add_field("file", data, filename="p.zip", content_type="application/zip")
    events = []
    async with session.post(f"{url}/v1/packages/upload", data=form,
                            headers={"Accept": NDJSON}) as response:  # fmt: skip
        if response.status != 200:
            return [{"type": "error", "status": response.status, "message": await response.text()}]
        async for line in response.content:
            if line.strip():
                events.append(json.loads(line))
                if seen is not None and until in line.decode():
                    seen.set()
    return events


# -- 1 and 2 --------------------------------------------------------------------------


async def concurrency(server: Server, work: Path) -> dict:
    same, same_id = zipped(model(work / "same", "bench/same"))
    others = [zipped(model(work / f"other{i}", f"bench/other{i}")) for i in range(4)]
    server.reset_peak()
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(
            *(upload(session, server.url, same) for _ in range(8)),
            *(upload(session, server.url, data) for data, _ in others),
        )
    finals = [events[-1] for events in results]
    ids = [same_id] + [package_id for _, package_id in others]
    builds = server.builds_started()
    return {
        "uploads": len(finals),
        "ended_ready": sum(
            f["type"] == "package" and f["package"]["Status"] == "ready" for f in finals
        ),
        "builds_per_id": sorted(builds[i] for i in ids),
        "seconds": round(time.monotonic() - started, 1),
        "peak_rss_mib": server.peak_mib(),
        "ids": ids,
    }


async def gigabyte_answer(server: Server, work: Path) -> dict:
    root = model(work / "gigabyte", "bench/gigabyte", run=GIGABYTE, output="@expected.bin",
                 files={"expected.bin": bytes(64 * 1024)})  # fmt: skip
    data, _ = zipped(root)
    server.reset_peak()
    async with aiohttp.ClientSession() as session:
        events = await upload(session, server.url, data)
    return {
        "check_result": events[-1].get("message", events[-1]["type"])[:160],
        "peak_rss_mib": server.peak_mib(),
        "target_mib": 150,
    }


# -- 3 --------------------------------------------------------------------------------


def heavy_config(i: int, size: str) -> bytes:
    """A cog.yaml at the bounds (or over them), refused only after it is all read: one
    unpinned package makes it invalid, so nothing is built."""
    count = 100 if size == "bounds" else 180_000
    examples = "".join(
        f"  - input: {{text: '{'x' * 40}{j}', a{j % 7}: '{j}'}}\n    output: '{'y' * 30}'\n"
        for j in range(count)
    )
    packages = "".join(f"    - p{k}=={k}.0\n" for k in range(1500 if size == "bounds" else 10))
    text = (
        f"name: bench/heavy{i}\nmodel: infer.py:Model\nenvironment:\n  python_version: '3.11'\n"
        f"  python_packages:\n{packages}    - unpinned\nexamples:\n{examples}"
    )
    if size == "bounds":
        text += "# " + "z" * max(0, 250 * 1024 - len(text)) + "\n"
    from tests.registry_helpers import raw_zip

    return raw_zip({"cog.yaml": text, "infer.py": MODEL.format(run=ECHO, setup_sleep=0)})


async def ping_under_heavy_configs(server: Server) -> dict:
    latencies: list[float] = []
    statuses: collections.Counter[int] = collections.Counter()
    done = asyncio.Event()
    bodies = [heavy_config(i, "bounds") for i in range(4)] + [heavy_config(9, "over")]

    async with aiohttp.ClientSession() as session:

        async def pinger() -> None:
            while not done.is_set():
                started = time.perf_counter()
                async with session.get(f"{server.url}/ping") as response:
                    await response.read()
                latencies.append(time.perf_counter() - started)
                await asyncio.sleep(0.005)

        async def uploader(body: bytes) -> None:
            for _ in range(ROUNDS):
                form = aiohttp.FormData()
                form.add_field("file", body, filename="p.zip", content_type="application/zip")
                async with session.post(f"{server.url}/v1/packages/upload", data=form) as r:
                    await r.read()
                    statuses[r.status] += 1

        idle: list[float] = []
        for _ in range(200):  # the same pings with nothing else going on, to compare
            began = time.perf_counter()
            async with session.get(f"{server.url}/ping") as response:
                await response.read()
            idle.append(time.perf_counter() - began)
            await asyncio.sleep(0.005)
        pinging = asyncio.ensure_future(pinger())
        started = time.monotonic()
        await asyncio.gather(*(uploader(body) for body in bodies))
        seconds = time.monotonic() - started
        done.set()
        await pinging
    ms = sorted(x * 1000 for x in latencies)
    idle_ms = sorted(x * 1000 for x in idle)
    return {
        "idle_ping_p50_ms": round(statistics.median(idle_ms), 2),
        "idle_ping_p99_ms": round(idle_ms[int(len(idle_ms) * 0.99) - 1], 2),
        "config_uploads": sum(statuses.values()),
        "statuses": dict(statuses),
        "seconds": round(seconds, 1),
        "pings": len(ms),
        "ping_p50_ms": round(statistics.median(ms), 2),
        "ping_p99_ms": round(ms[int(len(ms) * 0.99) - 1], 2),
        "ping_max_ms": round(ms[-1], 2),
        "target_p99_ms": 50,
        "config_bytes": len(bodies[0]),
    }


# -- 4 --------------------------------------------------------------------------------


def left_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.name != ".lock")  # fmt: skip


def check_containers() -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-a", "--filter", "label=org.cog-models.role=check",
         "--format", "{{.Names}}"], capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return out.split()


def containers_since(moment: float) -> list[str]:
    """Containers created after moment (the Docker build's own steps have no label)."""
    out = subprocess.run(
        ["docker", "ps", "-a", "--format", "{{.ID}} {{.Names}}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    found = []
    for line in out.splitlines():
        container_id, name = line.split(" ", 1)
        created = subprocess.run(
            ["docker", "inspect", "-f", "{{.Created}}", container_id], capture_output=True,
            text=True,
        ).stdout.strip()  # fmt: skip
        if created and _epoch(created) > moment:
            found.append(name)
    return found


def _epoch(text: str) -> float:
    import datetime as dt

    day, _, rest = text.partition("T")
    clock = rest.rstrip("Z").split(".")[0]
    return dt.datetime.fromisoformat(f"{day}T{clock}+00:00").timestamp()


async def kill_during(server: Server, work: Path, phase: str, ready_id: str) -> dict:
    """Start `phase`, kill -9 the server in the middle of it, restart: what is left."""
    moment = time.time() - 1
    async with aiohttp.ClientSession() as session:
        if phase == "upload":
            data = bytes(64 * MiB)  # spooled slowly: the body is sent in pieces
            target = asyncio.ensure_future(_slow_upload(session, server.url, data))
            await _until(lambda: any(server.tmp.rglob("upload-*")))
        elif phase == "build":
            # A requirements file of its own: its layer and every one after it are built.
            requirements = f"six==1.16.0\n# {uuid.uuid4()}\n".encode()
            root = model(
                work / "slowbuild",
                "bench/slowbuild",
                extra_env="  python_requirements: requirements.txt\n",
                files={"requirements.txt": requirements},
            )
            data, _ = zipped(root)
            seen = asyncio.Event()
            target = asyncio.ensure_future(
                upload(session, server.url, data, until="pip install", seen=seen)
            )
            await seen.wait()
        elif phase == "check":
            root = model(work / "slowcheck", "bench/slowcheck", setup_sleep=600)
            data, _ = zipped(root)
            seen = asyncio.Event()
            target = asyncio.ensure_future(
                upload(session, server.url, data, until="Starting", seen=seen)
            )
            await seen.wait()
            await _until(lambda: bool(check_containers()))
        else:  # rebuild
            target = asyncio.ensure_future(_rebuild(session, server.url, ready_id))
            await _until(lambda: any(server.tmp.rglob("rebuild-*")))
        at_kill = {
            "files": len(left_files(server.tmp)),
            "check_containers": len(check_containers()),
        }
        server.kill()
        target.cancel()
        await asyncio.gather(target, return_exceptions=True)
    server.start()
    # The Docker build of a killed server stops when its connection drops; dockerd then
    # removes its step's container by itself: wait for it (up to a minute).
    deadline = time.monotonic() + 60
    while containers_since(moment) and time.monotonic() < deadline:
        await asyncio.sleep(1)
    return {
        "phase": phase,
        "at_kill": at_kill,
        "files_after_restart": left_files(server.tmp),
        "check_containers_after_restart": check_containers(),
        "containers_of_the_phase_after_restart": containers_since(moment),
    }


async def _slow_upload(session: aiohttp.ClientSession, url: str, data: bytes) -> None:
    async def body():
        head = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="p.zip"\r\n'
                b"Content-Type: application/zip\r\n\r\n")  # fmt: skip
        yield head
        for start in range(0, len(data), MiB):
            yield data[start : start + MiB]
            await asyncio.sleep(0.05)
        yield b"\r\n--b--\r\n"

    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    async with session.post(f"{url}/v1/packages/upload", data=body(), headers=headers) as r:
        await r.read()


async def _rebuild(session: aiohttp.ClientSession, url: str, package_id: str) -> None:
    async with session.post(f"{url}/v1/packages/{package_id}/build",
                            headers={"Accept": NDJSON}) as response:  # fmt: skip
        async for _ in response.content:
            pass


async def _until(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("the phase did not begin")
        await asyncio.sleep(0.02)


async def still_building(server: Server) -> list[str]:
    """After the stale limit (and the janitor's next look): records left "building"."""
    await asyncio.sleep(STALE_AFTER + STALE_AFTER / 4 + 3)
    async with aiohttp.ClientSession() as session, session.get(f"{server.url}/v1/packages/") as r:
        return [p["ID"][:12] for p in await r.json() if p["Status"] == "building"]


async def soak(work: Path, registry: str, phases: set[str]) -> None:
    server = Server(work, registry)
    server.start()
    try:
        first = await concurrency(server, work)
        print(json.dumps({"1_concurrency": {k: v for k, v in first.items() if k != "ids"}}))
        if "2" in phases:
            print(json.dumps({"2_gigabyte_answer": await gigabyte_answer(server, work)}))
        if "3" in phases:
            row = await ping_under_heavy_configs(server)
            print(json.dumps({"3_ping_under_heavy_configs": row}), flush=True)
        if "4" not in phases:
            return
        for phase in ("upload", "build", "check", "rebuild"):
            row = await kill_during(server, work, phase, first["ids"][0])
            print(json.dumps({"4_kill_9": row}), flush=True)
        print(json.dumps({"4_still_building_after_stale_limit": await still_building(server)}))
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--registry", default="127.0.0.1:5000")
    parser.add_argument("--phases", default="1,2,3,4", help="which of 2-4 to run (1 always)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cog-soak-", dir="/var/tmp"))
    try:
        asyncio.run(soak(work, args.registry, set(args.phases.split(","))))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
