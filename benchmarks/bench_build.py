"""`cog build` against a minimal hand-written Dockerfile, side by side (figures, not a test).

    .venv/bin/python benchmarks/bench_build.py [--rounds 5] [--builder docker|buildkit]
        [--builder-opt KEY=VALUE] [--base-image python:3.11-slim] [--shared PIN]

The same model on both sides: a Pillow blur (a file in, a file out, a number), on the same
base image, this machine's Docker engine and registry (contrib/setup-machine.sh):

- the floor: a minimal hand-written Dockerfile (requirements, then the code; a stdlib HTTP
  server runs the model), built with `docker build` (the engine's builder, as cog's
  docker builder uses) and pushed with `docker push`;
- cog: `cog build` of the model directory through a `cog server` running here, until
  "Built and pushed" (the upload, the build, the push and the check of its example).

Each round, in an order that alternates between rounds so neither side always goes first:
- cold: the requirements file changed (a fresh comment), so neither side can reuse the
  steps from it on; the floor also builds with `--no-cache`;
- code-only: the model's code changed (a fresh comment), the requirements not: what the
  cache saves on each side.
Reported: the median of each over the rounds (and every round), cog / floor, the sizes
of the two images (`docker image inspect`, in MB of 10^6 bytes), as the issue table gives
them, and where the last cold and code-only `cog build` spent their time: when each phase
began (upload until "Received", build, push, the check) and each build step's seconds.

With ``--shared PIN`` (issue 15's goal 3), instead: two models that both pin a large
package, each built cold by `cog build`, the second after the first, and the floor
building the second cold; both images' sizes.

With ``--targets`` (goal 4), instead: one model with a CPU and a GPU image, built cold by
two cog servers, one building the two at once (the default), the other in turn
(``--targets-in-turn``), interleaved. The GPU image is the ``image`` strategy's on the
CPU base image (``--base-image gpu=``; the Python in a virtualenv, no CUDA downloaded):
this machine has no GPU, and CUDA's gigabytes would measure the network, not the overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_cli import free_port, wait_for  # noqa: E402

COG = str(Path(sys.executable).parent / "cog")
REGISTRY = "127.0.0.1:5000"
PILLOW = "pillow==11.3.0"

COG_MODEL = '''\
"""Blur an image with Pillow."""

from PIL import Image, ImageFilter

import cog


class Model(cog.Model):
    @cog.input("image", type=cog.Path, help="The image")
    @cog.input("radius", type=float, default=2.0, min=0.0, max=20.0, help="Blur radius")
    def run(self, image, radius):
        with Image.open(image) as source:
            blurred = source.convert("RGB").filter(ImageFilter.GaussianBlur(radius))
        output = image.with_name("blurred.png")
        blurred.save(output, format="PNG")
        return output
'''

COG_YAML = """\
name: bench/blur
model: "infer.py:Model"
environment:
  python_version: "3.11"
  python_requirements: requirements.txt
examples:
  - input: {image: "@input.png", radius: "3"}
