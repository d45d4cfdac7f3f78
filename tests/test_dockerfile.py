"""Dockerfile generation: golden files, layer order, GPU rewrites, the context tar.

Golden files live in tests/golden/; after an intended change, regenerate them with
    COG_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_dockerfile.py
and review the diff.
"""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
from pathlib import Path

import pytest

import cog
from cog.builders import DEFAULT_BASE_IMAGES, BuildError, BuilderSettings
from cog.builders.context import build_context
from cog.builders.dockerfile import dockerfile_for, gpu_packages
from cog.builders.runtime import runtime_wheel
from cog.config import check_config
from cog.container import TARGET_LABEL, device_requests
from tests.registry_helpers import raw_zip

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


def render(yaml: str, target: str, strategy: str = "wheels", files=None, base=None) -> str:
    files = {"infer.py": MODEL, **(files or {})}
    config = check_config(yaml, Files(files))
    bases = {**DEFAULT_BASE_IMAGES, **({"gpu": base} if base else {})}
    settings = BuilderSettings(registry="r:5000", gpu_strategy=strategy, base_images=bases)
    text = dockerfile_for(
        config, target, settings, package_id=PACKAGE_ID, runtime_wheel=WHEEL,
        signature_json='{"arguments": {}}',
    )  # fmt: skip
    # The cog version is stamped in; keep the golden files version-independent.
    return text.replace(cog.__version__, "VERSION")


CASES = {
    "cpu-minimal": ("model: infer.py:Model\n", "cpu", "wheels", {}),
    "cpu-packages": (
        "model: infer.py:Model\nenvironment:\n  python_requirements: requirements.txt\n"
        "  python_packages: ['pillow==11.3.0', 'numpy==2.1.0']\n"
        "  system_packages: [ffmpeg, libsndfile1]\n",
        "cpu",
        "wheels",
        {"requirements.txt": "requests==2.32.3\n"},
    ),
    "gpu-wheels-torch": (
        "model: infer.py:Model\nenvironment:\n  architectures: [cpu, gpu]\n"
        "  python_packages: ['torch==2.1.0', 'torchvision==0.16.0', 'pillow==11.3.0']\n",
        "gpu",
        "wheels",
        {},
    ),
    "gpu-image-torch": (
        "model: infer.py:Model\nenvironment:\n  architectures: [gpu]\n"
        "  python_packages: ['torch==2.4.1', 'torchvision==0.19.1']\n",
        "gpu",
        "image",
        {},
    ),
    "gpu-image-tf1": (
        "model: infer.py:Model\nenvironment:\n  architectures: [gpu]\n"
        "  python_packages: ['tensorflow==1.15.0']\n",
        "gpu",
        "image",
        {},
        # CUDA 10.0: NVIDIA no longer publishes it; a site's own base image
        "site.local/cuda:{cuda}-cudnn{cudnn}-runtime",
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


def layer_index(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines()) if needle in line)


def test_layer_order_puts_what_changes_most_last():
    text = render(*CASES["cpu-packages"][:3], files=CASES["cpu-packages"][3])
    order = [
        layer_index(text, "FROM "),
        layer_index(text, "apt-get install"),
        layer_index(text, 'COPY ["package/requirements.txt"'),
        layer_index(text, "-r /tmp/cog/requirements.txt"),
        layer_index(text, "pillow==11.3.0"),
        layer_index(text, "aiohttp"),
        layer_index(text, f"COPY cog/{WHEEL}"),
        layer_index(text, "COPY package/ /src/"),
        layer_index(text, "LABEL"),
    ]
    assert order == sorted(order)


def test_model_code_does_not_reach_the_dependency_layers():
    """Only the package id and model files differ between two packages of a model: every
    line before the final COPY must be identical, so those layers stay cached."""
    yaml = CASES["cpu-packages"][0]
    a = render(yaml, "cpu", files={"requirements.txt": "requests==2.32.3\n"})
    b = render(yaml, "cpu", files={"requirements.txt": "requests==2.32.3\n"}).replace(
        PACKAGE_ID, "e" * 64
    )
    cut = layer_index(a, "COPY package/ /src/")
    assert a.splitlines()[1:cut] == b.splitlines()[1:cut]


def test_default_bases_and_templates():
    assert render("model: infer.py:Model\n", "cpu").splitlines()[1] == "FROM python:3.11-slim"
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
    with pytest.raises(BuildError, match=r"CUDA 11.0.*--gpu-strategy image") as caught:
        render(OLD_TORCH, "gpu", "wheels")
    assert caught.value.step == "Dockerfile"


def test_image_strategy_needs_a_base_for_a_cuda_nvidia_no_longer_publishes():
    with pytest.raises(
        BuildError, match=r"no NVIDIA CUDA image .* CUDA 11.0 with cuDNN 8"
    ) as caught:
        render(OLD_TORCH, "gpu", "image")
    assert "--base-image gpu=" in str(caught.value) and "CUDA 12.1 / cuDNN 8" in str(caught.value)
    text = render(OLD_TORCH, "gpu", "image", base="site.local/cuda:{cuda}-cudnn{cudnn}")
    assert text.splitlines()[1] == "FROM site.local/cuda:11.0-cudnn8"
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
    assert "cog/server/__main__.py" in names and "cog/model.py" in names
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
        f"cog/{runtime_wheel()[0]}",
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
