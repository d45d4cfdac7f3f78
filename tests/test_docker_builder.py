"""The Docker builder, the post-build check and `cog infer`, against a real Docker Engine
and a real registry, building the real examples."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

import cog
from cog.builders import BuildError, BuilderSettings, BuilderUnavailable
from cog.builders.docker import DockerBuilder
from cog.cli.infer import InferenceError, run_inference
from cog.config_wire import config_to_json
from cog.engine import Engine, ImageNotFound
from cog.engine.containers import (
    EXPIRES_LABEL,
    LABEL,
    OWNER_LABEL,
    ModelContainer,
    pid_namespace,
    remove_stale_containers,
)
from cog.server.check import check_image
from cog.testing.builder import BuilderContract
from tests.builder_helpers import EXAMPLES, collect, copy_example, lines, package_request
from tests.services.docker import CPU_BASE, containers, registry_digest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def settings(registry, base_images) -> BuilderSettings:
    return BuilderSettings(registry=registry)


@pytest.fixture
async def builder(settings):
    builder = DockerBuilder.from_settings(settings)
    await builder.open()
    yield builder
    await builder.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("docker-builder")


async def test_hello_builds_pushes_and_answers(builder, registry, workdir, no_leaked_containers):
    request = package_request(EXAMPLES / "hello", workdir / "hello.zip", registry)
    logs, built = await collect(builder.build(request))
    text = lines(logs)
    assert any(line.startswith("Step 1/") and "FROM python:3.11-slim" in line for line in text)
    # Every step's last line says how long it took.
    steps = sum(bool(re.match(r"Step \d+/\d+ : ", line)) for line in text)
    timed = [line for line in text if re.fullmatch(r" ---> [0-9a-f]{12} \(\d+\.\ds\)", line)]
    assert steps > 1 and len(timed) == steps, text
    assert any(e.stage == "push" for e in logs)
    assert [b.image for b in built] == [request.image]
    assert built[0].digest == registry_digest(registry, request.image)

    signature = json.loads(request.signature_json)
    check_logs = [
        e.line
        async for e in check_image(request.image, request.package_zip, request.config, signature)
    ]
    assert "Example 3: ok" in " ".join(check_logs)
    assert sum(line.startswith("Example ") for line in check_logs) == len(request.config.examples)

    # The labels, as the engine has them on the built image.
    inspected = json.loads(
        subprocess.run(
            ["docker", "image", "inspect", request.image], capture_output=True, check=True
        ).stdout
    )
    labels = inspected[0]["Config"]["Labels"]
    assert labels["org.cog-models.package-id"] == request.package_id
    assert labels["org.cog-models.target"] == "cpu"
    assert labels["org.cog-models.cog-version"] == cog.__version__
    assert json.loads(labels["org.cog-models.config"]) == config_to_json(request.config)
    assert json.loads(labels["org.cog-models.signature"]) == signature

    output = await run_inference(request.image, ["name=pytest", "times=2"])
    assert output.text == "Hello, pytest. Hello, pytest."
    # hello has no required input, so a bare value names no input: a clear error.
    with pytest.raises(InferenceError, match="cannot tell which input"):
        await run_inference(request.image, [f"@{EXAMPLES / 'hello' / 'name.txt'}"])


async def test_a_requirements_file_whose_path_has_spaces(
    builder, registry, tmp_path, no_leaked_containers
):
    root = _model(tmp_path, yaml_extra="  python_requirements: 'deps/my requirements.txt'\n")
    (root / "deps").mkdir()
    (root / "deps" / "my requirements.txt").write_text("# nothing beyond the runtime\n")
    request = package_request(root, tmp_path / "p.zip", registry)
    logs, built = await collect(builder.build(request))
    assert any("-r /tmp/cog/requirements.txt" in line for line in lines(logs))
    assert [image.image for image in built] == [request.image]


async def test_code_only_change_reuses_dependency_layers(
    builder, registry, tmp_path, no_leaked_containers
):
    model = copy_example("thumbnail", tmp_path)
    first = package_request(model, tmp_path / "one.zip", registry)
    await collect(builder.build(first))
    # Unique per run, so an earlier run's layers cannot make the COPY step look cached.
    change = f"\n# code change {uuid.uuid4()}\n"
    (model / "infer.py").write_text((model / "infer.py").read_text() + change)
    second = package_request(model, tmp_path / "two.zip", registry)
    assert second.package_id != first.package_id
    logs, built = await collect(builder.build(second))
    text = lines(logs)
    pip_step = next(i for i, line in enumerate(text) if "pip install" in line and "pillow" in line)
    assert text[pip_step + 1].strip() == "---> Using cache", text[pip_step : pip_step + 3]
    copy_step = next(i for i, line in enumerate(text) if "COPY package/" in line)
    assert "Using cache" not in text[copy_step + 1]
    assert built and built[0].image == second.image

    output_file = tmp_path / "thumb.png"
    # A bare @file goes to the only required input (image).
    result = await run_inference(second.image, [f"@{model / 'input.png'}"], output_path=output_file)
    assert result.path == output_file.resolve()
    assert output_file.read_bytes() == (model / "expected-default.png").read_bytes()


def _model(
    tmp_path: Path,
    *,
    yaml_extra: str = "",
    setup: str = "pass",
    examples: str = "",
    run: str = "return text.upper()",
) -> Path:
    root = tmp_path / "model"
    root.mkdir()
    (root / "cog.yaml").write_text(
        "name: test/broken\nmodel: infer.py:Model\nenvironment:\n  python_version: '3.11'\n"
        + yaml_extra
        + examples
    )
    (root / "infer.py").write_text(
        "import cog\n\nclass Model(cog.Model):\n"
        f"    def setup(self):\n        {setup}\n\n"
        '    @cog.input("text", type=str, default="x")\n'
        f"    def run(self, text):\n        {run}\n"
    )
    return root


async def test_missing_system_package_names_the_step(
    builder, registry, tmp_path, no_leaked_containers
):
    root = _model(tmp_path, yaml_extra="  system_packages: [no-such-package-cog-test]\n")
    request = package_request(root, tmp_path / "p.zip", registry)
    with pytest.raises(BuildError) as caught:
        await collect(builder.build(request))
    assert "apt-get install" in caught.value.step
    assert any("no-such-package-cog-test" in line for line in caught.value.output)
    assert not isinstance(caught.value, BuilderUnavailable)


async def test_unresolvable_requirement_names_the_step(
    builder, registry, tmp_path, no_leaked_containers
):
    root = _model(tmp_path, yaml_extra="  python_packages: ['cog-no-such-dist-xyz==0.0.1']\n")
    request = package_request(root, tmp_path / "p.zip", registry)
    with pytest.raises(BuildError) as caught:
        await collect(builder.build(request))
    assert "pip install" in caught.value.step
    assert any("cog-no-such-dist-xyz" in line for line in caught.value.output)


async def test_setup_that_raises_fails_the_check(builder, registry, tmp_path, no_leaked_containers):
    root = _model(tmp_path, setup="raise RuntimeError('weights are missing')")
    request = package_request(root, tmp_path / "p.zip", registry)
    await collect(builder.build(request))
    with pytest.raises(BuildError) as caught:
        async for _ in check_image(request.image, request.package_zip, request.config, None):
            pass
    assert "setup failed" in str(caught.value)
    assert "weights are missing" in str(caught.value) + " ".join(caught.value.output)


async def test_example_mismatch_fails_the_check(builder, registry, tmp_path, no_leaked_containers):
    root = _model(tmp_path, examples="examples:\n  - input: {text: abc}\n    output: 'abc'\n")
    request = package_request(root, tmp_path / "p.zip", registry)
    await collect(builder.build(request))
    with pytest.raises(BuildError) as caught:
        async for _ in check_image(request.image, request.package_zip, request.config, None):
            pass
    assert caught.value.step == "test: example 1"
    assert "expected 'abc'" in str(caught.value) and "'ABC'" in str(caught.value)


@pytest.mark.parametrize(
    ("run", "timeout", "message"),
    [
        (
            "import os; os._exit(3)",
            120,
            # The server survives its model's process and says so (it starts it again).
            "example 1 failed (HTTP 500): the model's process exited (code 3)",
        ),
        ("import time; time.sleep(600)", 5, "example 1 got no answer within 5s"),
    ],
    ids=["process-dies", "hangs"],
)
async def test_an_example_that_kills_or_hangs_the_model_fails_the_check(
    builder, registry, tmp_path, no_leaked_containers, run, timeout, message
):
    root = _model(tmp_path, run=run, examples="examples:\n  - input: {text: abc}\n")
    request = package_request(root, tmp_path / "p.zip", registry)
    await collect(builder.build(request))
    with pytest.raises(BuildError) as caught:
        image, package, config = request.image, request.package_zip, request.config
        async for _ in check_image(image, package, config, None, timeout=timeout):
            pass
    assert message in str(caught.value)
    assert caught.value.step == "test: example 1"
    assert not isinstance(caught.value, BuilderUnavailable)  # the package's fault


async def test_unreachable_engine_is_builder_unavailable(registry, tmp_path):
    builder = DockerBuilder.from_settings(
        BuilderSettings(registry=registry, docker_host="unix:///nonexistent/docker.sock")
    )
    await builder.open()
    try:
        request = package_request(EXAMPLES / "hello", tmp_path / "p.zip", registry)
        with pytest.raises(BuilderUnavailable) as caught:
            await collect(builder.build(request))
        assert "not reachable" in str(caught.value)
    finally:
        await builder.close()


async def test_a_base_image_name_the_engine_refuses_is_the_servers_setup(
    registry, tmp_path, no_leaked_containers
):
    """An operator's --base-image template that makes no valid image reference (the engine
    answers 400, not 404): 503-class, naming the image, not the package's fault."""
    builder = DockerBuilder.from_settings(
        BuilderSettings(registry=registry, base_images={"cpu": "Python:{python_version}-slim"})
    )
    request = package_request(EXAMPLES / "hello", tmp_path / "p.zip", registry)
    try:
        with pytest.raises(BuilderUnavailable) as caught:
            await collect(builder.build(request))
    finally:
        await builder.close()
    assert caught.value.step == "base image"
    assert str(caught.value).startswith(
        f"base image Python:{request.config.environment.python_version}-slim: the Docker "
        "Engine refused it: "
    )
    assert "invalid reference format" in str(caught.value)