"""

PLAIN_MODEL = '''\
"""Blur an image with Pillow."""

import io

from PIL import Image, ImageFilter


def blur(data: bytes, radius: float) -> bytes:
    with Image.open(io.BytesIO(data)) as source:
        blurred = source.convert("RGB").filter(ImageFilter.GaussianBlur(radius))
    out = io.BytesIO()
    blurred.save(out, format="PNG")
    return out.getvalue()
'''

PLAIN_SERVER = '''\
"""POST an image, get it blurred (?radius=3)."""

import http.server
import urllib.parse

from blur import blur


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        out = blur(body, float(query.get("radius", ["2"])[0]))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


http.server.ThreadingHTTPServer(("", 5000), Handler).serve_forever()
'''

PLAIN_DOCKERFILE = """\
FROM {base}
WORKDIR /src
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
EXPOSE 5000
CMD ["python", "server.py"]
"""


def png(width: int = 48, height: int = 32) -> bytes:
    """A small RGB gradient as a PNG, without Pillow (this venv need not have it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        checksum = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + checksum

    rows = b"".join(
        b"\0" + bytes(v for x in range(width) for v in (x * 5 % 256, y * 8 % 256, 128))
        for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def make_models(work: Path, base: str) -> tuple[Path, Path]:
    cog_dir, plain_dir = work / "blur-cog", work / "blur-plain"
    cog_dir.mkdir()
    plain_dir.mkdir()
    (cog_dir / "cog.yaml").write_text(COG_YAML)
    (cog_dir / "infer.py").write_text(COG_MODEL)
    (cog_dir / "input.png").write_bytes(png())
    (plain_dir / "Dockerfile").write_text(PLAIN_DOCKERFILE.format(base=base))
    (plain_dir / "blur.py").write_text(PLAIN_MODEL)
    (plain_dir / "server.py").write_text(PLAIN_SERVER)
    return cog_dir, plain_dir


def change_requirements(cog_dir: Path, plain_dir: Path) -> None:
    text = f"# round {uuid.uuid4().hex}\n{PILLOW}\n"
    (cog_dir / "requirements.txt").write_text(text)
    (plain_dir / "requirements.txt").write_text(text)


def change_code(cog_dir: Path, plain_dir: Path) -> None:
    comment = f"\n# change {uuid.uuid4().hex}\n"
    for path in (cog_dir / "infer.py", plain_dir / "blur.py"):
        path.write_text(path.read_text() + comment)


def run(argv: list[str], **kwargs) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def timed(argv: list[str], **kwargs) -> tuple[float, str]:
    started = time.perf_counter()
    out = run(argv, **kwargs)
    return time.perf_counter() - started, out


class Floor:
    """The hand-written Dockerfile: docker build, then docker push."""

    def __init__(self, plain_dir: Path):
        self.dir = plain_dir
        self.image = ""

    def build(self, *, cold: bool) -> float:
        self.image = f"{REGISTRY}/bench/blur-plain:{uuid.uuid4().hex[:12]}"
        build = ["docker", "build", "-q", "-t", self.image, *(["--no-cache"] if cold else [])]
        # The engine's own builder, as cog's docker builder uses (and the only one the
        # docker CLI has here: no buildx plugin).
        env = {**os.environ, "DOCKER_BUILDKIT": "0"}
        built, _ = timed([*build, str(self.dir)], env=env)
        pushed, _ = timed(["docker", "push", "-q", self.image])
        return built + pushed


class Cog:
    """`cog build` against a cog server of its own."""

    def __init__(
        self, cog_dir: Path, work: Path, args: argparse.Namespace, extra: tuple[str, ...] = ()
    ):
        self.dir = cog_dir
        self.package_id = ""
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        server = [
            COG, "server", "--host", "127.0.0.1", "--port", str(port),
            "--storage", f"file://{work / 'store'}", "--tmp-dir", str(work / "spool"),
            "--docker-registry", REGISTRY, "--builder", args.builder,
            "--base-image", f"cpu={args.base_image}", "--log-format", "json",
        ]  # fmt: skip
        for option in args.builder_opt:
            server += ["--builder-opt", option]
        server += extra
        self.log = open(work / f"server-{port}.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(server, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(f"{self.url}/ping")

    def build(self) -> float:
        """Seconds to "Built and pushed"; the output's lines, each with the second it came
        at, are kept in ``self.lines``."""
        argv = [COG, "--remote", self.url, "build", str(self.dir)]
        started = time.perf_counter()
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        assert process.stdout is not None
        self.lines = [(time.perf_counter() - started, line.rstrip()) for line in process.stdout]
        seconds = time.perf_counter() - started
        if process.wait() != 0 or "Built and pushed" not in self.lines[-1][1]:
            output = "\n".join(line for _, line in self.lines)
            raise RuntimeError(f"cog build did not end with an image:\n{output}")
        self.package_id = self.lines[-1][1].split()[-1]
        return seconds

    def phases(self) -> dict[str, object]:
        """Where the last build's time went: when each phase began (seconds from the
        start), and the seconds of each build step (its log line's own timing)."""
        marks = {
            "received": "--> Received package",
            "building": "--> Building ",
            "pushing": "/push] ",
            # The check starts as soon as the image is built (the Docker builder), so
            # it runs while the image is pushed: these may come in either order.
            "testing": "--> Testing the model",
            "model_ready": "Model ready after",
            "pushed": "--> Pushed ",
            "done": "--> Built and pushed",
        }
        began = {
            phase: round(next(t for t, line in self.lines if words in line), 2)
            for phase, words in marks.items()
            if any(words in line for _, line in self.lines)
        }
        steps: list[list[object]] = []
        step = ""
        vertexes: dict[str, str] = {}  # BuildKit's "#5 [2/9] RUN ..." by its "#5"
        for _, line in self.lines:
            text = line.split("] ", 1)[-1] if line.startswith("[") else line
            if text.startswith("Step "):  # the Docker builder: "Step 4/12 : RUN ..."
                step = text
            elif text.startswith(" ---> ") and text.endswith("s)") and step:
                steps.append([step[:100], float(text.rsplit("(", 1)[1][:-2])])
                step = ""
            elif match := re.match(r"(#\d+) (\[.*)", text):  # BuildKit: "#5 [2/9] RUN ..."
                vertexes[match[1]] = match[2]
            elif (match := re.match(r"(#\d+) DONE (\d+\.\d+)s$", text)) and match[1] in vertexes:
                steps.append([vertexes.pop(match[1])[:100], float(match[2])])
        return {"began_at_s": began, "steps_s": steps}

    def image(self) -> str:
        document = json.loads(run([COG, "--remote", self.url, "show", self.package_id, "--json"]))
        return document["Artifacts"][0]["URI"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()
        self.log.close()


def image_mb(image: str) -> float:
    return int(run(["docker", "image", "inspect", "-f", "{{.Size}}", image])) / 1e6


def comparison(args: argparse.Namespace, work: Path) -> dict[str, object]:
    """Goals 1, 2 and 5: cold and code-only builds, interleaved, and the image sizes."""
    times: dict[str, list[float]] = {
        "floor_cold": [],
        "cog_cold": [],
        "floor_code_only": [],
        "cog_code_only": [],
    }
    cog_dir, plain_dir = make_models(work, args.base_image)
    change_requirements(cog_dir, plain_dir)
    floor, cog = Floor(plain_dir), Cog(cog_dir, work, args)
    try:
        # A warm-up round, not counted: the base image's layers and pip's first run on
        # this machine should cost neither side.
        floor.build(cold=True)
        cog.build()
        cold_phases: dict[str, object] = {}
        code_only_phases: dict[str, object] = {}
        for round_ in range(args.rounds):
            change_requirements(cog_dir, plain_dir)
            sides = [("floor", lambda: floor.build(cold=True)), ("cog", cog.build)]
            for name, build in sides if round_ % 2 == 0 else reversed(sides):
                times[f"{name}_cold"].append(build())
            cold_phases = cog.phases()
            change_code(cog_dir, plain_dir)
            sides = [("floor", lambda: floor.build(cold=False)), ("cog", cog.build)]
            for name, build in sides if round_ % 2 == 0 else reversed(sides):
                times[f"{name}_code_only"].append(build())
            code_only_phases = cog.phases()
            last = {name: round(values[-1], 2) for name, values in times.items()}
            print(json.dumps({"round": round_ + 1} | last), flush=True)
        sizes = {"floor_image_mb": image_mb(floor.image), "cog_image_mb": image_mb(cog.image())}
    finally:
        cog.stop()
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        **{f"{name}_s": round(value, 2) for name, value in median.items()},
        "cog_vs_floor_cold": round(median["cog_cold"] / median["floor_cold"], 2),
        "cog_vs_floor_code_only": round(median["cog_code_only"] / median["floor_code_only"], 2),
        **{name: round(value, 1) for name, value in sizes.items()},
        "cog_vs_floor_image": round(sizes["cog_image_mb"] / sizes["floor_image_mb"], 3),
        "rounds_s": {name: [round(v, 2) for v in values] for name, values in times.items()},
        "cog_cold_last_round": cold_phases,
        "cog_code_only_last_round": code_only_phases,
    }


def shared_dependencies(args: argparse.Namespace, work: Path) -> dict[str, object]:
    """Goal 3: two models that pin the same large package, each built cold, the second
    after the first (could it reuse what the first downloaded?), and the floor building
    the second cold."""
    first, plain_dir = make_models(work, args.base_image)
    second = work / "blur-cog-second"
    shutil.copytree(first, second)
    (second / "cog.yaml").write_text(COG_YAML.replace("bench/blur", "bench/blur-second"))
    times: dict[str, list[float]] = {"cog_first_cold": [], "cog_second_cold": [], "floor_cold": []}
    floor, cog = Floor(plain_dir), Cog(first, work, args)
    try:
        for round_ in range(args.rounds):
            token = uuid.uuid4().hex
            for directory in (first, second, plain_dir):
                text = f"# {directory.name} {token}\n{args.shared}\n{PILLOW}\n"
                (directory / "requirements.txt").write_text(text)
            cog.dir = first
            times["cog_first_cold"].append(cog.build())
            cog.dir = second
            times["cog_second_cold"].append(cog.build())
            times["floor_cold"].append(floor.build(cold=True))
            last = {name: round(values[-1], 2) for name, values in times.items()}
            print(json.dumps({"round": round_ + 1} | last), flush=True)
        sizes = {"floor_image_mb": image_mb(floor.image), "cog_image_mb": image_mb(cog.image())}
    finally:
        cog.stop()
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "shared": args.shared,
        **{f"{name}_s": round(value, 2) for name, value in median.items()},
        "cog_second_vs_floor_cold": round(median["cog_second_cold"] / median["floor_cold"], 2),
        **{name: round(value, 1) for name, value in sizes.items()},
        "rounds_s": {name: [round(v, 2) for v in values] for name, values in times.items()},
    }


def targets(args: argparse.Namespace, work: Path) -> dict[str, object]:
    """Goal 4: a CPU and a GPU image of one package, built at once and in turn."""
    cog_dir, plain_dir = make_models(work, args.base_image)
    text = COG_YAML.replace("python_version", "architectures: [cpu, gpu]\n  python_version")
    (cog_dir / "cog.yaml").write_text(text)
    gpu = ("--base-image", f"gpu={args.base_image}", "--gpu-strategy", "image")
    servers = {
        "at_once": Cog(cog_dir, work, args, gpu),
        "in_turn": Cog(cog_dir, work, args, (*gpu, "--targets-in-turn")),
    }
    times: dict[str, list[float]] = {name: [] for name in servers}
    try:
        change_requirements(cog_dir, plain_dir)
        servers["at_once"].build()  # warm-up, not counted: the base layers of both targets
        for round_ in range(args.rounds):
            order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
            for name in order:
                change_requirements(cog_dir, plain_dir)
                times[name].append(servers[name].build())
            last = {name: round(values[-1], 2) for name, values in times.items()}
            print(json.dumps({"round": round_ + 1} | last), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        **{f"cpu_and_gpu_cold_{name}_s": round(value, 2) for name, value in median.items()},
        "at_once_vs_in_turn": round(median["at_once"] / median["in_turn"], 2),
        "rounds_s": {name: [round(v, 2) for v in values] for name, values in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--builder", default="docker")
    parser.add_argument("--builder-opt", action="append", default=[])
    parser.add_argument("--base-image", default="python:3.11-slim")
    parser.add_argument(
        "--shared",
        metavar="PIN",
        help="goal 3 instead: two models both pinning PIN (e.g. tensorflow-cpu==2.20.0)",
    )
    parser.add_argument(
        "--targets", action="store_true", help="goal 4 instead: CPU and GPU, at once and in turn"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cog-bench-build-") as tmp:
        scenario = shared_dependencies if args.shared else comparison
        scenario = targets if args.targets else scenario
        figures = scenario(args, Path(tmp))
    summary = {
        "builder": args.builder,
        "base_image": args.base_image,
        "rounds": args.rounds,
        **figures,
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
