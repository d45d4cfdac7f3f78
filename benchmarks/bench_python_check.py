"""What the check of the image's Python costs a build (figures, not a test).

    .venv/bin/python benchmarks/bench_python_check.py [--base python:3.11-slim] [--rounds 5]

On this machine's Docker engine (classic builder), the median of each, in seconds:
1. `docker build --no-cache` of FROM + the check step (cog.builders.dockerfile.python_check);
2. `docker build --no-cache` of FROM + `RUN true`: the floor of any step, a container start;
3. `docker build` of (1) again: the step cached, as in every build after the first one on
   that base image and Python.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cog.builders.dockerfile import python_check  # noqa: E402


def build(directory: Path, dockerfile: str, tag: str, *cache: str) -> float:
    (directory / "Dockerfile").write_text(dockerfile)
    started = time.perf_counter()
    subprocess.run(
        ["docker", "build", "-q", *cache, "-t", tag, str(directory)],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="python:3.11-slim")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    version = subprocess.run(
        ["docker", "run", "--rm", args.base, "python", "-c",
         "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    check = f"FROM {args.base}\n{python_check(version, args.base, 'cpu')}\n"
    floor = f"FROM {args.base}\nRUN true\n"
    tag = f"cog-bench/python-check:{uuid.uuid4().hex[:8]}"
    times: dict[str, list[float]] = {"check": [], "RUN true": [], "check, cached": []}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        try:
            for _ in range(args.rounds):
                times["check"].append(build(directory, check, tag, "--no-cache"))
                times["RUN true"].append(build(directory, floor, tag, "--no-cache"))
                build(directory, check, tag)  # make sure the cache has it
                times["check, cached"].append(build(directory, check, tag))
        finally:
            subprocess.run(["docker", "rmi", tag], capture_output=True)
    print(f"base image {args.base} (Python {version}), {args.rounds} rounds, median seconds:")
    for name, values in times.items():
        print(f"  {name:<15} {statistics.median(values):.3f}")


if __name__ == "__main__":
    main()