async def test_unreachable_registry_is_builder_unavailable(builder, tmp_path, no_leaked_containers):
    request = package_request(EXAMPLES / "hello", tmp_path / "p.zip", "127.0.0.1:1")
    with pytest.raises(BuilderUnavailable) as caught:
        await collect(builder.build(request))
    assert caught.value.step == "push"
    assert "127.0.0.1:1" in str(caught.value)
    assert "{'message'" not in str(caught.value)  # the engine's words, not a dict


async def test_pulling_an_image_the_registry_lacks_is_a_plain_404(docker_engine, registry):
    async with Engine(docker_engine) as engine:
        with pytest.raises(ImageNotFound) as caught:
            await engine.ensure_image(f"{registry}/cog-test/absent:nope")
    assert caught.value.status == 404
    assert isinstance(caught.value.message, str) and "not found" in caught.value.message


async def test_cancelled_build_leaves_no_containers(
    builder, registry, tmp_path, no_leaked_containers
):
    root = _model(tmp_path, yaml_extra="  system_packages: [cowsay]\n")
    request = package_request(root, tmp_path / "p.zip", registry)
    stream = builder.build(request)
    step_container = None
    in_apt_step = False
    async for event in stream:
        if event.line.startswith("Step ") and "apt-get" in event.line:
            in_apt_step = True
        elif in_apt_step and event.line.strip().startswith("---> Running in "):
            step_container = event.line.split()[-1]  # the engine started the step's container
            break
    assert step_container, "the apt-get step never started"
    assert any(c.startswith(step_container) for c in containers())
    await stream.aclose()
    # no_leaked_containers waits for the engine to remove the interrupted step's container


