"""Which CUDA/cuDNN pair goes with which torch and tensorflow release.

The facts live in ``cog/data/compatibility.json``: TensorFlow was built and tested with one
pair per release; each torch release ships wheels for several CUDA versions (each with its
wheel suffix, e.g. ``cu110``).
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import attrs


@attrs.frozen(order=True)
class CudaPair:
    cuda: str
    cudnn: str

    def __str__(self) -> str:
        return f"CUDA {self.cuda} / cuDNN {self.cudnn}"


@functools.lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads(resources.files("cog").joinpath("data/compatibility.json").read_text())


def _release(version: str) -> str:
    """'1.7.1' -> '1.7'; '2.15.0rc1' -> '2.15'."""
    parts = version.split("+")[0].split(".")
    minor = "".join(ch for ch in (parts[1] if len(parts) > 1 else "0") if ch.isdigit())
    return f"{parts[0]}.{minor or '0'}"


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


def default_gpu() -> CudaPair:
    return CudaPair(**_table()["default_gpu"])


def tensorflow_pair(version: str) -> CudaPair | None:
    entry = _table()["tensorflow"].get(_release(version))
    return CudaPair(**entry) if entry else None


def torch_pairs(version: str) -> list[CudaPair]:
    """Every pair torch `version` has wheels for, newest CUDA first."""
    entries = _table()["torch"].get(_release(version), [])
    pairs = [CudaPair(cuda=e["cuda"], cudnn=e["cudnn"]) for e in entries]
    return sorted(pairs, key=lambda p: version_key(p.cuda), reverse=True)


def torch_cuda_suffix(torch_version: str, cuda: str) -> str | None:
    """The wheel suffix (cu110) of torch `torch_version` built for `cuda`, if published."""
    for entry in _table()["torch"].get(_release(torch_version), []):
        if entry["cuda"] == cuda:
            return entry["suffix"]
    return None


def tensorflow_gpu_package(version: str) -> str:
    """TF 1.x shipped GPU support as a separate distribution; 2.x includes it."""
    return "tensorflow_gpu" if version.split(".")[0] == "1" else "tensorflow"


def nvidia_cuda_image_tag(cuda: str, cudnn: str) -> str | None:
    """The nvidia/cuda tag (runtime, with cuDNN) for this pair, if NVIDIA publishes one."""
    return _table()["nvidia_cuda_images"].get(f"{cuda}/{cudnn_major(cudnn)}")


def known_nvidia_cuda_images() -> list[CudaPair]:
    pairs = (key.split("/") for key in _table()["nvidia_cuda_images"])
    return sorted((CudaPair(cuda, cudnn) for cuda, cudnn in pairs), key=_pair_key)


def _pair_key(pair: CudaPair) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return version_key(pair.cuda), version_key(pair.cudnn)


def torchvision_for(torch_version: str) -> str | None:
    return _table()["torchvision"].get(_release(torch_version))


def cudnn_major(cudnn: str) -> str:
    """'8.1' -> '8'. cuDNN keeps its ABI within a major version."""
    return cudnn.split(".")[0]


def same_pair(a: CudaPair, b: CudaPair) -> bool:
    """The same CUDA with the same cuDNN major (8.1 and 8 are the same pair)."""
    return a.cuda == b.cuda and cudnn_major(a.cudnn) == cudnn_major(b.cudnn)


def known_pairs() -> list[CudaPair]:
    """Every pair some table publishes (a framework release, or an NVIDIA image), once
    each, with the cuDNN as precisely as it is published; sorted."""
    pairs = {tensorflow_pair(release) for release in known_tensorflow()}
    pairs |= {pair for release in known_torch() for pair in torch_pairs(release)}
    pairs |= set(known_nvidia_cuda_images())
    return sorted(pairs, key=_pair_key)


def known_tensorflow() -> list[str]:
    return sorted(_table()["tensorflow"], key=version_key)


def known_torch() -> list[str]:
    return sorted(_table()["torch"], key=version_key)
