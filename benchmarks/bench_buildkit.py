"""The thumbnail example built cold and after a code-only change, through the BuildKit
builder (the engine's embedded BuildKit over docker-grpc://) next to the Docker builder.

    .venv/bin/python benchmarks/bench_buildkit.py [--rounds 1] [--buildkit-first]
        [--addr docker-grpc:///var/run/docker.sock] [--registry 127.0.0.1:5000]

"Cold" is really cold for both builders: each (builder, round) gets a base image of its own,
``FROM python:3.11-slim`` plus a layer with a unique file, so no layer cache of either
builder can match (the pip download of Pillow still goes through the site's proxy). "Code change"
then appends a unique comment to infer.py and builds again: only the last COPY and what
follows should run. Times are from build() to its BuiltImage (build + push to the
registry), with the build part (until the first push line) shown separately. One build at
a time. Needs dockerd, the registry (contrib/setup-machine.sh) and python:3.11-slim.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cog.builders import BuilderSettings, BuildLog, BuiltImage  # noqa: E402
from cog.builders.buildkit import BuildKitBuilder  # noqa: E402
from cog.builders.docker import DockerBuilder  # noqa: E402
from tests.builder_helpers import EXAMPLES, package_request  # noqa: E402

BASE = "python:3.11-slim"


def fresh_base(tag: str) -> None:
    # A layer of its own: BuildKit also matches cache by layer content, so a new label on
    # the same layers would not make it cold.
    dockerfile = f"FROM {BASE}\nRUN echo {tag} > /etc/cog-bench-base\n"
    subprocess.run(
        ["docker", "build", "-q", "-t", tag, "-"],
        input=dockerfile,
        text=True,
        check=True,
        capture_output=True,
        env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/bin"},
    )


async def timed_build(builder, request) -> tuple[float, float, str]:
    """(seconds to BuiltImage, seconds to the first push line, digest)."""
    start = time.perf_counter()
    build_done = None
    digest = ""
    async for event in builder.build(request):
        if isinstance(event, BuildLog) and event.stage == "push" and build_done is None:
            build_done = time.perf_counter() - start
        if isinstance(event, BuiltImage):
            digest = event.digest
    total = time.perf_counter() - start
    return total, build_done or total, digest


async def run_builder(name: str, settings: BuilderSettings, workdir: Path, registry: str):
    cls = BuildKitBuilder if name == "buildkit" else DockerBuilder
    builder = cls.from_settings(settings)
    await builder.open()
    try:
        model = workdir / name / "thumbnail"
        shutil.copytree(EXAMPLES / "thumbnail", model)
        cold = package_request(model, workdir / name / "cold.zip", registry)
        cold_times = await timed_build(builder, cold)
        infer = model / "infer.py"
        infer.write_text(infer.read_text() + f"\n# code change {uuid.uuid4()}\n")
        warm = package_request(model, workdir / name / "warm.zip", registry)
        warm_times = await timed_build(builder, warm)
        if not cold_times[2] or warm_times[2] == cold_times[2]:
            raise SystemExit(f"{name}: the code change did not give a new pushed image")
        return cold_times, warm_times, [cold.image, warm.image]
    finally:
        await builder.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--buildkit-first", action="store_true")
    parser.add_argument("--addr", default="docker-grpc:///var/run/docker.sock")
    parser.add_argument("--registry", default="127.0.0.1:5000")
    args = parser.parse_args()
    order = ["buildkit", "docker"] if args.buildkit_first else ["docker", "buildkit"]

    rows = []
    cleanup: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cog-bench-") as tmp:
        try:
            for round_number in range(1, args.rounds + 1):
                for name in order:
                    base = f"cog-bench/base-{uuid.uuid4().hex[:12]}:latest"
                    fresh_base(base)
                    cleanup.append(base)
                    options = {"addr": args.addr} if name == "buildkit" else {}
                    settings = BuilderSettings(
                        registry=args.registry, base_images={"cpu": base}, options=options
                    )
                    workdir = Path(tmp) / f"round{round_number}"
                    workdir.mkdir(exist_ok=True)
                    cold, warm, images = await run_builder(name, settings, workdir, args.registry)
                    cleanup += images
                    rows.append((round_number, name, cold, warm))
                    print(
                        f"round {round_number} {name:8s} cold {cold[0]:6.1f}s "
                        f"(build {cold[1]:6.1f}s)  code change {warm[0]:5.1f}s "
                        f"(build {warm[1]:5.1f}s)",
                        flush=True,
                    )
        finally:
            subprocess.run(["docker", "rmi", *cleanup], capture_output=True)

    print()
    print("builder   cold total  cold build  change total  change build   (median of rounds)")
    for name in ("docker", "buildkit"):
        mine = [r for r in rows if r[1] == name]

        def median(values: list[float]) -> float:
            return sorted(values)[len(values) // 2]

        print(
            f"{name:8s}  {median([r[2][0] for r in mine]):9.1f}s  "
            f"{median([r[2][1] for r in mine]):9.1f}s  {median([r[3][0] for r in mine]):11.1f}s  "
            f"{median([r[3][1] for r in mine]):11.1f}s"
        )


if __name__ == "__main__":
    asyncio.run(main())
