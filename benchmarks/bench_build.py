"""Build times of the thumbnail example through a real cog server (figures, not a test).

    .venv/bin/python benchmarks/bench_build.py [--builder docker|buildkit] [--example thumbnail]

In one run, on this machine's Docker engine and registry (contrib/setup-machine.sh):
1. `cog build` cold: a fresh base image (python:3.11-slim plus a unique label) so no layer
   is cached; includes push and the test inference of the examples;
2. `cog build` after touching only the model code;
3. `cog build` again without changes (same package ID: answered from storage);
4. plain `docker build` of the same generated Dockerfile and context, cold (another fresh
   base), and `docker push` of it: what cog does, without cog.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cog.builders import BuilderSettings  # noqa: E402
from cog.builders.context import _file, _members  # noqa: E402
from cog.builders.dockerfile import dockerfile_for  # noqa: E402
from cog.builders.runtime import model_wheel, runtime_wheel  # noqa: E402
from cog.config import DirectoryFiles, check_config  # noqa: E402
from cog.package import write_package  # noqa: E402
from tests.test_cli import free_port, wait_for  # noqa: E402

COG = str(Path(sys.executable).parent / "cog")
REGISTRY = "127.0.0.1:5000"


def fresh_base() -> str:
    tag = f"cog-bench/base:{uuid.uuid4().hex[:12]}"
    dockerfile = f"FROM python:3.11-slim\nLABEL cog-bench={tag}\n".encode()
    subprocess.run(["docker", "build", "-q", "-t", tag, "-"], input=dockerfile, check=True,
                   capture_output=True)  # fmt: skip
    return tag


def timed(argv: list[str], **kwargs) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stdout}\n{result.stderr}")
    return time.perf_counter() - started, result.stdout


def context_tar(model: Path, base: str, work: Path) -> Path:
    """The context cog would send, for a plain `docker build -`."""
    zip_path = work / "plain.zip"
    with open(zip_path, "wb") as out:
        package_id = write_package(model, out)
    config = check_config((model / "cog.yaml").read_text(), DirectoryFiles(model))
    settings = BuilderSettings(registry=REGISTRY, base_images={"cpu": base, "gpu": base})
    dockerfile = dockerfile_for(
        config, "cpu", settings, package_id=package_id, runtime_wheel=runtime_wheel()[0]
    )
    tar = work / "context.tar"
    with open(tar, "wb") as out:
        out.write(_file("Dockerfile", dockerfile.encode()))
        for folder, (name, wheel) in (("server", runtime_wheel()), ("model", model_wheel())):
            out.write(_file(f"cog/{folder}/{name}", wheel))
        for chunk in _members(zip_path):
            out.write(chunk)
        out.write(b"\0" * 1024)
    return tar


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--builder", default="docker")
    parser.add_argument("--builder-opt", action="append", default=[])
    parser.add_argument("--example", default="thumbnail")
    args = parser.parse_args()
    results: dict[str, float | str] = {"builder": args.builder, "example": args.example}
    with tempfile.TemporaryDirectory(prefix="cog-bench-build-") as tmp:
        work = Path(tmp)
        model = work / args.example
        shutil.copytree(ROOT / "examples" / args.example, model)
        base = fresh_base()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server_args = [
            COG, "server", "--host", "127.0.0.1", "--port", str(port),
            "--storage", f"file://{work / 'store'}", "--docker-registry", REGISTRY,
            "--builder", args.builder, "--base-image", f"cpu={base}", "--log-format", "json",
        ]  # fmt: skip
        for option in args.builder_opt:
            server_args += ["--builder-opt", option]
        with open(work / "server.log", "w") as log:
            server = subprocess.Popen(server_args, stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_for(f"{url}/ping")
                build = [COG, "--remote", url, "build", str(model)]
                results["cold_s"], _ = timed(build)
                with open(model / "infer.py", "a") as source:
                    source.write(f"\n# code change {uuid.uuid4()}\n")
                results["code_only_s"], out = timed(build)
                results["code_only_cached_steps"] = out.count("Using cache") + out.count("CACHED")
                results["same_id_s"], _ = timed(build)
            finally:
                server.terminate()
                server.wait()

        plain_base = fresh_base()
        tar = context_tar(model, plain_base, work)
        image = f"{REGISTRY}/bench/plain:{uuid.uuid4().hex[:12]}"
        with open(tar, "rb") as context:
            results["plain_docker_build_s"], _ = timed(
                ["docker", "build", "-q", "-t", image, "-"], stdin=context
            )
        results["plain_docker_push_s"], _ = timed(["docker", "push", "-q", image])
    plain = results["plain_docker_build_s"] + results["plain_docker_push_s"]
    results["code_only_vs_cold"] = f"{results['code_only_s'] / results['cold_s']:.1%}"
    results["cog_cold_vs_plain_build_and_push"] = f"{results['cold_s'] / plain - 1:+.1%}"
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