async def test_infer_reports_bad_inputs(builder, registry, workdir, no_leaked_containers):
    request = package_request(EXAMPLES / "hello", workdir / "hello2.zip", registry)
    await collect(builder.build(request))
    with pytest.raises(InferenceError, match="no input 'nope'"):
        await run_inference(request.image, ["nope=1"])
    with pytest.raises(InferenceError, match="times"):
        await run_inference(request.image, ["times=99"])
    with pytest.raises(InferenceError, match="no such file"):
        await run_inference(request.image, ["name=@/nonexistent/file.txt"])


async def test_docker_host_from_the_environment(monkeypatch, registry, docker_engine, tmp_path):
    """No --docker-host: DOCKER_HOST is used, by the builder, the check and cog infer, and
    an unreachable one is named in a clear error."""
    request = package_request(EXAMPLES / "hello", tmp_path / "p.zip", registry)
    monkeypatch.setenv("DOCKER_HOST", docker_engine)  # e.g. unix:///var/run/docker.sock
    builder = DockerBuilder.from_settings(BuilderSettings(registry=registry))
    try:
        _, built = await collect(builder.build(request))
    finally:
        await builder.close()
    assert [b.image for b in built] == [request.image]

    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:1")
    builder = DockerBuilder.from_settings(BuilderSettings(registry=registry))
    try:
        with pytest.raises(BuilderUnavailable) as caught:
            await collect(builder.build(request))
    finally:
        await builder.close()
    assert "the Docker Engine at tcp://127.0.0.1:1 is not reachable" in str(caught.value)
    with pytest.raises(BuilderUnavailable, match=r"tcp://127\.0\.0\.1:1"):
        async for _ in check_image(request.image, request.package_zip, request.config, None):
            pass
    with pytest.raises(InferenceError, match=r"tcp://127\.0\.0\.1:1"):
        await run_inference(request.image, ["name=x"])


