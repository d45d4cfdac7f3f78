"""The Dockerfile of a package, shared by every builder: a pure function of its inputs.

Layers go from what changes least to what changes most, so the cache does the work; GPU
images get CUDA from NVIDIA's pip wheels or from an NVIDIA base image. Layer order and GPU
strategies, for operators: docs/images.md.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cog
from cog import wheel_install
from cog.builders import BuildError, BuilderSettings, BuildRequest
from cog.builders.runtime import RUNTIME_REQUIREMENTS, runtime_wheel
from cog.config import Config
from cog.config_wire import config_to_json
from cog.cuda import (
    known_nvidia_cuda_images,
    nvidia_cuda_image_tag,
    tensorflow_gpu_package,
    torch_cuda_suffix,
    version_key,
)
from cog.openapi import openapi_document
from cog.requirements import (
    parse_pin,
    pinned,
    requirement_key,
    requirement_names,
    requirement_specs,
)
from cog.signature import Signature

WORKDIR = "/src"
#: The virtualenv the GPU ``image`` strategy installs the package's Python into
IMAGE_VENV = "/opt/cog"
#: PyTorch's index of CUDA wheels, one per CUDA suffix (.../whl/cu121)
PYTORCH_INDEX = "https://download.pytorch.org/whl/{suffix}"
#: The older flat page of every wheel; PyTorch stopped updating it around torch 2.4
PYTORCH_WHEELS = "https://download.pytorch.org/whl/torch_stable.html"
_LAST_ON_WHEELS_PAGE = (2, 3)
#: The first TensorFlow with the ``and-cuda`` extra (NVIDIA's wheels as dependencies)
TF_AND_CUDA = (2, 14)
LABEL_PREFIX = "org.cog-models"
#: Where the inference server's environment is: its own packages, not the model's
SERVER_ENV = wheel_install.SERVER_ENV
#: Where the model's cog (its API and worker) is: first on the image Python's path
MODEL_ENV = wheel_install.MODEL_ENV
#: The stage every stage starts from (the base image, the Python check, the server's
#: environment), and the one that unpacks cog's wheels into COG_FILES (a tree of /)
BASE_STAGE = "cog-base"
COG_STAGE = "cog-wheels"
COG_FILES = "/tmp/cog-files"
#: The server, in isolated mode (-I: no $PYTHONPATH, no user site; -S: no site-packages,
#: so nothing of the model's environment), with only its own environment on sys.path; it
#: starts the model's worker with this same Python in normal mode.
SERVER_COMMAND = [
    "python",
    "-I",
    "-S",
    "-c",
    f"import sys, runpy; sys.path.insert(0, {SERVER_ENV!r}); "
    "runpy.run_module('cog.runtime', run_name='__main__', alter_sys=True)",
]
#: What a model may import without listing it, because Cog's own dependencies brought it:
#: module -> the requirement installed for it (Cog 0.10 and later took pydantic 1 or 2).
IMPLICIT = {"pydantic": "pydantic>=1.9,<3"}
_TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}
#: Frameworks large enough that packages pinning the same one should share its layer
FRAMEWORKS = frozenset(
    {*_TORCH_FAMILY, "tensorflow", "tensorflow-cpu", "tensorflow-gpu", "jax", "jaxlib"}
)
_PIP = "python -m pip install --no-cache-dir"
#: Where pip keeps what it downloads and the wheels it builds, in a BuildKit cache mount
#: shared by every build on that BuildKit (see :class:`Installer`)
PIP_CACHE_DIR = "/var/cache/cog/pip"
#: Every NVIDIA library directory pip put in site-packages (nvidia/<library>/lib), for
#: the dynamic loader; none is fine (torch wheels that bundle their CUDA libraries).
_REGISTER_NVIDIA_LIBS = (
    'python -c "import glob, sysconfig; '
    "print('\\n'.join(sorted({d for k in ('purelib', 'platlib') "
    "for d in glob.glob(sysconfig.get_path(k) + '/nvidia/*/lib')})))\" "
    "> /etc/ld.so.conf.d/cog-nvidia.conf && ldconfig"
)


def base_image(config: Config, target: str, settings: BuilderSettings) -> str:
    env = config.environment
    template = settings.base_images["cpu"]
    if target == "gpu" and settings.gpu_strategy == "image":
        template = settings.base_images["gpu"]
    nvidia_tag = ""
    if "{nvidia_tag}" in template:
        nvidia_tag = nvidia_cuda_image_tag(env.cuda, env.cudnn) or ""
        if not nvidia_tag:
            known = ", ".join(str(pair) for pair in known_nvidia_cuda_images())
            raise BuildError(
                f"no NVIDIA CUDA image is known for CUDA {env.cuda} with cuDNN {env.cudnn} "
                f"(known: {known}); give the server a base image for it with "
                "--base-image gpu=IMAGE (placeholders {cuda}, {cudnn}, {cudnn_major}, "
                "{python_version})",
                step="Dockerfile",
            )
    # The templates were checked when the settings were made (BuilderSettings).
    return template.format(
        python_version=env.python_version,
        cuda=env.cuda,
        cudnn=env.cudnn,
        cudnn_major=env.cudnn.split(".")[0],
        nvidia_tag=nvidia_tag,
    )


def base_image_for(config: Config, target: str, settings: BuilderSettings) -> str:
    """What a package's base image is for, in messages: its Python, or (an NVIDIA image of
    the GPU ``image`` strategy, which gets the package's Python installed) its CUDA."""
    env = config.environment
    if target == "gpu" and settings.gpu_strategy == "image":
        return f"CUDA {env.cuda} (cuDNN {env.cudnn})"
    return f"Python {env.python_version}"


