"""Dockerfile generation: golden files, layer order, GPU rewrites, the context tar; and the
builders' other logic that needs no Docker engine (settings, the check's comparisons,
`cog infer`'s input names, which stale containers to remove).

Golden files live in tests/golden/; after an intended change, regenerate them with
    COG_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_dockerfile.py
and review the diff.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import aiohttp
import pytest

import cog
from cog.builders import (
    DEFAULT_BASE_IMAGES,
    BuilderConfigError,
    BuildError,
    BuilderSettings,
    BuilderUnavailable,
)
from cog.builders.context import build_context
from cog.builders.docker import DockerBuilder
from cog.builders.dockerfile import (
    cuda_wheels,
    dockerfile_for,
    dockerfile_for_request,
    framework_pins,
    gpu_packages,
    python_check,
)
from cog.builders.runtime import runtime_wheel
from cog.cli.infer import (
    InferenceError,
    RawInput,
    _save,
    parse_inputs,
    resolve_names,
    run_inference,
)
from cog.config import check_config
from cog.engine.containers import (
    EXPIRES_LABEL,
    OWNER_LABEL,
    TARGET_LABEL,
    abandoned,
    device_requests,
    owner,
    pid_namespace,
)
from cog.package import PackageArchive
from cog.server.answers import describe_output, output_matches
from tests.builder_helpers import EXAMPLES, collect, package_request
from tests.registry_helpers import raw_zip
from tests.test_cli import COG, free_port

GOLDEN = Path(__file__).parent / "golden"
PACKAGE_ID = "f" * 64
WHEEL = "cog-0.0.0-py3-none-any.whl"
MODEL = "import cog\n\nclass Model(cog.Model):\n    def run(self):\n        return 1\n"


class Files:
    def __init__(self, files):
        self.files = files

    def exists(self, path):
        return path in self.files

    def read_text(self, path):
        return self.files[path]


def render(
    yaml: str,
    target: str,
    strategy: str = "wheels",
    files=None,
    base=None,
    *,
    package_id: str = PACKAGE_ID,
    wheel: str = WHEEL,
    stamped: bool = False,
    pip_cache: str | None = None,
) -> str:
    files = {"infer.py": MODEL, **(files or {})}
    config = check_config(yaml, Files(files))
    bases = {**DEFAULT_BASE_IMAGES, **({"gpu": base} if base else {})}
    settings = BuilderSettings(registry="r:5000", gpu_strategy=strategy, base_images=bases)
    # As dockerfile_for_request does: GPU images get the requirements file's text.
    path = config.environment.python_requirements
    requirements = files[path] if target == "gpu" and path else None
    text = dockerfile_for(
        config, target, settings, package_id=package_id, runtime_wheel=wheel,
        signature_json='{"arguments": {}}', requirements=requirements, pip_cache=pip_cache,
    )  # fmt: skip
    # The cog version is stamped in; keep the golden files version-independent.
    return text if stamped else text.replace(cog.__version__, "VERSION")


# The GPU cases name their cuDNN major: the golden files then follow neither the table's
# cuDNN refinements ("8" -> "8.9") nor its picks, which test_config covers.
CASES = {
    "cpu-minimal": ("model: infer.py:Model\n", "cpu", "wheels", {}),
    "cpu-packages": (
        "model: infer.py:Model\nenvironment:\n  python_version: '3.11'\n"
        "  python_requirements: requirements.txt\n"
        "  python_packages: ['pillow==11.3.0', 'numpy==2.1.0']\n"
        "  system_packages: [ffmpeg, libsndfile1]\n",
        "cpu",
        "wheels",
        {"requirements.txt": "requests==2.32.3\n"},
    ),
    "gpu-wheels-torch": (
        "model: infer.py:Model\nenvironment:\n  python_version: '3.11'\n"
        "  architectures: [cpu, gpu]\n"
        "  cudnn: '8'\n"
        "  python_packages: ['torch==2.1.0', 'torchvision==0.16.0', 'pillow==11.3.0']\n",
        "gpu",
        "wheels",
        {},
    ),
    "gpu-image-torch": (
        "model: infer.py:Model\nenvironment:\n  python_version: '3.11'\n"
        "  architectures: [gpu]\n"
        "  cudnn: '9'\n"
        "  python_packages: ['torch==2.4.1', 'torchvision==0.19.1']\n",
        "gpu",
        "image",
        {},
    ),
    # torch pinned in the requirements file: rewritten there too (torch 1.7: CUDA 11.0,
    # whose image NVIDIA no longer publishes: a site's own base image).
    "gpu-image-torch-requirements": (
        "model: infer.py:Model\nenvironment:\n  architectures: [gpu]\n"
        "  cudnn: '8'\n"
        "  python_version: '3.10'\n  python_requirements: requirements.txt\n",
        "gpu",
        "image",
        {
            "requirements.txt": "# the model's packages\nnumpy==1.26.4\n"
            "torch==1.7.1  # CPU build on PyPI\ntorchvision==0.8.2 ; python_version < '3.12'\n"
        },
        "site.local/cuda:{cuda}-cudnn{cudnn_major}-runtime-ubuntu22.04",
    ),
    # torch brings its own nvidia-* wheels: none installed beside them, registered after.
    "gpu-wheels-torch-requirements": (
        "model: infer.py:Model\nenvironment:\n  python_version: '3.11'\n"
        "  architectures: [gpu]\n"
        "  cudnn: '8'\n"
        "  python_requirements: requirements.txt\n  python_packages: ['torchvision==0.16.0']\n",
        "gpu",
        "wheels",
        {"requirements.txt": "torch==2.1.0\n"},
    ),
    # No framework: the CUDA runtime and cuDNN, and the cuBLAS of that CUDA cuDNN needs.
    "gpu-wheels-no-framework": (
        "model: infer.py:Model\nenvironment:\n  python_version: '3.11'\n"
        "  architectures: [gpu]\n"
        "  cuda: '11.7'\n  cudnn: '8.5'\n  python_packages: ['numpy==2.1.0']\n",
        "gpu",
        "wheels",
        {},
    ),
    "gpu-wheels-tf-and-cuda": (
        "model: infer.py:Model\nenvironment:\n  python_version: '3.11'\n"
        "  architectures: [gpu]\n"
        "  cudnn: '8'\n"
        "  python_packages: ['tensorflow==2.15.0']\n",
        "gpu",
        "wheels",
        {},
    ),
    # TensorFlow before the and-cuda extra: every library it loads, explicitly.
    "gpu-wheels-tf-explicit": (
        "model: infer.py:Model\nenvironment:\n  python_version: '3.11'\n"
        "  architectures: [gpu]\n"
        "  cudnn: '8'\n"
        "  python_requirements: requirements.txt\n",
        "gpu",
        "wheels",
        {"requirements.txt": "tensorflow==2.13.1\n"},
    ),
    "gpu-image-tf1": (
        "model: infer.py:Model\nenvironment:\n  python_version: '3.11'\n"
        "  architectures: [gpu]\n"
        "  cudnn: '7'\n"
        "  python_packages: ['tensorflow==1.15.0']\n",
        "gpu",
        "image",
        {},
        # CUDA 10.0: NVIDIA no longer publishes it; a site's own base image
        "site.local/cuda:{cuda}-cudnn{cudnn_major}-runtime",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_golden(name):
    yaml, target, strategy, files, *base = CASES[name]
    text = render(yaml, target, strategy, files, base=base[0] if base else None)
    path = GOLDEN / f"{name}.Dockerfile"
    if os.environ.get("COG_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; see the module docstring"


#: The cases also rendered as the BuildKit builder renders them: pip's downloads in a cache
#: mount (one with a requirements file rewritten for CUDA, whose RUN line is compound).
BUILDKIT_CASES = ("cpu-packages", "gpu-image-torch-requirements")


@pytest.mark.parametrize("name", BUILDKIT_CASES)
def test_golden_with_a_pip_cache(name):
    yaml, target, strategy, files, *base = CASES[name]
    text = render(
        yaml, target, strategy, files, base=base[0] if base else None, pip_cache="cog-pip"
    )
    path = GOLDEN / f"{name}.buildkit.Dockerfile"
    if os.environ.get("COG_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; see the module docstring"


def layer_index(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines()) if needle in line)


def test_layer_order_puts_what_changes_most_last():
    text = render(*CASES["cpu-packages"][:3], files=CASES["cpu-packages"][3])
    order = [
        layer_index(text, "FROM "),
        layer_index(text, "--target /opt/cog-runtime 'aiohttp"),  # the server's environment
        layer_index(text, "apt-get install"),
        layer_index(text, 'COPY ["package/requirements.txt"'),
        layer_index(text, "-r /tmp/cog/requirements.txt"),
        layer_index(text, "pillow==11.3.0"),
        layer_index(text, "COPY --from=cog-wheels /tmp/cog-files/ /"),
        layer_index(text, "COPY package/ /src/"),
        layer_index(text, "LABEL"),
    ]
    assert order == sorted(order)
    # The image settings are cached with the base image: no build spends a step on them.
    first_install = layer_index(text, "pip install")
    assert layer_index(text, "EXPOSE 5000") < first_install
    assert layer_index(text, "CMD [") < first_install
    # After the model's packages: one step copies cog in, unpacked and compiled already.
    after = text.splitlines()[layer_index(text, "pillow==11.3.0") + 1 :]
    steps = [line.split()[0] for line in after if line[:1].isupper()]
    assert steps == ["COPY", "COPY", "LABEL"], after
    # The model's directory is the working directory from the base stage on.
    assert layer_index(text, "WORKDIR /src") < first_install


def _stages(text: str) -> list[list[str]]:
    """The Dockerfile's stages, each its lines from its FROM on."""
    stages: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_cog_is_unpacked_in_a_stage_the_models_packages_never_wait_for():
    """The base stage (the base image, the Python check, the server's environment); the
    cog stage, from it, with cog's wheels and nothing of the model; the image, from the
    base stage too, whose model's packages come before cog's one COPY."""
    text = render(*CASES["cpu-packages"][:3], files=CASES["cpu-packages"][3])
    base, wheels, image = _stages(text)
    assert base[0] == "FROM python:3.11-slim AS cog-base"
    assert any("--target /opt/cog-runtime 'aiohttp" in line for line in base)
    assert wheels[0] == "FROM cog-base AS cog-wheels"
    assert wheels[1:] == [
        "COPY cog/ /tmp/cog/",
        f"RUN PYTHONPATH=/tmp/cog/server/{WHEEL} python -m cog.wheel_install "
        f"/tmp/cog/server/{WHEEL} /tmp/cog/model/{WHEEL} /tmp/cog-files",
    ]
    assert image[0] == "FROM cog-base"
    assert not any("/tmp/cog/" in line and "requirements" not in line for line in image)
    assert "PYTHONPATH=/opt/cog-model" in base[1]  # the model's cog first on its path


