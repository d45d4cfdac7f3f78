"""How fast packages are written and opened, next to `sha256sum` of the same bytes.

    .venv/bin/python benchmarks/bench_package.py [--size-mib 1024] [--files 2000]

Builds a model tree in a temporary directory (one large random "weights" file and many
small source files), then prints, each step in a fresh process so peak RSS is its own:
- sha256sum of the weights file (the machine's hashing baseline),
- write_package of the tree to a zip on disk (throughput over input bytes, peak RSS),
- PackageArchive.open of that zip with verification (every member CRC-checked), and
  without it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1024 * 1024

STEP = r"""
import json, resource, sys, time
from pathlib import Path
from cog.package import PackageArchive, PackageLimits, write_package
step, root, zip_path = sys.argv[1:4]
start = time.perf_counter()
if step == "write":
    with open(zip_path, "wb") as out:
        write_package(Path(root), out)
else:
    with PackageArchive.open(Path(zip_path), PackageLimits(), verify=step == "open-verify"):
        pass
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "peak_rss": peak}))
"""


def make_tree(root: Path, size: int, files: int) -> int:
    (root / "weights").mkdir(parents=True)
    (root / "src").mkdir()
    (root / "cog.yaml").write_text("model: infer.py:Model\n")
    (root / "infer.py").write_text("import cog\n")
    for i in range(files):
        (root / "src" / f"module_{i:05d}.py").write_text(f"VALUE = {i}\n" * 20)
    block = os.urandom(MiB)
    with open(root / "weights" / "model.bin", "wb") as f:
        for _ in range(size // MiB):
            f.write(block)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def run_step(step: str, root: Path, zip_path: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", STEP, step, str(root), str(zip_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the weights file")
    parser.add_argument("--files", type=int, default=2000, help="number of small source files")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cog-bench-package-") as tmp:
        root = Path(tmp) / "model"
        total = make_tree(root, args.size_mib * MiB, args.files)
        zip_path = Path(tmp) / "package.zip"
        print(f"tree: {total / MiB:.0f} MiB in {args.files + 3} files")

        sha256sum = shutil.which("sha256sum")
        if sha256sum:
            start = time.perf_counter()
            subprocess.run(
                [sha256sum, str(root / "weights" / "model.bin")], check=True, capture_output=True
            )
            seconds = time.perf_counter() - start
            print(f"sha256sum of the weights:   {args.size_mib / seconds:8.0f} MiB/s")

        for step in ("write", "open-verify", "open"):
            figures = run_step(step, root, zip_path)
            rate = total / MiB / figures["seconds"]
            print(
                f"{step:<27} {rate:8.0f} MiB/s  {figures['seconds']:6.2f} s  "
                f"peak RSS {figures['peak_rss'] / MiB:5.0f} MiB"
            )
        print(f"zip: {zip_path.stat().st_size / MiB:.0f} MiB")


if __name__ == "__main__":
    main()