DYING_MODEL = """\
import os

import cog


class Model(cog.Model):
    @cog.input("input", type=str, default="x")
    @cog.input("other", type=str)
    def run(self, input, other):
        if input == "die":
            print("about to die", flush=True)
            os._exit(3)
        return f"{input}|{other}"
"""


@pytest.fixture(scope="module")
def dying_model(registry, base_images, tmp_path_factory):
    """An image whose run() prints a line, then kills its process when its input is 'die';
    it has an input named `input` (with a default) and another required one."""
    root = tmp_path_factory.mktemp("dying") / "model"
    root.mkdir()
    (root / "cog.yaml").write_text(
        "name: test/dying\nmodel: infer.py:Model\nenvironment:\n  python_version: '3.11'\n"
    )
    (root / "infer.py").write_text(DYING_MODEL)
    request = package_request(root, root.parent / "p.zip", registry)

    async def build() -> None:
        builder = DockerBuilder.from_settings(BuilderSettings(registry=registry))
        try:
            await collect(builder.build(request))
        finally:
            await builder.close()

    asyncio.run(build())
    return request.image


async def test_infer_of_a_model_that_dies_is_one_clear_error(dying_model, no_leaked_containers):
    # A bare value goes to the input named `input`, although `other` is the only required.
    output = await run_inference(dying_model, ["hello", "other=o"])
    assert output.text == "hello|o"
    with pytest.raises(InferenceError) as caught:
        await run_inference(dying_model, ["die", "other=o"])
    message = str(caught.value)
    first, *rest = message.splitlines()
    assert first == "the model answered HTTP 500: the model's process exited (code 3)"
    assert "about to die" in "\n".join(rest)  # the model's last lines
    # no_leaked_containers: the container is removed


