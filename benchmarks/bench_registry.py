"""Registry throughput and memory, measured with real processes (not a test: figures).

    .venv/bin/python benchmarks/bench_registry.py [--sizes 100,1024] [--no-s3] [--records 10000]

For each package size (MiB of random "weights", so nothing compresses) and each storage
(local disk; S3 on a SeaweedFS started here), a fresh `cog server --builder none`:
- `cog build` of the model directory through the CLI (zip + upload), timed; the upload
  alone (the same zip through the client library) next to `sha256sum` of that zip;
- download of the package (`GET /v1/packages/<id>.zip`) to a file through the client
  library (which checks the bytes against the ID: SHA-256 on the client's CPU), and the
  same download by `curl -o /dev/null` (the server's own speed, without that check);
- the server's peak RSS (VmHWM) during the timed upload, and during the download: the
  peak is reset (/proc/<pid>/clear_refs) before each, and read after it.
Then the listing latency of `GET /v1/packages/` with --records packages in storage
(records written straight into storage, as many uploads would have left them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cog.cli.client import RegistryClient  # noqa: E402
from cog.package import write_package  # noqa: E402
from tests.services.s3 import CREDENTIALS, SeaweedFS, storage_url  # noqa: E402
from tests.test_cli import free_port, wait_for  # noqa: E402

COG = str(Path(sys.executable).parent / "cog")
MiB = 1024 * 1024


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss(pid: int) -> None:
    """VmHWM starts again from the current RSS (Linux 4.0+), so the next reading is the
    peak of what runs in between."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def model_dir(root: Path, size_mib: int) -> Path:
    root.mkdir(parents=True)
    (root / "cog.yaml").write_text("name: bench/weights\nmodel: infer.py:Model\n")
    (root / "infer.py").write_text(
        "import cog\n\nclass Model(cog.Model):\n    def run(self):\n        return 1\n"
    )
    with open(root / "weights.bin", "wb") as out:
        for _ in range(size_mib):
            out.write(os.urandom(MiB))
    return root


def start_server(storage: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [COG, "server", "--host", "127.0.0.1", "--port", str(port), "--storage", storage,
            "--builder", "none", "--log-format", "json", "--max-upload-size", "8G"]  # fmt: skip
    process = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/ping")
    return process, url


def timed(argv: list[str], **kwargs) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, **kwargs)
    return time.perf_counter() - started


async def upload(url: str, zip_path: Path) -> tuple[float, str]:
    package_id = ""
    async with RegistryClient(url) as client:
        started = time.perf_counter()
        async for event in client.upload(zip_path):
            if event["type"] == "error":
                raise RuntimeError(event["message"])
            if event["type"] == "package":
                package_id = event["package"]["ID"]
        return time.perf_counter() - started, package_id


async def download(url: str, package_id: str, dest: Path) -> float:
    async with RegistryClient(url) as client:
        started = time.perf_counter()
        await client.download(package_id, dest)
        return time.perf_counter() - started


def bench_size(size_mib: int, storages: dict[str, str], work: Path) -> list[dict]:
    model = model_dir(work / f"model-{size_mib}", size_mib)
    zip_path = work / f"pkg-{size_mib}.zip"
    with open(zip_path, "wb") as out:
        write_package(model, out)
    zip_mib = zip_path.stat().st_size / MiB
    sha = timed(["sha256sum", str(zip_path)])
    rows = []
    for name, storage in storages.items():
        process, url = start_server(storage, work / f"server-{name}-{size_mib}.log")
        try:
            env = {**os.environ, "COG_REMOTE": url, "XDG_CONFIG_HOME": str(work / "cfg")}
            build = timed([COG, "build", str(model)], env=env)
            # the same bytes again would be "already stored": delete, then time the upload
            package_id = _only_id(url)
            subprocess.run([COG, "--remote", url, "delete", package_id], check=True, env=env,
                           capture_output=True)  # fmt: skip
            dest = work / f"down-{name}-{size_mib}.zip"
            reset_peak_rss(process.pid)
            upload_s, package_id = asyncio.run(upload(url, zip_path))
            upload_rss = peak_rss_mib(process.pid)
            reset_peak_rss(process.pid)
            download_s = asyncio.run(download(url, package_id, dest))
            download_rss = peak_rss_mib(process.pid)
            assert dest.stat().st_size == zip_path.stat().st_size
            curl_s = timed(
                ["curl", "-sf", "-o", "/dev/null", f"{url}/v1/packages/{package_id}.zip"]
            )
            dest.unlink()
            direct_write, direct_read = asyncio.run(direct(storage, zip_path))
            rows.append(
                {
                    "size_mib": round(zip_mib),
                    "storage": name,
                    "cog_build_s": round(build, 2),
                    "upload_s": round(upload_s, 2),
                    "upload_mib_s": round(zip_mib / upload_s),
                    "sha256sum_mib_s": round(zip_mib / sha),
                    "upload_vs_sha256sum": f"{(zip_mib / upload_s) / (zip_mib / sha):.0%}",
                    "download_mib_s": round(zip_mib / download_s),
                    "download_curl_mib_s": round(zip_mib / curl_s),
                    "store_direct_write_mib_s": round(zip_mib / direct_write),
                    "store_direct_read_mib_s": round(zip_mib / direct_read),
                    "server_peak_rss_upload_mib": round(upload_rss, 1),
                    "server_peak_rss_download_mib": round(download_rss, 1),
                }
            )
        finally:
            process.terminate()
            process.wait()
    shutil.rmtree(model)
    zip_path.unlink()
    return rows