def missing_base_image(
    config: Config, target: str, settings: BuilderSettings, base: str, where: str, why: str
) -> str:
    """The message for a base image the builder cannot get, naming what it is for."""
    flag = "gpu" if target == "gpu" and settings.gpu_strategy == "image" else "cpu"
    return (
        f"no base image for {base_image_for(config, target, settings)}: {base} is not "
        f"{where} ({why}); build it (contrib/setup-machine.sh builds python:3.9-slim, "
        f"python:3.11-slim and python:3.13-slim) or give the server one with "
        f"--base-image {flag}=IMAGE"
    )


def python_check(python_version: str, base: str, flag: str) -> str:
    """The RUN line that fails the build, early, when the image would run another Python
    than the package's python_version (major.minor), saying ``cog: <why>`` (which the
    build's failure then says too: see cog.builders.CheckedBuilder). Its layer is cached
    with the base image, so it costs one container start per base image and Python."""
    message = (
        f"cog: python_version is {python_version}, but the base image {base} runs Python "
        f"%s; give the server a base image with Python {python_version} "
        f"(--base-image {flag}=IMAGE)"
    )
    code = (
        f'import sys; sys.exit("%d.%d" % sys.version_info[:2] != "{python_version}" '
        f'and "{message}" % sys.version.split()[0])'
    )
    return f"RUN python -c {shlex.quote(code)}"