async def test_stale_check_containers_are_removed_only_when_their_owner_is_gone(
    docker_engine, base_images, no_leaked_containers
):
    """A server killed outright leaves its check container; the next check removes it, but
    not one of a server still running (several may share an engine), nor one of a server
    in another PID namespace (a container with --network host: same hostname, and a PID
    that is another process here)."""
    gone = subprocess.Popen(["true"])
    gone.wait()  # its PID belongs to no process now
    here = f"{socket.gethostname()}/{pid_namespace()}"
    other_namespace = f"{socket.gethostname()}/pid:[1]"
    owners = {
        "dead-here": {OWNER_LABEL: f"{here}/{gone.pid}/0123456789ab"},
        "alive-here": {OWNER_LABEL: f"{here}/{os.getpid()}/0123456789ab"},
        "other-namespace": {OWNER_LABEL: f"{other_namespace}/{gone.pid}/0123456789ab"},
        "elsewhere": {OWNER_LABEL: "other-host/pid:[1]/1/0123456789ab"},
        "elsewhere-expired": {
            OWNER_LABEL: "other-host/pid:[1]/1/0123456789ab",
            EXPIRES_LABEL: "1",
        },
    }
    engine = Engine(docker_engine)
    docker = engine.docker
    made = []
    try:
        for name, labels in owners.items():
            container = await docker.containers.create(
                {"Image": CPU_BASE, "Cmd": ["sleep", "300"], "Labels": {LABEL: "check", **labels}},
                name=f"cog-test-{name}-{uuid.uuid4().hex[:8]}",
            )
            await container.start()
            made.append(container)
        removed = await remove_stale_containers(engine, "check")
        left = {c["Names"][0].lstrip("/") for c in await docker.containers.list(all=True)}
    finally:
        for container in made:
            await ModelContainer._delete(container)
        await engine.close()

    def kind(name: str) -> str:  # cog-test-<kind>-<random>
        return name.removeprefix("cog-test-").rsplit("-", 1)[0]

    assert sorted(map(kind, removed)) == ["dead-here", "elsewhere-expired"]
    assert {"alive-here", "other-namespace", "elsewhere"} <= {
        kind(n) for n in left if n.startswith("cog-test-")
    }
    assert not {kind(n) for n in left if n.startswith("cog-test-")} & {"dead-here"}


async def test_a_cancel_during_create_leaves_no_container(
    dying_model, docker_engine, no_leaked_containers
):
    """Cancelled at many points of starting a container, also while the engine is still
    creating it (when cog does not know its ID yet): nothing is left behind."""
    engine = Engine(docker_engine)
    cancelled = 0
    try:
        for attempt in range(12):
            model = ModelContainer(engine, dying_model, role="infer")
            entering = asyncio.ensure_future(model.__aenter__())
            await asyncio.sleep(attempt * 0.005)
            entering.cancel()
            try:
                await entering
            except asyncio.CancelledError:
                cancelled += 1
            else:
                await model.__aexit__(None, None, None)
    finally:
        await engine.close()
    assert cancelled >= 3


