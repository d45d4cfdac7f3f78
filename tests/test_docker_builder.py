"""The Docker builder, the post-build check and `cog infer`, against a real Docker Engine
and a real registry, building the real examples."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import aiodocker
import pytest

from cog.builders import BuildError, BuilderSettings, BuilderUnavailable
from cog.builders.docker import DockerBuilder
from cog.check import check_image
from cog.container import ensure_image
from cog.infer import InferenceError, run_inference
from tests.builder_helpers import EXAMPLES, collect, copy_example, lines, package_request
from tests.services.docker import registry_digest

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
        ("import os; os._exit(3)", 120, "example 1: the model stopped answering"),
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


async def test_unreachable_registry_is_builder_unavailable(builder, tmp_path, no_leaked_containers):
    request = package_request(EXAMPLES / "hello", tmp_path / "p.zip", "127.0.0.1:1")
    with pytest.raises(BuilderUnavailable) as caught:
        await collect(builder.build(request))
    assert caught.value.step == "push"
    assert "127.0.0.1:1" in str(caught.value)
    assert "{'message'" not in str(caught.value)  # the engine's words, not a dict


async def test_pulling_an_image_the_registry_lacks_is_a_plain_404(docker_engine, registry):
    docker = aiodocker.Docker(url=docker_engine)
    try:
        with pytest.raises(aiodocker.DockerError) as caught:
            await ensure_image(docker, f"{registry}/cog-test/absent:nope")
    finally:
        await docker.close()
    assert caught.value.status == 404
    assert isinstance(caught.value.message, str) and "not found" in caught.value.message


async def test_cancelled_build_leaves_no_containers(
    builder, registry, tmp_path, no_leaked_containers
):
    root = _model(tmp_path, yaml_extra="  system_packages: [cowsay]\n")
    request = package_request(root, tmp_path / "p.zip", registry)
    stream = builder.build(request)
    async for event in stream:
        if "apt-get" in event.line:
            await asyncio.sleep(1.0)  # the RUN step's container exists now
            break
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