def gpu_packages(
    packages: Sequence[str],
    cuda: str,
    *,
    strategy: str = "wheels",
    pins: Mapping[str, str] | None = None,
) -> tuple[list[str], list[str]]:
    """Requirement specs rewritten for a CUDA build; and the extra pip arguments needed.

    pins: every pin of the package (python_packages and the requirements file), as torch's
    pin decides the CUDA suffix of torchvision/torchaudio wherever those are pinned.
    An environment marker (``; python_version < "3.12"``) is kept as it is.
    """
    pins = dict(pins) if pins is not None else pinned(packages)
    suffix = torch_cuda_suffix(pins["torch"], cuda) if "torch" in pins else None
    rewritten: list[str] = []
    extra: list[str] = []
    for spec in packages:
        requirement, semicolon, marker = spec.partition(";")
        marker = f" ;{marker}" if semicolon else ""
        pin = parse_pin(requirement)
        if not pin:
            rewritten.append(spec)
            continue
        name, extras, version = pin
        key = requirement_key(name)
        if key in _TORCH_FAMILY and "+" not in version and suffix:
            if key == "torchaudio" and version_key(version) < (0, 8):
                # torchaudio before 0.8 had one wheel for every CUDA, without a suffix.
                rewritten.append(spec)
                continue
            rewritten.append(f"{name}{extras}=={version}+{suffix}{marker}")
            if not extra:
                extra += ["--extra-index-url", PYTORCH_INDEX.format(suffix=suffix)]
                if version_key(pins["torch"])[:2] <= _LAST_ON_WHEELS_PAGE:
                    extra += ["-f", PYTORCH_WHEELS]
            continue
        if key == "tensorflow":
            package = tensorflow_gpu_package(version)
            if strategy == "wheels" and version_key(version)[:2] >= TF_AND_CUDA:
                names = [e.strip() for e in extras.strip("[]").split(",") if e.strip()]
                extras = "[" + ",".join([*names, "and-cuda"]) + "]"
            rewritten.append(f"{package}{extras}=={version}{marker}")
            continue
        rewritten.append(spec)
    return rewritten, extra


#: NVIDIA publishes CUDA runtime wheels from 11.7 on (cu11: 11.7, 11.8; cu12: 12.x)
OLDEST_CUDA_WHEELS = (11, 7)
#: cuBLAS of CUDA 11.x has versions of its own; from CUDA 12 on they follow CUDA's.
_CUBLAS_CU11 = {"11.7": "11.10.*", "11.8": "11.11.*"}
#: What TensorFlow 2.x before the and-cuda extra loads, besides the CUDA runtime and cuDNN.
#: Their cu11 wheels exist only for CUDA 11.7 and 11.8, the latest being 11.8's (the CUDA
#: of those TensorFlow releases); from CUDA 12 on, CUPTI follows CUDA's version.
_TENSORFLOW_LIBRARIES = ("cufft", "curand", "cusolver", "cusparse", "cuda-cupti")


def cuda_wheels(cuda: str, cudnn: str, *, tensorflow: bool = False) -> list[str]:
    """NVIDIA's pip wheels of the CUDA libraries for `cuda` and `cudnn` ("8" or "8.9")."""
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
    cudnn_version = ".".join(cudnn.split(".")[:2])
    # cuDNN depends on cuBLAS without a version: pinned here, or pip takes the newest
    # (another CUDA release's, and hundreds of MB more).
    cublas = f"{minor}.*" if major != "11" else _CUBLAS_CU11.get(minor)
    wheels = [
        f"nvidia-cuda-runtime-cu{major}=={minor}.*",
        f"nvidia-cudnn-cu{major}=={cudnn_version}.*",
        f"nvidia-cublas-cu{major}" + (f"=={cublas}" if cublas else ""),
    ]
    if tensorflow:
        for library in _TENSORFLOW_LIBRARIES:
            pin = f"=={minor}.*" if library == "cuda-cupti" and major != "11" else ""
            wheels.append(f"nvidia-{library}-cu{major}{pin}")
    return wheels


def _framework_cuda_wheels(env, specs: Sequence[str], pins: Mapping[str, str]) -> list[str]:
    """The wheels strategy's explicit CUDA wheels: none when the framework brings them."""
    if "torch" in requirement_names(specs):
        return []  # torch's CUDA wheels depend on the nvidia-* wheels they need
    tf = pins.get("tensorflow") or pins.get("tensorflow-gpu")
    if tf and version_key(tf)[:2] >= TF_AND_CUDA:
        return []  # tensorflow[and-cuda]
    return cuda_wheels(env.cuda, env.cudnn, tensorflow=bool(tf))


