"""A model's start in its image, from `docker run` to ready (figures, not a test).

    .venv/bin/python benchmarks/bench_model_start.py [--starts 10] [--before main]
        [--image IMAGE] [--base-image python:3.11-slim]

Every model start (the check after each build, `cog infer`, the server's predictions)
runs the image's inference server (`python -m cog.runtime`), which starts the model's
worker. This measures that start two ways, each a real container on this machine's
Docker Engine, as cog runs it (cog.engine.containers.ModelContainer: no network, the
runtime on a Unix socket in a directory shared with this machine):

- ``ready``: from the container's creation to the first 200 of /ping, polled over the
  socket every 2 ms (the runtime's own figure);
- ``cog``: the same, as cog waits for it (ModelContainer.wait_ready's polls).

Two runtimes in the same image, interleaved (the order alternates between rounds):
``before``, the inference server of another revision (``--before``, default main; its
``cog/`` from `git archive`) and ``after``, this checkout's. Each is an image made from
the built one (``--image``; default: examples/hello, built by a `cog server` of this
checkout and `cog build`) with the runtime's environment's ``cog`` replaced and
byte-compiled as the build does. The model's own Python (the worker) is the same in both.
Reported: the median (and every figure) of each, in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_build import Cog, run  # noqa: E402

from cog.engine.client import Engine  # noqa: E402
from cog.engine.containers import ModelContainer  # noqa: E402

SERVER_ENV = "/opt/cog-runtime"  # cog.builders.dockerfile.SERVER_ENV
PING = b"GET /ping HTTP/1.1\r\nHost: model\r\nConnection: close\r\n\r\n"


def built_image(work: Path, base_image: str) -> str:
    """examples/hello, built and pushed by a cog server of this checkout."""
    args = argparse.Namespace(builder="docker", builder_opt=[], base_image=base_image)
    model = work / "hello"
    shutil.copytree(ROOT / "examples" / "hello", model)
    server = Cog(model, work, args)
    try:
        server.build()
        return server.image()
    finally:
        server.stop()


def runtime_tree(work: Path, revision: str | None) -> Path:
    """The ``cog/`` package of a revision (None: this checkout, as it is on disk)."""
    target = work / (revision or "this").replace("/", "_")
    if revision is None:
        shutil.copytree(ROOT / "cog", target / "cog", ignore=shutil.ignore_patterns("__pycache__"))
        return target
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "cog"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


def image_with_runtime(image: str, tree: Path, tag: str) -> str:
    """``image`` with the runtime environment's cog replaced by ``tree``'s, compiled."""
    (tree / "Dockerfile").write_text(
        f"FROM {image}\n"
        f"RUN rm -rf {SERVER_ENV}/cog\n"
        f"COPY cog {SERVER_ENV}/cog\n"
        f"RUN python -m compileall -q {SERVER_ENV}/cog\n"
    )
    name = f"cog-bench-start:{tag}"
    build = ["docker", "build", "-q", "-t", name, str(tree)]
    run(build, env={**os.environ, "DOCKER_BUILDKIT": "0"})  # the engine's builder, as cog's
    return name


def ping_ready(path: Path) -> bool:
    """One GET /ping over the socket: whether it answered 200."""
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
            sock.sendall(PING)
            return sock.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False


async def start(engine: Engine, image: str, how: str) -> float:
    """Seconds from the container's creation to ready; `how` is "ready" or "cog"."""
    container = ModelContainer(engine, image, role="bench")
    started = time.perf_counter()
    async with container:
        if how == "cog":
            async for _ in container.wait_ready(60):
                pass
        else:
            assert container.socket_dir is not None
            path = container.socket_dir.socket
            while not await asyncio.to_thread(ping_ready, path):
                if time.perf_counter() - started > 60:
                    raise RuntimeError(f"{image} was not ready in 60 s")
                await asyncio.sleep(0.002)
        return time.perf_counter() - started


async def measure(images: dict[str, str], starts: int) -> dict[str, dict[str, list[float]]]:
    figures: dict[str, dict[str, list[float]]] = {
        how: {name: [] for name in images} for how in ("ready", "cog")
    }
    async with Engine() as engine:
        for round_ in range(starts):
            order = list(images) if round_ % 2 == 0 else list(reversed(images))
            for how in ("ready", "cog"):
                for name in order:
                    figures[how][name].append(await start(engine, images[name], how))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--starts", type=int, default=10, help="starts of each (>= 10)")
    parser.add_argument("--before", default="main", help="the revision to compare with")
    parser.add_argument("--image", help="a model image cog built (default: build hello)")
    parser.add_argument("--base-image", default="python:3.11-slim")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-model-start-") as tmp:
        work = Path(tmp)
        image = args.image or built_image(work, args.base_image)
        images = {
            "before": image_with_runtime(image, runtime_tree(work, args.before), "before"),
            "after": image_with_runtime(image, runtime_tree(work, None), "after"),
        }
        figures = asyncio.run(measure(images, args.starts))
    report = {
        "image": image,
        "before": args.before,
        "starts": args.starts,
        **{
            how: {
                name: {
                    "median_s": round(statistics.median(values), 3),
                    "all_s": [round(v, 3) for v in values],
                }
                for name, values in by_name.items()
            }
            for how, by_name in figures.items()
        },
    }
    for how in ("ready", "cog"):
        before = report[how]["before"]["median_s"]
        after = report[how]["after"]["median_s"]
        report[how]["after_over_before"] = round(after / before, 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
