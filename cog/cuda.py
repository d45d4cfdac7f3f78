"""CUDA/cuDNN for GPU images: which pair goes with which torch and tensorflow release,
and the choice of the pair for a package.

The facts live in ``cog/data/compatibility.json``: TensorFlow was built and tested with one
pair per release; each torch release ships wheels for several CUDA versions (each with its
wheel suffix, e.g. ``cu110``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
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


# -- choosing the pair for a package ----------------------------------------------------


class NoCudaPair(Exception):
    """No CUDA/cuDNN pair fits what a package pins and asks for; the message says why."""

    def __init__(self, message: str, field: str = ""):
        #: the environment field at fault ("cuda", "cudnn"), or "" for the pins as a whole
        self.field = field
        super().__init__(message)


def choose_pair(pins: Mapping[str, str], cuda: str = "", cudnn: str = "") -> CudaPair:
    """The pair for a GPU image, from the pinned torch/tensorflow (requirement key ->
    version) and the cuda/cudnn the author asked for, if any; NoCudaPair if none fits.
    An explicit cudnn is kept as written."""
    candidates: list[CudaPair] | None = None
    reasons: list[str] = []
    tf_name = next((n for n in ("tensorflow", "tensorflow-gpu") if n in pins), None)
    if tf_name:
        pair = tensorflow_pair(pins[tf_name])
        if pair is None:
            raise NoCudaPair(
                f"{tf_name}=={pins[tf_name]} is not in cog's CUDA table "
                f"(known releases: {', '.join(known_tensorflow())})"
            )
        candidates = [pair]
        reasons.append(f"{tf_name}=={pins[tf_name]} needs {pair}")
    if "torch" in pins:
        torch = torch_pairs(pins["torch"])
        if not torch:
            raise NoCudaPair(
                f"torch=={pins['torch']} is not in cog's CUDA table "
                f"(known releases: {', '.join(known_torch())})"
            )
        reasons.append(f"torch=={pins['torch']} has wheels for {_pairs(torch)}")
        if candidates is None:
            candidates = torch
        else:
            # TensorFlow's pair, as precisely as it publishes it, if torch has wheels for it.
            candidates = [c for c in candidates if any(same_pair(p, c) for p in torch)]
            if not candidates:
                raise NoCudaPair(f"no CUDA fits both: {'; '.join(reasons)}")
    major = cudnn_major
    if candidates is None:
        chosen = _known_pair(cuda, cudnn)
    elif cuda:
        fitting = [
            p
            for p in candidates
            if p.cuda == cuda and (not cudnn or major(p.cudnn) == major(cudnn))
        ]
        if not fitting:
            asked = f"CUDA {cuda}" + (f" / cuDNN {cudnn}" if cudnn else "")
            raise NoCudaPair(f"{asked} does not fit: {'; '.join(reasons)}", "cuda")
        chosen = fitting[0]
    else:
        if cudnn:
            candidates = [p for p in candidates if major(p.cudnn) == major(cudnn)]
            if not candidates:
                raise NoCudaPair(f"cuDNN {cudnn} does not fit: {'; '.join(reasons)}", "cudnn")
        chosen = candidates[0]
    return CudaPair(chosen.cuda, cudnn or chosen.cudnn)


def _pairs(pairs: Sequence[CudaPair]) -> str:
    return ", ".join(str(p) for p in pairs)


def _known_pair(cuda: str, cudnn: str) -> CudaPair:
    """The pair for an explicit cuda and/or cudnn with no framework pinned: one that some
    table publishes (cudnn compared by major version), completed from the tables."""
    default = default_gpu()
    if not cuda and not cudnn:
        return default
    major = cudnn_major
    known = known_pairs()
    if cuda:
        with_cuda = [p for p in known if p.cuda == cuda]
        if not with_cuda:
            versions = sorted({p.cuda for p in known}, key=version_key)
            raise NoCudaPair(
                f"CUDA {cuda} is not in cog's CUDA table (known: {', '.join(versions)})", "cuda"
            )
        if cudnn:
            if not any(major(p.cudnn) == major(cudnn) for p in with_cuda):
                majors = sorted({major(p.cudnn) for p in with_cuda}, key=version_key)
                raise NoCudaPair(
                    f"CUDA {cuda} with cuDNN {cudnn} is not a known pair "
                    f"(CUDA {cuda} comes with cuDNN {' or '.join(majors)})",
                    "cudnn",
                )
            return CudaPair(cuda, cudnn)
        # The default's cuDNN if this CUDA comes with it, else the newest it comes with.
        if any(major(p.cudnn) == major(default.cudnn) for p in with_cuda):
            return CudaPair(cuda, default.cudnn)
        return max(with_cuda, key=lambda p: version_key(p.cudnn))
    with_cudnn = [p for p in known if major(p.cudnn) == major(cudnn)]
    if not with_cudnn:
        majors = sorted({major(p.cudnn) for p in known}, key=version_key)
        raise NoCudaPair(
            f"cuDNN {cudnn} is not in cog's CUDA table (known: cuDNN {', '.join(majors)})",
            "cudnn",
        )
    cudas = {p.cuda for p in with_cudnn}
    chosen = default.cuda if default.cuda in cudas else max(cudas, key=version_key)
    return CudaPair(chosen, cudnn)