def test_a_pythonpath_of_the_models_own_comes_after_its_cog():
    yaml = (
        "predict: predict.py:Predictor\nbuild:\n  python_packages: [pillow==11.3.0]\n"
        "environment: [PYTHONPATH=/src/lib]\n"
    )
    text = render(yaml, "cpu", "wheels", files={"predict.py": "class Predictor:\n  pass\n"})
    assert 'ENV PYTHONPATH="/opt/cog-model:/src/lib"' in text


def test_todays_cog_yaml_sets_variables_and_runs_its_commands_after_the_packages():
    yaml = (
        "predict: predict.py:Predictor\nbuild:\n  python_packages: [pillow==11.3.0]\n"
        "  run: ['echo \"$HOME\" > /x']\nenvironment: [HF_HOME=/src/$cache, EMPTY=]\n"
    )
    text = render(yaml, "cpu", "wheels", files={"predict.py": "class Predictor:\n  pass\n"})
    assert 'ENV HF_HOME="/src/\\$cache" EMPTY=""' in text
    assert layer_index(text, "--target /opt/cog-runtime 'aiohttp") < layer_index(
        text, "ENV HF_HOME"
    )
    assert layer_index(text, "pillow==11.3.0") < layer_index(text, 'RUN echo "$HOME" > /x')
    assert layer_index(text, 'RUN echo "$HOME"') < layer_index(text, "COPY --from=cog-wheels")
    # The commands run in /, as Cog's do; the model's files go to /src after them.
    lines = text.splitlines()
    run = layer_index(text, 'RUN echo "$HOME"')
    assert lines[run - 1] == "WORKDIR /" and lines[run + 1] == "WORKDIR /src"