async def test_gpu_image_with_the_wheels_strategy(
    registry, base_images, tmp_path, no_leaked_containers
):
    """A GPU image needs no CUDA base image with the wheels strategy, so it is built here
    for real: the smallest honest case, a model without a framework on CUDA 11.7 and
    cuDNN 8.5 (NVIDIA's CUDA runtime, cuDNN and cuBLAS wheels, about 835 MB to download).
    The dynamic loader sees the libraries, and the check runs the image on the CPU."""
    root = _model(tmp_path, yaml_extra="  architectures: [gpu]\n  cuda: '11.7'\n  cudnn: '8.5'\n")
    request = package_request(root, tmp_path / "p.zip", registry, target="gpu")
    builder = DockerBuilder.from_settings(BuilderSettings(registry=registry))
    try:
        logs, built = await collect(builder.build(request))
    finally:
        await builder.close()
    assert [b.image for b in built] == [request.image]
    assert any("nvidia-cudnn-cu11==8.5.*" in line for line in lines(logs))
    loader = subprocess.run(
        ["docker", "run", "--rm", request.image, "ldconfig", "-p"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for library in ("libcudart.so.11.0", "libcudnn.so.8", "libcublas.so.11", "libcublasLt.so.11"):
        assert library in loader, f"{library} not known to the dynamic loader"
    check = [
        e.line async for e in check_image(request.image, request.package_zip, request.config, None)
    ]
    assert "This Docker Engine has no NVIDIA runtime: the GPU image runs on the CPU" in check
    assert any(line.startswith("Model ready after") for line in check)


@pytest.mark.parametrize("python_version", ["3.11", "3.10"])
async def test_image_strategy_gives_the_packages_python_or_says_it_cannot(
    registry, base_images, tmp_path, python_version, no_leaked_containers
):
    """The image strategy on a Debian base (the CUDA images' part that matters here: a
    distribution's Python): 3.11 is Debian's and is used; 3.10 is not packaged, and the
    build stops at that step saying so, instead of labelling a 3.11 image as 3.10."""
    root = _model(tmp_path, yaml_extra="  architectures: [gpu]\n  cuda: '12.1'\n")
    cog_yaml = root / "cog.yaml"
    cog_yaml.write_text(cog_yaml.read_text().replace("'3.11'", f"'{python_version}'"))
    request = package_request(root, tmp_path / "p.zip", registry, target="gpu")
    settings = BuilderSettings(
        registry=registry, gpu_strategy="image", base_images={"gpu": CPU_BASE}
    )
    builder = DockerBuilder.from_settings(settings)
    try:
        if python_version == "3.10":
            with pytest.raises(BuildError) as caught:
                await collect(builder.build(request))
            assert "python3.10 -m venv /opt/cog" in caught.value.step
            assert any("has no Python 3.10" in line for line in caught.value.output)
            return
        _, built = await collect(builder.build(request))
    finally:
        await builder.close()
    assert [b.image for b in built] == [request.image]
    python = subprocess.run(
        ["docker", "run", "--rm", request.image, "python", "-c",
         "import sys; print(sys.prefix, sys.version_info[:2])"],
        capture_output=True, text=True, check=True,
    ).stdout.split(maxsplit=1)  # fmt: skip
    assert python == ["/opt/cog", "(3, 11)\n"]


async def test_infer_of_an_image_that_is_no_cog_model(base_images, registry, no_leaked_containers):
    """Something that would answer /ping on port 5000, but cog did not build it (and it
    could not be reached there: model containers have no network): one clear error, at
    once."""
    image = f"{registry}/cog-test/not-a-model:1"
    dockerfile = (
        f"FROM {CPU_BASE}\n"
        "RUN mkdir /fake && echo '{}' > /fake/ping && echo '<html>hi</html>' > /fake/help\n"
        'CMD ["python3", "-m", "http.server", "5000", "--directory", "/fake"]\n'
    )
    subprocess.run(
        ["docker", "build", "-q", "--force-rm", "-t", image, "-"],
        input=dockerfile.encode(),
        check=True,
        capture_output=True,
    )
    with pytest.raises(InferenceError) as caught:
        await run_inference(image, ["x"])
    assert str(caught.value) == (
        f"{image} is not an image cog built (it has no org.cog-models.cog-version label): "
        "cog runs a model only in its own runtime, which serves it with no network"
    )


class TestDockerBuilderContract(BuilderContract):
    """The shipped Builder contract (cog.testing) against the Docker builder."""