def framework_pins(packages: Sequence[str], requirements: str | None) -> list[str]:
    """The exact pins of large frameworks (:data:`FRAMEWORKS`) in python_packages and the
    requirements file, each framework once, in order. Not from a requirements file with
    options (``--index-url``, ``-f``...): its pins may name another index's builds."""
    specs = list(packages)
    if requirements is not None:
        lines = requirements.removeprefix("\ufeff").splitlines()
        if not any(line.strip().startswith("-") for line in lines):
            specs += filter(None, requirement_specs(requirements))
    chosen: dict[str, str] = {}
    for spec in specs:
        pin = parse_pin(spec) if ";" not in spec else None  # a marker: left where it is
        if pin and requirement_key(pin[0]) in FRAMEWORKS:
            chosen.setdefault(requirement_key(pin[0]), spec)
    return list(chosen.values())


def _quote(words: Sequence[str]) -> str:
    """Words for a RUN line, which /bin/sh reads: `aiohttp>=3.9` must not redirect."""
    return " ".join(shlex.quote(word) for word in words)


class Installer:
    """How a RUN line installs packages from an index with pip.

    Without a cache (the Docker builder, or any cold build): nothing of pip's downloads is
    kept in the image. With ``cache`` (a BuildKit cache mount's ID), pip keeps its HTTP
    cache and the wheels it built in a mount that outlives the build, so a package whose
    dependencies another one downloaded already gets them from there. It changes how fast,
    never what: pip still asks the index for every requirement (it revalidates index
    pages), and a cached file is the one the same URL and hash would give.
    """

    def __init__(self, cache: str | None = None):
        self.cache = cache

    @property
    def run(self) -> str:
        """The RUN instruction, with its cache mount when there is one."""
        if self.cache is None:
            return "RUN"
        return f"RUN --mount=type=cache,id={self.cache},target={PIP_CACHE_DIR}"

    @property
    def pip(self) -> str:
        if self.cache is None:
            return _PIP
        return f"python -m pip install --cache-dir {PIP_CACHE_DIR}"

    def line(self, words: Sequence[str]) -> str:
        return f"{self.run} {self.pip} {_quote(words)}"


def cog_config(config: Config) -> dict[str, Any]:
    """The config as Cog writes it into ``run.cog.config``: today's cog.yaml as JSON."""
    env = config.environment
    build: dict[str, Any] = {
        "python_version": env.python_version,
        "gpu": "gpu" in env.architectures,
    }
    for key, value in (
        ("python_packages", list(env.python_packages)),
        ("python_requirements", env.python_requirements),
        ("system_packages", list(env.system_packages)),
        ("cuda", env.cuda),
        ("cudnn", env.cudnn),
        ("run", [{"command": command} for command in env.run]),
    ):
        if value:
            build[key] = value
    document: dict[str, Any] = {"build": build, "predict": config.model}
    if config.name:
        document["image"] = config.name
    if config.concurrency > 1:
        document["concurrency"] = {"max": config.concurrency}
    if config.variables:
        document["environment"] = list(config.variables)
    return document


def _variable(assignment: str) -> str:
    """NAME=value of cog.yaml's environment: as ENV writes it, quoted and $-escaped. A
    PYTHONPATH of the model's own comes after the model's cog."""
    name, _, value = assignment.partition("=")
    if name == "PYTHONPATH":
        value = f"{MODEL_ENV}:{value}" if value else MODEL_ENV
    return f"{name}={_label(value)}"


def _label(value: str) -> str:
    # Docker substitutes $VARS in LABEL values: escape them; JSON quoting does the rest.
    return json.dumps(value).replace("$", "\\$")