def _real_dockerfile(root: Path, tmp_path: Path, target: str, strategy: str = "wheels") -> str:
    """The Dockerfile of a real package of the model directory root (zip, ID, config)."""
    request = package_request(root, tmp_path / f"{root.name}.zip", "r:5000", target=target)
    return dockerfile_for_request(
        request, BuilderSettings(registry="r:5000", gpu_strategy=strategy)
    )


def _before(text: str, needle: str) -> list[str]:
    lines = text.splitlines()
    return lines[: layer_index(text, needle)]


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_model_code_does_not_reach_the_dependency_layers(tmp_path, target):
    """Two real packages of one model, differing only in its code: every line before the
    model's files is identical, so those layers stay cached."""
    trees = []
    for name in ("one", "two"):
        root = tmp_path / name
        root.mkdir()
        (root / "cog.yaml").write_text(
            "model: infer.py:Model\nenvironment:\n  architectures: [cpu, gpu]\n"
            "  python_requirements: requirements.txt\n  python_packages: ['torch==2.1.0']\n"
            "  system_packages: [libsndfile1]\n"
        )
        (root / "requirements.txt").write_text("numpy==1.26.4\ntorchvision==0.16.0\n")
        (root / "infer.py").write_text(MODEL + f"# {name}\n")
        trees.append(root)
    one, two = (_real_dockerfile(root, tmp_path, target) for root in trees)
    assert one != two  # the package IDs (labels) differ
    assert _before(one, "COPY package/") == _before(two, "COPY package/")
    assert len(_before(one, "COPY package/")) > 8


def test_a_new_cog_version_leaves_the_packages_layers_alone(monkeypatch):
    """A new cog version changes the runtime wheel (its name and bytes) and the labels;
    every layer of the user's packages stays the same."""
    yaml, target, strategy, files = CASES["cpu-packages"]
    old = render(yaml, target, strategy, files, wheel=runtime_wheel()[0], stamped=True)
    monkeypatch.setattr(cog, "__version__", "99.0.0")
    runtime_wheel.cache_clear()
    try:
        wheel = runtime_wheel()[0]
        new = render(yaml, target, strategy, files, wheel=wheel, stamped=True)
    finally:
        monkeypatch.undo()
        runtime_wheel.cache_clear()
    assert wheel == "cog-99.0.0-py3-none-any.whl"
    assert 'cog-version="99.0.0"' in new and f'cog-version="{cog.__version__}"' in old
    # The base stage (with the runtime's own dependencies) and every line of the image
    # up to cog's COPY are the same; only the cog stage's wheels changed.
    (old_base, old_wheels, old_image), (new_base, new_wheels, new_image) = map(_stages, (old, new))
    assert old_base == new_base
    assert old_wheels != new_wheels
    assert _before("\n".join(old_image), "COPY --from") == _before(
        "\n".join(new_image), "COPY --from"
    )
    assert "pillow==11.3.0" in " ".join(_before("\n".join(new_image), "COPY --from"))


def test_requirements_pins_are_rewritten_for_gpu_images(tmp_path):
    """A torch pin in the requirements file picks the CUDA in config completion, so the
    GPU image installs that CUDA's build of it (read from the real zip), and the CPU image
    installs the file as written."""
    root = tmp_path / "model"
    root.mkdir()
    (root / "cog.yaml").write_text(
        "model: infer.py:Model\nenvironment:\n  architectures: [cpu, gpu]\n"
        "  python_requirements: deps/requirements.txt\n"
    )
    (root / "deps").mkdir()
    (root / "deps" / "requirements.txt").write_text("torch==2.5.1\ntorchaudio==2.5.1\n")
    (root / "infer.py").write_text(MODEL)
    gpu = _real_dockerfile(root, tmp_path, "gpu")
    assert "printf '%s\\n' torch==2.5.1+cu124 torchaudio==2.5.1+cu124 >" in gpu
    assert "--extra-index-url https://download.pytorch.org/whl/cu124 -r " in gpu
    assert "COPY [" not in gpu
    cpu = _real_dockerfile(root, tmp_path, "cpu")
    assert 'COPY ["package/deps/requirements.txt", "/tmp/cog/requirements.txt"]' in cpu
    assert "cu124" not in cpu
    # Nothing to rewrite: the file is copied as written on GPU images too.
    (root / "deps" / "requirements.txt").write_text("numpy==2.1.0\n")
    assert 'COPY ["package/deps/requirements.txt"' in _real_dockerfile(root, tmp_path, "gpu")


