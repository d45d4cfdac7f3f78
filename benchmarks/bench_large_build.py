"""A large model's `cog build`, end to end, against hashing it (figures, not a test).

    .venv/bin/python benchmarks/bench_large_build.py [--size-mib 1024] [--rounds 5] [--no-s3]

One model directory with --size-mib MiB of random weights (nothing compresses), and a
`cog server --builder none` for each storage (local disk; S3 on a SeaweedFS started
here). Each round, interleaved so that machine load falls on all alike:
- `sha256sum` of the model's files: the yardstick (reading and hashing every byte once;
  coreutils' own SHA-256, which uses no SHA instructions), and `openssl dgst -sha256` of
  them (OpenSSL's, which does where the CPU has them, as Python's hashlib does): the
  faster yardstick;
- `cog build` of the directory through the CLI, to "--> Built": zip, upload, the
  server's verification, the commit to storage; the package is deleted afterwards, so
  every round stores it again.
Reported: the median of each (and every round), cog build / sha256sum, the CPU seconds
of each (the CLI's and the server's together for a build: the cost whatever else runs on
the machine), the peak RSS of the CLI and of the server during the builds, and what was
left in the servers' temporary directories afterwards (nothing, when all is well).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.services.s3 import CREDENTIALS, SeaweedFS, storage_url  # noqa: E402
from tests.test_cli import free_port, wait_for  # noqa: E402

COG = str(Path(sys.executable).parent / "cog")
MiB = 1024 * 1024


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


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss(pid: int) -> None:
    """VmHWM starts again from the current RSS (Linux 4.0+)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a running process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_timed(
    argv: list[str], env: dict[str, str] | None = None
) -> tuple[float, float, float, str]:
    """Seconds, the process's own peak RSS in MiB and CPU seconds (from wait4), its stdout."""
    started = time.perf_counter()
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{out}")
    return elapsed, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime, out


class Server:
    def __init__(self, name: str, storage: str, work: Path):
        self.name = name
        self.tmp_dir = work / f"tmp-{name}"
        self.tmp_dir.mkdir()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        args = [
            COG, "server", "--host", "127.0.0.1", "--port", str(port), "--storage", storage,
            "--builder", "none", "--log-format", "json", "--max-upload-size", "8G",
            "--max-unpacked-size", "8G", "--tmp-dir", str(self.tmp_dir),
        ]  # fmt: skip
        self.log = open(work / f"server-{name}.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(f"{self.url}/ping")
        self.env = {**os.environ, "COG_REMOTE": self.url, "XDG_CONFIG_HOME": str(work / "cfg")}

    def build(self, model: Path) -> dict[str, float]:
        reset_peak_rss(self.process.pid)
        server_cpu = cpu_seconds(self.process.pid)
        seconds, cli_rss, cli_cpu, out = run_timed([COG, "build", str(model)], self.env)
        server_rss = peak_rss_mib(self.process.pid)
        server_cpu = cpu_seconds(self.process.pid) - server_cpu
        package_id = out.strip().splitlines()[-1].split()[-1]
        subprocess.run([COG, "delete", package_id], env=self.env, check=True, capture_output=True)
        return {
            "s": seconds,
            "cli_rss": cli_rss,
            "server_rss": server_rss,
            "cpu": cli_cpu + server_cpu,
        }

    def leftovers(self, work: Path) -> list[str]:
        """Files in the server's temp directory, and temp files in the local store."""
        found = [str(p.relative_to(work)) for p in self.tmp_dir.rglob("*")]
        found += [str(p.relative_to(work)) for p in (work / "store").rglob(".tmp-*")]
        return sorted(found)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()
        self.log.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-s3", action="store_true")
    args = parser.parse_args()
    os.environ.update(CREDENTIALS)  # the SeaweedFS started here accepts only these keys
    with tempfile.TemporaryDirectory(prefix="cog-bench-large-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        model = model_dir(work / "model", args.size_mib)
        files = sorted(str(p) for p in model.iterdir())
        weed = None if args.no_s3 else SeaweedFS(work / "weed").start()
        servers = [Server("local", f"file://{work / 'store'}", work)]
        try:
            if weed is not None:
                servers.append(Server("s3", storage_url(weed.endpoint, prefix="bench"), work))
            times: dict[str, list[float]] = {"sha256sum": [], "openssl": []}
            cpu: dict[str, list[float]] = {"sha256sum": [], "openssl": []}
            peaks: dict[str, list[float]] = {}
            for round_ in range(args.rounds):
                seconds, _, cpu_s, _ = run_timed(["sha256sum", *files])
                times["sha256sum"].append(seconds)
                cpu["sha256sum"].append(cpu_s)
                seconds, _, cpu_s, _ = run_timed(["openssl", "dgst", "-sha256", *files])
                times["openssl"].append(seconds)
                cpu["openssl"].append(cpu_s)
                for server in servers:
                    result = server.build(model)
                    times.setdefault(server.name, []).append(result["s"])
                    cpu.setdefault(server.name, []).append(result["cpu"])
                    peaks.setdefault(f"{server.name}_cli", []).append(result["cli_rss"])
                    peaks.setdefault(f"{server.name}_server", []).append(result["server_rss"])
                last = {name: round(values[-1], 2) for name, values in times.items()}
                print(json.dumps({"round": round_ + 1} | last), flush=True)
            sha = statistics.median(times["sha256sum"])
            openssl = statistics.median(times["openssl"])
            summary: dict[str, object] = {
                "size_mib": args.size_mib,
                "rounds": args.rounds,
                "sha256sum_s": round(sha, 2),
                "sha256sum_cpu_s": round(statistics.median(cpu["sha256sum"]), 2),
                "openssl_sha256_s": round(openssl, 2),
            }
            for server in servers:
                median = statistics.median(times[server.name])
                summary[f"cog_build_{server.name}_s"] = round(median, 2)
                summary[f"cog_build_{server.name}_vs_sha256sum"] = round(median / sha, 2)
                summary[f"cog_build_{server.name}_vs_openssl"] = round(median / openssl, 2)
                # CLI and server together: what the build costs, whatever else runs
                summary[f"cog_build_{server.name}_cpu_s"] = round(
                    statistics.median(cpu[server.name]), 2
                )
                summary[f"peak_rss_{server.name}_cli_mib"] = round(max(peaks[f"{server.name}_cli"]))
                summary[f"peak_rss_{server.name}_server_mib"] = round(
                    max(peaks[f"{server.name}_server"])
                )
                summary[f"leftovers_{server.name}"] = server.leftovers(work)
            summary["rounds_s"] = {
                name: [round(v, 2) for v in values] for name, values in times.items()
            }
            summary["load_average"] = [round(v, 2) for v in os.getloadavg()]
            print(json.dumps(summary), flush=True)
        finally:
            for server in servers:
                server.stop()
            if weed is not None:
                weed.stop()


if __name__ == "__main__":
    main()