async def direct(storage: str, zip_path: Path) -> tuple[float, float]:
    """The same zip written to and read from the store itself, without the server: the
    store's own speed, to tell it apart from the server's overhead."""
    from cog.storage import load_storage
    from cog.streams import file_chunks

    store = load_storage(storage)
    await store.open()
    try:
        started = time.perf_counter()
        await store.write("direct/pkg.zip", file_chunks(zip_path))
        write = time.perf_counter() - started
        started = time.perf_counter()
        async with store.open_reader("direct/pkg.zip") as blob:
            async for _ in blob.chunks():
                pass
        read = time.perf_counter() - started
        await store.delete("direct/pkg.zip")
    finally:
        await store.close()
    return write, read


def _only_id(url: str) -> str:
    with urllib.request.urlopen(f"{url}/v1/packages/") as response:
        return json.load(response)[0]["ID"]


async def write_records(storage_url_: str, count: int) -> None:
    """count records as uploads would have left them (the listing reads only records)."""
    from cog.config import load_config
    from cog.server.catalog import record_key
    from cog.server.records import PackageRecord, Status, encode_record, now
    from cog.storage import load_storage

    store = load_storage(storage_url_)
    await store.open()
    config = load_config("name: bench/model\nmodel: infer.py:Model\n")
    semaphore = asyncio.Semaphore(64)

    async def one(i: int) -> None:
        package_id = f"{i:064x}"
        record = PackageRecord(package_id, "bench/model", config, now(), now(), Status.READY, 1234)
        async with semaphore:
            await store.write_bytes(record_key(package_id), encode_record(record))

    await asyncio.gather(*(one(i) for i in range(count)))
    await store.close()


def bench_listing(storage: str, count: int, work: Path) -> dict:
    asyncio.run(write_records(storage, count))
    process, url = start_server(storage, work / "server-list.log")
    try:
        times = []
        for _ in range(30):
            started = time.perf_counter()
            with urllib.request.urlopen(f"{url}/v1/packages/") as response:
                body = response.read()
            times.append(time.perf_counter() - started)
        assert len(json.loads(body)) == count
        return {
            "records": count,
            "list_p50_ms": round(statistics.median(times) * 1000, 1),
            "list_max_ms": round(max(times) * 1000, 1),
            "body_mib": round(len(body) / MiB, 1),
            "server_peak_rss_mib": round(peak_rss_mib(process.pid), 1),
        }
    finally:
        process.terminate()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100,1024", help="package sizes in MiB")
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--records", type=int, default=10_000)
    args = parser.parse_args()
    # The SeaweedFS started here accepts only these keys.
    os.environ.update(CREDENTIALS)
    with tempfile.TemporaryDirectory(prefix="cog-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        weed = None if args.no_s3 else SeaweedFS(work / "weed").start()
        try:
            for size in [int(s) for s in args.sizes.split(",")]:
                storages = {"local": f"file://{work / f'store-{size}'}"}
                if weed:
                    storages["s3"] = storage_url(weed.endpoint, prefix=f"bench-{size}")
                for row in bench_size(size, storages, work):
                    print(json.dumps(row), flush=True)
            print(json.dumps(bench_listing(f"file://{work / 'list'}", args.records, work)))
        finally:
            if weed:
                weed.stop()


if __name__ == "__main__":
    main()