@pytest.mark.parametrize(
    "text",
    ["\ufefftorch==2.5.1\n", "torch==2.5.1\t# the CPU build on PyPI\n"],
    ids=["byte-order-mark", "tab-before-comment"],
)
def test_requirements_pins_are_read_alike_by_the_config_and_the_dockerfile(tmp_path, text):
    """The pin that picks the CUDA (config completion, from the package's files and from
    the stored zip as the server reads it) is the pin the GPU Dockerfile rewrites."""
    root = tmp_path / "model"
    root.mkdir()
    (root / "cog.yaml").write_text(
        "model: infer.py:Model\nenvironment:\n  architectures: [gpu]\n"
        "  python_requirements: requirements.txt\n"
    )
    (root / "requirements.txt").write_bytes(text.encode())  # "\ufeff": EF BB BF
    (root / "infer.py").write_text(MODEL)
    request = package_request(root, tmp_path / "p.zip", "r:5000", target="gpu")
    with PackageArchive.open(request.package_zip) as archive:
        stored = check_config(archive.read_text("cog.yaml"), archive)
    assert request.config.environment.cuda == stored.environment.cuda == "12.4"
    dockerfile = dockerfile_for_request(request, BuilderSettings(registry="r:5000"))
    assert "printf '%s\\n' torch==2.5.1+cu124 >" in dockerfile


def test_wheels_strategy_installs_cuda_once():
    """torch and TF >= 2.14 bring NVIDIA's wheels themselves: nothing installed beside them
    (which pip would replace by their own pins, the image carrying both)."""
    torch = render(*CASES["gpu-wheels-torch"][:3])
    assert "nvidia-" not in torch
    assert layer_index(torch, "torch==2.1.0+cu121") < layer_index(torch, "ldconfig")
    tf = render(*CASES["gpu-wheels-tf-and-cuda"][:3])
    assert "'tensorflow[and-cuda]==2.15.0'" in tf and "nvidia-" not in tf
    explicit = render(
        *CASES["gpu-wheels-tf-explicit"][:3], files=CASES["gpu-wheels-tf-explicit"][3]
    )
    for library in ("cuda-runtime", "cudnn", "cublas", "cufft", "curand", "cusolver", "cusparse"):
        assert f"nvidia-{library}-cu11" in explicit
    assert 'COPY ["package/requirements.txt"' in explicit and "and-cuda" not in explicit
    # cuDNN given as a major ("8") or with its minor ("8.9"): both give a wheel pin.
    assert cuda_wheels("12.1", "8")[:3] == [
        "nvidia-cuda-runtime-cu12==12.1.*", "nvidia-cudnn-cu12==8.*", "nvidia-cublas-cu12==12.1.*",
    ]  # fmt: skip
    assert cuda_wheels("11.8", "8.6")[1:3] == [
        "nvidia-cudnn-cu11==8.6.*",
        "nvidia-cublas-cu11==11.11.*",
    ]
    assert cuda_wheels("12.4", "9.1.0")[1] == "nvidia-cudnn-cu12==9.1.*"


def test_image_strategy_gives_the_packages_python():
    """NVIDIA's images carry no Python: the package's python_version is installed (from the
    distribution) into a virtualenv, or the step fails saying why; never another version."""
    text = render(*CASES["gpu-image-torch"][:3])
    assert "python3.11 -m venv /opt/cog" in text
    assert "apt-get install -y --no-install-recommends python3.11 python3.11-venv" in text
    assert "has no Python 3.11" in text and "--gpu-strategy wheels" in text
    assert "ENV PATH=/opt/cog/bin:" in text
    assert layer_index(text, "python3.11 -m venv") < layer_index(text, "torch==2.4.1")
    assert "python3 " not in text  # not the distribution's default Python


def test_default_bases_and_templates():
    assert (
        render("model: infer.py:Model\n", "cpu").splitlines()[1]
        == "FROM python:3.8-slim AS cog-base"
    )
    gpu = render(CASES["gpu-image-torch"][0], "gpu", "image")
    assert "FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04" in gpu
    assert DEFAULT_BASE_IMAGES["cpu"] == "python:{python_version}-slim"
    wheels = render(CASES["gpu-wheels-torch"][0], "gpu", "wheels")
    assert "FROM python:3.11-slim" in wheels and "ldconfig" in wheels


OLD_TORCH = (
    "model: infer.py:Model\nenvironment:\n  architectures: [gpu]\n"
    "  python_packages: ['torch==1.7.1', 'torchvision==0.8.2']\n"
)


