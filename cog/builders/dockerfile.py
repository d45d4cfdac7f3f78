"""The Dockerfile of a package, shared by every builder: a pure function of its inputs.

Layers go from what changes least to what changes most, so the cache does the work:

1. the base image (``--base-image`` templates; sites without Docker Hub point them at
   local images),
2. system packages (apt),
3. for GPU images built with the ``wheels`` strategy: the CUDA runtime and cuDNN from
   NVIDIA's pip wheels, registered with the dynamic loader,
4. ``python_requirements`` (only that file is copied first), then ``python_packages``,
5. the cog runtime (a wheel of the installing cog, :mod:`cog.builders.runtime`), so a new
   cog version never reinstalls the model's dependencies,
6. the model's code and weights,
7. labels (package ID, config, input signature, cog version) and the command.

Build context layout (:mod:`cog.builders.context`)::

    Dockerfile
    cog/<runtime wheel>
    package/...        the package's files, exactly as in its zip

GPU strategies (``BuilderSettings.gpu_strategy``):

- ``wheels`` (default): the CPU base image plus ``nvidia-cuda-runtime-cuNN`` and
  ``nvidia-cudnn-cuNN`` from PyPI. It needs no CUDA base image, so it works where only
  PyPI is reachable (as on the machines cog is developed on), and the CPU and GPU images
  share their base layers.
- ``image``: an NVIDIA CUDA/cuDNN runtime base image, the way the original Cog built GPU
  images: by default ``nvidia/cuda:{nvidia_tag}``, NVIDIA's published tag for the pair
  (e.g. ``12.1.1-cudnn8-runtime-ubuntu22.04``); a pair NVIDIA has no image for needs an
  operator's ``--base-image gpu=...``.

On GPU images, pinned ``torch``/``torchvision``/``torchaudio`` become the wheel built for
the chosen CUDA (``torch==1.7.1`` -> ``torch==1.7.1+cu110`` from PyTorch's per-CUDA index,
and for torch 2.3 and older also its flat torch_stable.html page)
and TensorFlow 1.x becomes ``tensorflow_gpu``. Pins inside a requirements file are
installed as written.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Sequence

import cog
from cog.builders import BuildError, BuilderSettings, BuildRequest
from cog.builders.runtime import RUNTIME_REQUIREMENTS, runtime_wheel
from cog.config import Config, config_to_json

WORKDIR = "/src"
#: PyTorch's index of CUDA wheels, one per CUDA suffix (.../whl/cu121)
PYTORCH_INDEX = "https://download.pytorch.org/whl/{suffix}"
#: The older flat page of every wheel; PyTorch stopped updating it around torch 2.4
PYTORCH_WHEELS = "https://download.pytorch.org/whl/torch_stable.html"
_LAST_ON_WHEELS_PAGE = (2, 3)
LABEL_PREFIX = "org.cog-models"
_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s;]+)\s*$")
_TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}


def base_image(config: Config, target: str, settings: BuilderSettings) -> str:
    env = config.environment
    template = settings.base_images["cpu"]
    if target == "gpu" and settings.gpu_strategy == "image":
        template = settings.base_images["gpu"]
    nvidia_tag = ""
    if "{nvidia_tag}" in template:
        from cog import compat

        nvidia_tag = compat.nvidia_cuda_image_tag(env.cuda, env.cudnn) or ""
        if not nvidia_tag:
            known = ", ".join(str(pair) for pair in compat.known_nvidia_cuda_images())
            raise BuildError(
                f"no NVIDIA CUDA image is known for CUDA {env.cuda} with cuDNN {env.cudnn} "
                f"(known: {known}); give the server a base image for it with "
                "--base-image gpu=IMAGE (placeholders {cuda}, {cudnn}, {python_version})",
                step="Dockerfile",
            )
    return template.format(
        python_version=env.python_version, cuda=env.cuda, cudnn=env.cudnn, nvidia_tag=nvidia_tag
    )


def gpu_packages(packages: Sequence[str], cuda: str) -> tuple[list[str], list[str]]:
    """python_packages rewritten for a CUDA build; and the extra pip arguments needed."""
    from cog import compat

    pins = {
        m.group(1).lower().replace("_", "-"): m.group(3) for m in map(_PIN.match, packages) if m
    }
    # torchvision/torchaudio wheels for a CUDA carry the same suffix as their torch's.
    suffix = compat.torch_cuda_suffix(pins["torch"], cuda) if "torch" in pins else None
    rewritten: list[str] = []
    extra: list[str] = []
    for spec in packages:
        match = _PIN.match(spec)
        if not match:
            rewritten.append(spec)
            continue
        name, extras, version = match.group(1), match.group(2) or "", match.group(3)
        key = name.lower().replace("_", "-")
        if key in _TORCH_FAMILY and "+" not in version and suffix:
            if key == "torchaudio" and compat.version_key(version) < (0, 8):
                # torchaudio before 0.8 had one wheel for every CUDA, without a suffix.
                rewritten.append(spec)
                continue
            rewritten.append(f"{name}{extras}=={version}+{suffix}")
            if not extra:
                extra += ["--extra-index-url", PYTORCH_INDEX.format(suffix=suffix)]
                if compat.version_key(pins["torch"])[:2] <= _LAST_ON_WHEELS_PAGE:
                    extra += ["-f", PYTORCH_WHEELS]
            continue
        if key == "tensorflow":
            rewritten.append(f"{compat.tensorflow_gpu_package(version)}{extras}=={version}")
            continue
        rewritten.append(spec)
    return rewritten, extra


#: NVIDIA publishes CUDA runtime wheels from 11.7 on (cu11: 11.7, 11.8; cu12: 12.x)
OLDEST_CUDA_WHEELS = (11, 7)


def _cuda_wheels(cuda: str, cudnn: str) -> list[str]:
    version = tuple(int(p) for p in cuda.split(".")[:2])
    if version < OLDEST_CUDA_WHEELS:
        raise BuildError(
            f"this package needs CUDA {cuda}, and NVIDIA publishes pip wheels only for CUDA "
            "11.7 and newer; run the server with --gpu-strategy image and a CUDA "
            f"{cuda} base image (--base-image gpu=IMAGE) for it",
            step="Dockerfile",
        )
    major = cuda.split(".")[0]
    minor = ".".join(cuda.split(".")[:2])
    return [
        f"nvidia-cuda-runtime-cu{major}=={minor}.*",
        f"nvidia-cudnn-cu{major}=={cudnn.split('.')[0]}.*",
    ]


def _quote(words: Sequence[str]) -> str:
    """Words for a RUN line, which /bin/sh reads: `aiohttp>=3.9` must not redirect."""
    return " ".join(shlex.quote(word) for word in words)


def _label(value: str) -> str:
    # Docker substitutes $VARS in LABEL values: escape them; JSON quoting does the rest.
    return json.dumps(value).replace("$", "\\$")


def dockerfile_for(
    config: Config,
    target: str,
    settings: BuilderSettings,
    *,
    package_id: str,
    runtime_wheel: str,
    signature_json: str | None = None,
) -> str:
    """The Dockerfile text. runtime_wheel is the wheel's file name in the context's cog/."""
    env = config.environment
    pip = "python -m pip install --no-cache-dir"
    lines = [
        f"# Generated by cog {cog.__version__} for package {package_id} ({target})",
        f"FROM {base_image(config, target, settings)}",
        "ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore"
        " DEBIAN_FRONTEND=noninteractive",
    ]
    if env.system_packages:
        lines.append(
            "RUN apt-get update -qq && apt-get install -y --no-install-recommends "
            f"{_quote(sorted(env.system_packages))} && rm -rf /var/lib/apt/lists/*"
        )
    if target == "gpu" and settings.gpu_strategy == "image":
        # NVIDIA's CUDA runtime images carry no Python: the distribution's is installed
        # (Ubuntu 22.04: 3.10), so python_version is only honoured by the CPU base.
        lines.append(
            "RUN apt-get update -qq && apt-get install -y --no-install-recommends python3 "
            "python3-pip python3-venv ca-certificates && rm -rf /var/lib/apt/lists/* "
            "&& ln -sf python3 /usr/bin/python && "
            "rm -f /usr/lib/python3*/EXTERNALLY-MANAGED"
        )
    if target == "gpu" and settings.gpu_strategy == "wheels":
        lines += [
            f"RUN {pip} {_quote(_cuda_wheels(env.cuda, env.cudnn))} && "
            'python -c "import glob, os, nvidia; '
            "print('\\n'.join(sorted(d for p in nvidia.__path__ "
            "for d in glob.glob(os.path.join(p, '*', 'lib')))))\" "
            "> /etc/ld.so.conf.d/cog-nvidia.conf && ldconfig",
        ]
    if env.python_requirements:
        lines += [
            # The JSON form: the path may hold spaces.
            "COPY "
            + json.dumps([f"package/{env.python_requirements}", "/tmp/cog/requirements.txt"]),
            f"RUN {pip} -r /tmp/cog/requirements.txt",
        ]
    if env.python_packages:
        packages, extra = list(env.python_packages), []
        if target == "gpu":
            packages, extra = gpu_packages(packages, env.cuda)
        lines.append(f"RUN {pip} {_quote([*extra, *packages])}")
    lines += [
        # The runtime's dependencies in a layer of their own: a new cog wheel reuses it.
        f"RUN {pip} {_quote(RUNTIME_REQUIREMENTS)}",
        f"COPY cog/{runtime_wheel} /tmp/cog/",
        f"RUN {pip} --no-deps /tmp/cog/{runtime_wheel} && rm -rf /tmp/cog",
        # Image settings before the model's files, so a code change reuses them too.
        f"WORKDIR {WORKDIR}",
        "EXPOSE 5000",
        'CMD ["python", "-m", "cog.server"]',
        f"COPY package/ {WORKDIR}/",
    ]
    labels = {
        f"{LABEL_PREFIX}.package-id": package_id,
        f"{LABEL_PREFIX}.target": target,
        f"{LABEL_PREFIX}.config": json.dumps(config_to_json(config), separators=(",", ":")),
        f"{LABEL_PREFIX}.cog-version": cog.__version__,
    }
    if signature_json:
        labels[f"{LABEL_PREFIX}.signature"] = signature_json
    lines.append(
        "LABEL " + " \\\n      ".join(f"{key}={_label(value)}" for key, value in labels.items())
    )
    return "\n".join(lines) + "\n"


def dockerfile_for_request(request: BuildRequest, settings: BuilderSettings) -> str:
    """The Dockerfile of one build request, the same for every builder."""
    return dockerfile_for(
        request.config,
        request.target,
        settings,
        package_id=request.package_id,
        runtime_wheel=runtime_wheel()[0],
        signature_json=request.signature_json,
    )