def _image_python(python_version: str) -> str:
    """The package's Python on a CUDA image, in a virtualenv (no pip of the distribution)."""
    python = f"python{python_version}"
    missing = (
        f"cog: this base image has no Python {python_version}, and its distribution does "
        f"not package {python}; set python_version to one it packages (Ubuntu 22.04: "
        "3.10, 3.11), build GPU images with --gpu-strategy wheels, or give the server a "
        f"base image with Python {python_version} (--base-image gpu=IMAGE)"
    )
    return (
        f"RUN if ! {python} -m venv {IMAGE_VENV} 2>/dev/null; then "
        "apt-get update -qq && "
        f"{{ apt-get install -y --no-install-recommends {python} {python}-venv "
        f"ca-certificates || {{ echo {shlex.quote(missing)}; exit 1; }}; }} && "
        f"rm -rf /var/lib/apt/lists/* && {python} -m venv --clear {IMAGE_VENV}; fi && "
        f"{IMAGE_VENV}/bin/python -c "
        f"\"import sys; print('Python', sys.version.split()[0], 'in {IMAGE_VENV}')\""
    )


def dockerfile_for(
    config: Config,
    target: str,
    settings: BuilderSettings,
    *,
    package_id: str,
    runtime_wheel: str,
    signature_json: str | None = None,
    requirements: str | None = None,
    implicit: Sequence[str] = (),
    pip_cache: str | None = None,
) -> str:
    """The Dockerfile text. runtime_wheel is the file name of the wheels in the context's
    cog/server/ and cog/model/ (see cog.builders.runtime).

    requirements: the text of the package's python_requirements file. GPU images need it
    to rewrite its torch/tensorflow pins (and to see which framework brings CUDA); without
    it the file is installed as written. Its framework pins get a layer of their own
    before it (see :func:`framework_pins`). implicit: packages the model uses without listing
    them, that Cog's own dependencies used to bring (see :func:`implicit_packages`).
    pip_cache: the ID of a BuildKit cache mount for pip's downloads (see :class:`Installer`);
    only for builders with BuildKit's Dockerfile frontend.
    """
    env = config.environment
    installer = Installer(pip_cache)
    gpu = target == "gpu"
    strategy = settings.gpu_strategy
    lines = [
        # Neither the package ID nor the cog version here: the lines before the model's
        # files are the same for every package of a model.
        f"# Generated by cog ({target} image)",
        f"FROM {base_image(config, target, settings)} AS {BASE_STAGE}",
        # PYTHONPATH: the image's Python finds the model's cog first, before any cog the
        # model's packages may bring (the inference server, in isolated mode, ignores it).
        "ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore"
        f" DEBIAN_FRONTEND=noninteractive PYTHONPATH={MODEL_ENV}",
    ]
    if gpu and strategy == "image":
        lines += [
            _image_python(env.python_version),
            # ${PATH:-...}: an imported base image may define no PATH at all.
            f"ENV PATH={IMAGE_VENV}/bin:${{PATH:-/usr/local/sbin:/usr/local/bin:"
            "/usr/sbin:/usr/bin:/sbin:/bin}",
        ]
    # The image never runs another Python than the one its labels name.
    flag = "gpu" if gpu and strategy == "image" else "cpu"
    lines.append(python_check(env.python_version, base_image(config, target, settings), flag))
    lines += [
        # Image settings early: the same for every package on this base image, so no
        # build, cold or not, spends a step on them.
        "EXPOSE 5000",
        f"CMD {json.dumps(SERVER_COMMAND)}",
        f"WORKDIR {WORKDIR}",
        # The inference server's environment, apart from the model's: the same layer for
        # every package on this base image.
        installer.line(["--target", SERVER_ENV, *RUNTIME_REQUIREMENTS]),
        # cog itself, in a stage of its own: the server's wheel (the whole cog package)
        # for its environment, the model's (its API and worker, pure Python) for
        # MODEL_ENV, unpacked and compiled by one Python start (cog.wheel_install, run
        # from the server's wheel). The stage depends on the base image and the cog
        # version alone: the model's packages below never wait for it, nor are rebuilt
        # when cog changes; one COPY takes its files in after them.
        f"FROM {BASE_STAGE} AS {COG_STAGE}",
        "COPY cog/ /tmp/cog/",
        f"RUN PYTHONPATH=/tmp/cog/server/{runtime_wheel} python -m cog.wheel_install"
        f" /tmp/cog/server/{runtime_wheel} /tmp/cog/model/{runtime_wheel} {COG_FILES}",
        f"FROM {BASE_STAGE}",
    ]
    if config.variables:
        lines.append("ENV " + " ".join(_variable(v) for v in config.variables))
    if env.system_packages:
        lines.append(
            "RUN apt-get update -qq && apt-get install -y --no-install-recommends "
            f"{_quote(sorted(env.system_packages))} && rm -rf /var/lib/apt/lists/*"
        )

    specs = [*env.python_packages]
    if requirements is not None:
        specs += filter(None, requirement_specs(requirements))
    pins = pinned(specs)
    wheels_gpu = gpu and strategy == "wheels"
    if wheels_gpu:
        wheels = _framework_cuda_wheels(env, specs, pins)
        if wheels:
            lines.append(installer.line(wheels))

    frameworks = framework_pins(env.python_packages, requirements)
    frameworks_of_packages = framework_pins(env.python_packages, None)
    if frameworks:
        # The frameworks first, in a layer of their own: packages pinning the same one
        # share it (built once, pushed once); the model's packages then find it installed.
        extra = []
        if gpu:
            frameworks, extra = gpu_packages(frameworks, env.cuda, strategy=strategy, pins=pins)
        lines.append(installer.line([*extra, *frameworks]))
    if env.python_requirements:
        rewrite = {"cuda": env.cuda, "strategy": strategy, "pins": pins} if gpu else None
        lines += _requirements_layers(env.python_requirements, requirements, rewrite, installer)
    # python_packages that are all frameworks were installed whole just now.
    if env.python_packages and set(env.python_packages) - set(frameworks_of_packages):
        packages, extra = list(env.python_packages), []
        if gpu:
            packages, extra = gpu_packages(packages, env.cuda, strategy=strategy, pins=pins)
        lines.append(installer.line([*extra, *packages]))
    if implicit:
        lines.append(installer.line(list(implicit)))
    if wheels_gpu:
        lines.append(f"RUN {_REGISTER_NVIDIA_LIBS}")
    if env.run:
        # Today's build.run commands run in /, as Cog's do.
        lines += ["WORKDIR /", *(f"RUN {command}" for command in env.run), f"WORKDIR {WORKDIR}"]
    lines += [
        f"COPY --from={COG_STAGE} {COG_FILES}/ /",
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
    # Cog's own labels, for the tools that read Cog's images.
    labels["run.cog.version"] = cog.__version__
    labels["run.cog.config"] = json.dumps(cog_config(config), separators=(",", ":"))
    if signature_json:
        document = openapi_document(Signature.from_json(json.loads(signature_json)))
        labels["run.cog.openapi_schema"] = json.dumps(document, separators=(",", ":"))
    lines.append(
        "LABEL " + " \\\n      ".join(f"{key}={_label(value)}" for key, value in labels.items())
    )
    return "\n".join(lines) + "\n"


def _requirements_layers(
    path: str, text: str | None, rewrite: dict | None, installer: Installer
) -> list[str]:
    """The requirements file's layers: copied and installed as written; or, on a GPU image
    (rewrite: gpu_packages' arguments) whose file pins torch/tensorflow, rewritten and
    written by the Dockerfile itself, so every builder gets it without a context change."""
    if rewrite is not None and text is not None:
        original = text.removeprefix("\ufeff").splitlines()
        specs = requirement_specs(text)  # one per line of original
        rewritten, extra = gpu_packages(specs, **rewrite)
        changes = [(old, new) for old, new in zip(specs, rewritten) if old != new]
        if changes:
            lines = [new if old != new else line for line, old, new in
                     zip(original, specs, rewritten)]  # fmt: skip
            summary = ", ".join(f"{old} -> {new}" for old, new in changes)
            return [
                f"# {path}, rewritten for CUDA {rewrite['cuda']}: {summary}",
                f"{installer.run} mkdir -p /tmp/cog && printf '%s\\n' "
                f"{_quote(lines)} > /tmp/cog/requirements.txt && "
                f"{installer.pip} {_quote([*extra, '-r', '/tmp/cog/requirements.txt'])}",
            ]
    return [
        # The JSON form: the path may hold spaces.
        "COPY " + json.dumps([f"package/{path}", "/tmp/cog/requirements.txt"]),
        installer.line(["-r", "/tmp/cog/requirements.txt"]),
    ]


def _read_requirements(request: BuildRequest) -> str | None:
    """The requirements file, from the package zip (small; read at once)."""
    path = request.config.environment.python_requirements
    if not path:
        return None
    try:
        with zipfile.ZipFile(request.package_zip) as archive:
            data = archive.read(posixpath.normpath(path))
    except (KeyError, OSError, zipfile.BadZipFile) as exc:
        raise BuildError(f"cannot read {path} from the package: {exc}", step="Dockerfile") from None
    try:
        return data.decode("utf-8-sig")  # as the package's config reads it
    except UnicodeDecodeError:
        raise BuildError(f"{path} is not UTF-8 text", step="Dockerfile") from None


_IMPORT = re.compile(rb"^\s*(?:import|from)\s+([A-Za-z_][A-Za-z0-9_]*)", re.MULTILINE)
#: A Python file of the package larger than this is not searched for imports.
_SCANNED = 4 * 1024 * 1024


def implicit_packages(package_zip: Path, config: Config, requirements: str | None) -> list[str]:
    """What the model imports without listing it, that Cog's own dependencies brought
    (pydantic): installed for it, as Cog's installation did. A listed pin wins."""
    listed = requirement_names([*config.environment.python_packages])
    if requirements is not None:
        listed |= requirement_names(list(filter(None, requirement_specs(requirements))))
    wanted = {m: r for m, r in IMPLICIT.items() if requirement_key(m) not in listed}
    if not wanted:
        return []
    found: set[str] = set()
    try:
        with zipfile.ZipFile(package_zip) as archive:
            for info in archive.infolist():
                if info.filename.endswith(".py") and info.file_size <= _SCANNED:
                    imports = set(_IMPORT.findall(archive.read(info)))
                    found |= {m for m in wanted if m.encode() in imports}
    except (OSError, zipfile.BadZipFile) as exc:
        raise BuildError(f"cannot read the package: {exc}", step="Dockerfile") from None
    return [wanted[m] for m in sorted(found)]


def _requirements_text(request: BuildRequest) -> str | None:
    path = request.config.environment.python_requirements
    if not path:
        return None
    try:
        with zipfile.ZipFile(request.package_zip) as archive:
            return archive.read(posixpath.normpath(path)).decode("utf-8-sig", "replace")
    except (KeyError, OSError, zipfile.BadZipFile):
        return None


def dockerfile_for_request(
    request: BuildRequest, settings: BuilderSettings, *, pip_cache: str | None = None
) -> str:
    """The Dockerfile of one build request, the same for every builder (pip_cache: see
    :func:`dockerfile_for`; never for a build without the cache)."""
    return dockerfile_for(
        request.config,
        request.target,
        settings,
        package_id=request.package_id,
        runtime_wheel=runtime_wheel()[0],
        signature_json=request.signature_json,
        requirements=_read_requirements(request),
        implicit=implicit_packages(
            request.package_zip, request.config, _requirements_text(request)
        ),
        pip_cache=None if request.no_cache else pip_cache,
    )