def test_wheels_strategy_refuses_cuda_without_wheels():
    """NVIDIA's library wheels start at CUDA 11.7: older CUDA needs the image strategy,
    unless torch brings its CUDA libraries itself (its old wheels carry them inside)."""
    no_framework = "model: infer.py:Model\nenvironment:\n  architectures: [gpu]\n  cuda: '11.0'\n"
    with pytest.raises(BuildError, match=r"CUDA 11.0.*--gpu-strategy image") as caught:
        render(no_framework, "gpu", "wheels")
    assert caught.value.step == "Dockerfile"
    tf = "model: infer.py:Model\nenvironment:\n  architectures: [gpu]\n"
    with pytest.raises(BuildError, match=r"CUDA 11.2.*--gpu-strategy image"):
        render(tf + "  python_packages: ['tensorflow==2.6.0']\n", "gpu", "wheels")
    text = render(OLD_TORCH, "gpu", "wheels")
    assert "torch==1.7.1+cu110" in text and "nvidia-" not in text


def test_image_strategy_needs_a_base_for_a_cuda_nvidia_no_longer_publishes():
    with pytest.raises(
        BuildError, match=r"no NVIDIA CUDA image .* CUDA 11.0 with cuDNN 8"
    ) as caught:
        render(OLD_TORCH, "gpu", "image")
    assert "--base-image gpu=" in str(caught.value) and "CUDA 12.1 / cuDNN 8" in str(caught.value)
    text = render(OLD_TORCH, "gpu", "image", base="site.local/cuda:{cuda}-cudnn{cudnn}")
    assert text.splitlines()[1] == "FROM site.local/cuda:11.0-cudnn8 AS cog-base"
    assert "torch==1.7.1+cu110" in text


def test_gpu_rewrites():
    packages, extra = gpu_packages(["torch==1.7.1", "torchvision==0.8.2", "pillow==1.0"], "11.0")
    assert packages == ["torch==1.7.1+cu110", "torchvision==0.8.2+cu110", "pillow==1.0"]
    assert extra == [
        "--extra-index-url", "https://download.pytorch.org/whl/cu110",
        "-f", "https://download.pytorch.org/whl/torch_stable.html",
    ]  # fmt: skip
    # torch 2.4 and later are only on the per-CUDA index; torchaudio 0.7 has no CUDA suffix.
    packages, extra = gpu_packages(["torch==2.5.1", "torchaudio==2.5.1"], "12.4")
    assert packages == ["torch==2.5.1+cu124", "torchaudio==2.5.1+cu124"]
    assert extra == ["--extra-index-url", "https://download.pytorch.org/whl/cu124"]
    packages, _ = gpu_packages(["torch==1.7.1", "torchaudio==0.7.2"], "10.2")
    assert packages == ["torch==1.7.1+cu102", "torchaudio==0.7.2"]
    packages, extra = gpu_packages(["tensorflow==1.15.0"], "10.0")
    assert packages == ["tensorflow_gpu==1.15.0"] and extra == []
    packages, _ = gpu_packages(["tensorflow==2.4.0"], "11.0")
    assert packages == ["tensorflow==2.4.0"]
    # TensorFlow 2.14 and later: the and-cuda extra on the wheels strategy only.
    packages, _ = gpu_packages(["tensorflow[foo]==2.16.1"], "12.3", strategy="wheels")
    assert packages == ["tensorflow[foo,and-cuda]==2.16.1"]
    packages, _ = gpu_packages(["tensorflow==2.16.1"], "12.3", strategy="image")
    assert packages == ["tensorflow==2.16.1"]
    # torchvision's suffix follows torch's pin given elsewhere (the requirements file);
    # an environment marker stays.
    packages, extra = gpu_packages(
        ["torchvision==0.16.0 ; python_version < '3.13'"], "12.1", pins={"torch": "2.1.0"}
    )
    assert packages == ["torchvision==0.16.0+cu121 ; python_version < '3.13'"]
    assert extra[:2] == ["--extra-index-url", "https://download.pytorch.org/whl/cu121"]


def test_run_lines_are_shell_safe():
    """RUN lines go through /bin/sh: version specifiers must not become redirections."""
    text = render(CASES["cpu-packages"][0], "cpu", files=CASES["cpu-packages"][3])
    assert "'aiohttp>=3.9'" in text and " aiohttp>=3.9" not in text


def test_labels_carry_id_config_signature_and_version():
    text = render("model: infer.py:Model\n", "cpu")
    assert f'org.cog-models.package-id="{PACKAGE_ID}"' in text
    assert 'org.cog-models.signature="{\\"arguments\\": {}}"' in text
    assert '"Model\\":\\"infer.py:Model\\"' in text
    assert 'org.cog-models.cog-version="VERSION"' in text


def test_shell_metacharacters_never_reach_a_run_line():
    with pytest.raises(Exception, match="not a Debian package name"):
        render("model: infer.py:Model\nenvironment:\n  system_packages: ['x;rm -rf /']\n", "cpu")


def test_runtime_wheel_is_deterministic_and_installable_shape():
    runtime_wheel.cache_clear()
    first = runtime_wheel()
    runtime_wheel.cache_clear()
    assert runtime_wheel() == first
    name, data = first
    assert name == f"cog-{cog.__version__}-py3-none-any.whl"
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(f"cog-{cog.__version__}.dist-info/METADATA").decode()
    assert "cog/runtime/__main__.py" in names and "cog/model.py" in names
    assert not any("__pycache__" in n for n in names)
    assert "Requires-Dist: aiohttp" in metadata and "aiodocker" not in metadata


def test_context_tar_is_deterministic_and_complete(tmp_path):
    zip_path = tmp_path / "p.zip"
    zip_path.write_bytes(raw_zip({"cog.yaml": "model: infer.py:Model\n", "infer.py": MODEL}))

    async def tar_bytes() -> bytes:
        return b"".join([chunk async for chunk in build_context(zip_path, "FROM x\n")])

    first, second = asyncio.run(tar_bytes()), asyncio.run(tar_bytes())
    assert first == second
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert tar.extractfile("Dockerfile").read() == b"FROM x\n"
        assert tar.extractfile("package/infer.py").read().decode() == MODEL
    assert set(members) == {
        "Dockerfile",
        f"cog/server/{runtime_wheel()[0]}",
        f"cog/model/{runtime_wheel()[0]}",
        "package/cog.yaml",
        "package/infer.py",
    }
    assert all(m.mtime == 0 and m.uid == 0 for m in members.values())


def test_gpu_images_get_the_gpus_where_the_engine_has_nvidias_runtime():
    text = render(CASES["gpu-wheels-torch"][0], "gpu", "wheels")
    assert f'{TARGET_LABEL}="gpu"' in text  # the label the container reads back
    gpu, cpu = {TARGET_LABEL: "gpu"}, {TARGET_LABEL: "cpu"}
    assert device_requests(gpu, {"runc": {}, "nvidia": {"path": "nvidia-container-runtime"}}) == [
        {"Driver": "", "Count": -1, "Capabilities": [["gpu"]]}
    ]
    assert device_requests(gpu, {"runc": {}}) == []  # no GPUs here: the image runs on the CPU
    assert device_requests(cpu, {"nvidia": {}}) == []
    assert device_requests(None, {"nvidia": {}}) == []


def test_a_build_cancelled_mid_read_ends_with_cancellation(tmp_path):
    """Cancelled while a worker thread reads the package: the read finishes, the reader is
    closed after it, and the cancellation (not 'generator already executing') comes out."""
    zip_path = tmp_path / "p.zip"
    weights = os.urandom(8 << 20)
    zip_path.write_bytes(raw_zip({"cog.yaml": "model: infer.py:Model\n", "w.bin": weights}))

    async def cancel_mid_read(delay: float) -> bool:
        chunks = build_context(zip_path, "FROM x\n")
        for _ in range(3):  # Dockerfile, wheel, then the first read from the zip
            await chunks.__anext__()
        pending = asyncio.ensure_future(chunks.__anext__())
        await asyncio.sleep(delay)
        pending.cancel()
        try:
            await pending
        except asyncio.CancelledError:
            return True
        finally:
            await chunks.aclose()
        return False  # the read was over before the cancel came: nothing to see

    async def many() -> int:
        # At several points of the read; before the fix, a cancel mid-read failed there.
        return sum([await cancel_mid_read(attempt * 0.0002) for attempt in range(20)])

    assert asyncio.run(many()) >= 1


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("x:{pyver}", "unknown placeholder {pyver}"),
        ("x:{0}", "unknown placeholder {0}"),
        ("x:{python_version", "not a valid template"),
        ("x:{cuda!r}", "placeholder {cuda!r} takes no format"),
        ("  ", "is empty"),
    ],
)
def test_base_image_templates_are_checked_when_the_settings_are_made(template, problem):
    with pytest.raises(BuilderConfigError) as caught:
        BuilderSettings(registry="r:5000", base_images={"gpu": template})
    assert problem in str(caught.value)
    assert f"gpu={template}" in str(caught.value)
    assert "{python_version}, {cuda}, {cudnn}, {cudnn_major}, {nvidia_tag}" in str(caught.value)
    with pytest.raises(BuilderConfigError, match="unknown GPU strategy 'cuda'"):
        BuilderSettings(registry="r:5000", gpu_strategy="cuda")
    # Every placeholder works, and targets not given keep their defaults.
    settings = BuilderSettings(
        registry="r:5000",
        gpu_strategy="image",
        base_images={"gpu": "site/{cuda}-{cudnn}-{cudnn_major}-{python_version}{nvidia_tag}"},
    )
    assert settings.base_images["cpu"] == DEFAULT_BASE_IMAGES["cpu"]
    text = render(CASES["gpu-image-torch"][0], "gpu", "image", base=settings.base_images["gpu"])
    assert text.splitlines()[1] == (
        "FROM site/12.4-9-9-3.1112.4.1-cudnn-runtime-ubuntu22.04 AS cog-base"
    )


def test_cog_server_refuses_a_bad_base_image_template(tmp_path):
    """The real `cog server` process: one line naming the placeholder, exit 1, before it
    listens (it used to start, then answer every build with a 500)."""
    result = subprocess.run(
        [COG, "server", "--port", str(free_port()), "--storage", f"file://{tmp_path}",
         "--base-image", "cpu=x:{pyver}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "cog: error: base image template cpu=x:{pyver}: unknown placeholder {pyver} "
        "(allowed: {python_version}, {cuda}, {cudnn}, {cudnn_major}, {nvidia_tag})"
    ]
    assert "listening" not in result.stdout


# -- the check's and `cog infer`'s own logic, without an engine ------------------------


ARGUMENTS = {
    "input": {"type": "str", "default": "x"},
    "other": {"type": "str"},
    "scale": {"type": "int", "default": 2},
}


def test_a_bare_input_goes_to_the_input_named_input():
    """`-i value` / `-i @file` without a name: to `input` when the model has one (even with
    another required input), else its only required input, else its only input."""
    inputs = parse_inputs(["hello", "other=o", "scale=3"])
    assert resolve_names(inputs, ARGUMENTS) == [("input", "hello"), ("other", "o"), ("scale", "3")]
    without = {k: v for k, v in ARGUMENTS.items() if k != "input"}
    assert resolve_names(parse_inputs(["@a.png"]), without) == [("other", "@a.png")]
    assert resolve_names(parse_inputs(["v"]), {"only": {"default": 1}}) == [("only", "v")]
    # Not a name: values with '=' that do not start with an identifier stay whole.
    assert parse_inputs(["a b=c", "@x=y.png"]) == [
        RawInput(None, "a b=c"),
        RawInput(None, "@x=y.png"),
    ]


def test_an_input_nobody_can_place_is_a_clear_error():
    two_required = {"a": {"type": "str"}, "b": {"type": "str"}}
    with pytest.raises(InferenceError, match=r"cannot tell which input 'v' is for.*inputs: a, b"):
        resolve_names(parse_inputs(["v"]), two_required)
    with pytest.raises(InferenceError, match=r"no input 'nope' \(inputs: a, b\)"):
        resolve_names(parse_inputs(["nope=1"]), two_required)


def test_example_outputs_are_compared_as_the_readme_says(tmp_path):
    zip_path = tmp_path / "p.zip"
    zip_path.write_bytes(raw_zip({"cog.yaml": "model: infer.py:Model\n", "out.png": b"\x89PNG1"}))
    # text: trimmed on both sides, otherwise exact
    assert output_matches("hello", b"  hello\n", "text/plain", zip_path)
    assert not output_matches("hello", b"Hello", "text/plain", zip_path)
    # JSON: by value, not by spelling
    assert output_matches('{"a": [1, 2]}', b'{"a":[1,2]}', "application/json", zip_path)
    assert not output_matches('{"a": 1}', b'{"a": 2}', "application/json", zip_path)
    assert not output_matches("not json", b"{}", "application/json", zip_path)
    # files: byte for byte against the package's file
    assert output_matches("@out.png", b"\x89PNG1", "image/png", zip_path)
    assert not output_matches("@out.png", b"\x89PNG2", "image/png", zip_path)
    assert describe_output(b"x" * 300, "text/plain") == repr("x" * 200 + "...")
    assert describe_output(b"\x89PNG", "image/png") == "4 bytes of image/png"


def test_stale_containers_are_those_whose_owner_is_gone():
    import socket

    host, now = socket.gethostname(), 1000.0
    here = f"{host}/{pid_namespace()}"
    assert pid_namespace().startswith("pid:[")  # Linux: the namespace is readable
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert abandoned({OWNER_LABEL: f"{here}/{gone.pid}/abc"}, "running", now)
    assert not abandoned({OWNER_LABEL: f"{here}/{os.getpid()}/abc"}, "running", now)
    assert not abandoned({OWNER_LABEL: owner()}, "exited", now)  # ours: we remove it
    # Same host, another PID namespace (--network host): its PIDs are not ours to check.
    assert not abandoned({OWNER_LABEL: f"{host}/pid:[1]/{gone.pid}/abc"}, "running", now)
    # A label of another shape (no namespace): cog cannot tell, so it leaves it alone.
    assert not abandoned({OWNER_LABEL: f"{host}/{gone.pid}/abc"}, "running", now)
    assert not abandoned({OWNER_LABEL: "elsewhere/pid:[1]/1/abc"}, "exited", now)
    elsewhere = "elsewhere/pid:[1]/1/abc"
    assert abandoned({OWNER_LABEL: elsewhere, EXPIRES_LABEL: "999"}, "running", now)
    assert not abandoned({OWNER_LABEL: elsewhere, EXPIRES_LABEL: "1001"}, "running", now)
    # an older cog's container (no owner): once it has exited
    assert abandoned({}, "exited", now) and not abandoned({}, "running", now)


async def test_an_unreachable_engine_is_named_as_the_operator_set_it(monkeypatch, tmp_path):
    """aiodocker calls every socket unix://localhost; the messages name the real one, for
    the builder and `cog infer` alike (a socket nobody listens on: a real fault)."""
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent.sock")
    said = "the Docker Engine at unix:///nonexistent.sock is not reachable: "
    builder = DockerBuilder.from_settings(BuilderSettings(registry="r:5000"))
    request = package_request(EXAMPLES / "hello", tmp_path / "p.zip", "r:5000")
    try:
        with pytest.raises(BuilderUnavailable) as caught:
            await collect(builder.build(request))
    finally:
        await builder.close()
    assert str(caught.value).startswith(said)
    with pytest.raises(InferenceError) as failed:
        await run_inference("r:5000/cog-test:nope", ["x"])
    assert str(failed.value).startswith(said)


async def test_a_connection_broken_while_saving_the_output_is_no_write_error(tmp_path):
    """aiohttp.ClientOSError is an OSError too: reading the model's answer fails, not
    writing the file, and the caller asks the container why (model.failure()). A fake
    response: a connection a real model drops mid-body surfaces as ClientPayloadError,
    so a ClientOSError from the body cannot be had on demand."""

    class Content:
        async def iter_chunked(self, size):
            yield b"half of it"
            raise aiohttp.ClientOSError(104, "Connection reset by peer")

    class Response:
        content_disposition = None
        content_type = "application/octet-stream"
        content = Content()

    with pytest.raises(aiohttp.ClientOSError):
        await _save(Response(), tmp_path / "output.bin")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []  # no half-written file, no temporary one


@pytest.mark.parametrize(
    ("version", "fails"),
    [("{}.{}".format(*sys.version_info[:2]), False), ("3.8", True), ("3.99", True)],
)
def test_the_python_check_passes_only_the_packages_python(version, fails):
    """The RUN line, run by this interpreter as the image's would run it: it passes only
    when its Python is the package's, and otherwise says so naming both, in cog's words
    (which CheckedBuilder makes the build's error)."""
    line = python_check(version, "site/python:x", "cpu")
    assert line.startswith("RUN python -c ")
    command = line.removeprefix("RUN ").replace("python", sys.executable, 1)
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True)
    assert (result.returncode != 0) is fails
    if fails:
        assert result.stderr == (
            f"cog: python_version is {version}, but the base image site/python:x runs Python "
            f"{sys.version.split()[0]}; give the server a base image with Python {version} "
            "(--base-image cpu=IMAGE)\n"
        )
    else:
        assert result.stderr == result.stdout == ""


def test_the_python_check_comes_first():
    """Before anything slow (apt-get, pip), so a wrong base image fails at once; on an
    NVIDIA image, after the package's Python is installed and on the PATH."""
    cpu = render(CASES["cpu-packages"][0], "cpu", files=CASES["cpu-packages"][3])
    assert cpu.splitlines()[3].startswith('RUN python -c \'import sys; sys.exit("%d.%d"')
    gpu = render(*CASES["gpu-image-torch"][:3])
    assert layer_index(gpu, "ENV PATH=/opt/cog/bin") < layer_index(gpu, "sys.version_info")
    assert layer_index(gpu, "sys.version_info") < layer_index(gpu, "torch==2.4.1")
    assert "(--base-image gpu=IMAGE)" in gpu


def test_a_model_that_imports_pydantic_without_listing_it_gets_it(tmp_path):
    """Cog's own packages used to bring pydantic: a model importing it keeps working."""
    from cog.builders.dockerfile import implicit_packages

    def package(files):
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.zip"
        with zipfile.ZipFile(path, "w") as archive:
            for name, text in files.items():
                archive.writestr(name, text)
        return path

    config = check_config("predict: predict.py:P\n", Files({"predict.py": "class P: pass\n"}))
    uses = package({"predict.py": "import os\nfrom pydantic import BaseModel\n"})
    assert implicit_packages(uses, config, None) == ["pydantic>=1.9,<3"]
    nested = package({"lib/types.py": "  import pydantic.v1 as p\n", "predict.py": "x = 1\n"})
    assert implicit_packages(nested, config, None) == ["pydantic>=1.9,<3"]
    assert implicit_packages(package({"predict.py": "# pydantic\n"}), config, None) == []
    assert implicit_packages(uses, config, "pydantic==1.10.13\n") == []  # its pin wins
    pinned = check_config(
        "predict: predict.py:P\nbuild:\n  python_packages: [Pydantic==2.5.0]\n",
        Files({"predict.py": "class P: pass\n"}),
    )
    assert implicit_packages(uses, pinned, None) == []


def test_two_models_pinning_one_framework_share_its_layer(tmp_path):
    """Two real packages of different models, both pinning tensorflow-cpu (one in
    python_packages, one in its requirements file, each with packages of its own): every
    line up to the framework's own layer is the same, so the second builds and pushes
    none of it again; each still installs all its packages after."""
    texts = []
    for name, yaml, requirements in (
        ("one", "  python_packages: ['tensorflow-cpu==2.20.0', 'pillow==11.3.0']\n", None),
        ("two", "  python_requirements: requirements.txt\n", "numpy<2.2\ntensorflow-cpu==2.20.0\n"),
    ):
        root = tmp_path / name
        root.mkdir()
        (root / "cog.yaml").write_text(
            f"name: {name}\nmodel: infer.py:Model\nenvironment:\n  python_version: '3.11'\n" + yaml
        )
        if requirements:
            (root / "requirements.txt").write_text(requirements)
        (root / "infer.py").write_text(MODEL + f"# {name}\n")
        texts.append(_real_dockerfile(root, tmp_path, "cpu"))
    one, two = texts
    layer = "RUN python -m pip install --no-cache-dir tensorflow-cpu==2.20.0"
    assert _before(one, layer) == _before(two, layer)
    assert layer in one.splitlines() and layer in two.splitlines()
    after_one = one.splitlines()[layer_index(one, layer) + 1 :]
    after_two = two.splitlines()[layer_index(two, layer) + 1 :]
    assert "python -m pip install --no-cache-dir tensorflow-cpu==2.20.0 pillow==11.3.0" in (
        "\n".join(after_one)
    )
    assert "-r /tmp/cog/requirements.txt" in "\n".join(after_two)


@pytest.mark.parametrize(
    ("packages", "requirements", "expected"),
    [
        (
            ["torch==2.1.0", "pillow==11.3.0"],
            "torchvision==0.16.0\n",
            ["torch==2.1.0", "torchvision==0.16.0"],
        ),
        (["Torch==2.1.0"], "torch==2.0.0\n", ["Torch==2.1.0"]),  # each framework once
        (["torch>=2"], None, []),  # not a pin: left where it is
        ([], "torch==2.1.0 ; python_version < '3.12'\n", []),  # a marker: left too
        # Options may point its pins at another index's builds: the file is left whole.
        ([], "--extra-index-url https://download.pytorch.org/whl/cpu\ntorch==2.1.0+cpu\n", []),
        (["jax[cpu]==0.4.30"], "", ["jax[cpu]==0.4.30"]),
    ],
)
def test_framework_pins(packages, requirements, expected):
    assert framework_pins(packages, requirements) == expected
