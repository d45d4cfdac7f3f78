"""The two formats of cog.yaml, and how today's is read into the one config model.

- **2021** (``model:``, ``name:``, ``environment:`` as a mapping, ``examples:``): the
  original Cog's, read by :mod:`cog.config` as it is.
- **today's Cog** (``build:``, ``predict:`` or ``run:``, ``image:``, ``concurrency:``,
  ``environment:`` as a list of ``NAME=value``, ``train:``): :func:`translate` renames its
  keys onto the 2021 document's (``build`` -> ``environment``, ``predict`` -> ``model``,
  ``image`` -> ``name``, ``gpu: true`` -> ``architectures: [cpu, gpu]``), so both are
  checked by the same rules and travel as the same wire JSON; :func:`original_path` gives
  the messages their paths in the file as the author wrote it. Keys that newer Cog
  releases added are warnings, not errors: the image is built without them.

A file that mixes the formats is refused with a message saying which keys belong where.
"""

from __future__ import annotations

import re
from typing import Any

#: The format of a config: the key that names the model's class.
MODEL_FORMAT = "model"
PREDICT_FORMAT = "predict"
#: The Python of a today's-format package whose build: names none: Cog's default when it
#: stopped guessing (it requires python_version since 2026). 2021's is cog.config's.
PREDICT_DEFAULT_PYTHON = "3.13"
_MODEL_KEYS = ("model", "name", "examples")
_PREDICT_KEYS = ("build", "predict", "run", "image", "concurrency", "train")
_BUILD_KEYS = {
    "python_version": "python_version",
    "python_packages": "python_packages",
    "python_requirements": "python_requirements",
    "system_packages": "system_packages",
    "cuda": "cuda",
    "cudnn": "cudnn",
    "run": "run",
}
#: today's key -> the 2021 document's, for messages
_RENAMED = (
    ("environment.", "build."),
    ("model", "predict"),
    ("name", "image"),
    ("variables", "environment"),
)
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def yaml_type(value: Any) -> str:
    return {
        type(None): "nothing (null)",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def detect_format(doc: dict[str, Any]) -> tuple[str, list[str]]:
    """The document's format, and the problems of one that mixes both."""
    old = [k for k in _MODEL_KEYS if k in doc]
    new = [k for k in _PREDICT_KEYS if k in doc]
    if old and new:
        return MODEL_FORMAT, [
            f"cog.yaml mixes two formats: {', '.join(old)} of the 2021 format (model:, "
            f"environment: {{...}}, examples:) and {', '.join(new)} of today's Cog (build:, "
            "predict:, environment: [NAME=value]); use one of them"
        ]
    if new or (not old and isinstance(doc.get("environment"), list)):
        return PREDICT_FORMAT, []
    # environment: is a mapping in one format and a list in the other: with the keys of
    # one format, a wrong one is that format's error, not a mix.
    return MODEL_FORMAT, []


def translate(doc: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    """Today's cog.yaml as the 2021-shaped document the config schema reads; and its
    problems and warnings (unknown keys)."""
    problems: list[str] = []
    warnings: list[str] = []
    out: dict[str, Any] = {"format": PREDICT_FORMAT}
    predict, run = doc.get("predict"), doc.get("run")
    if predict is not None and run is not None:
        problems.append("predict and run: give one of them (run is predict's newer name)")
    reference = run if predict is None else predict
    if reference is not None:
        out["model"] = reference  # none: the schema says "predict: is required"
    if "image" in doc:
        out["name"] = doc["image"]
    build = doc.get("build")
    environment: dict[str, Any] = {}
    if build is None:
        pass
    elif not isinstance(build, dict):
        problems.append(f"build: expected a mapping, got {yaml_type(build)}")
    else:
        for key, value in build.items():
            if key == "gpu":
                if not isinstance(value, bool):
                    problems.append(f"build.gpu: expected true or false, got {yaml_type(value)}")
                elif value:
                    environment["architectures"] = ["cpu", "gpu"]
            elif key == "python_version" and isinstance(value, str):
                # Cog takes a patch version too ("3.11.4"); the image is the minor's.
                match = re.fullmatch(r"(3\.\d+)\.\d+", value)
                environment[key] = match.group(1) if match else value
            elif key == "run":
                environment["run"] = _run_commands(value, problems)
            elif key in _BUILD_KEYS:
                environment[_BUILD_KEYS[key]] = value
            else:
                warnings.append(f"build.{key}: not supported by this cog server; ignored")
    environment.setdefault("python_version", PREDICT_DEFAULT_PYTHON)
    out["environment"] = environment
    concurrency = doc.get("concurrency")
    if concurrency is not None:
        maximum = concurrency.get("max") if isinstance(concurrency, dict) else None
        if not isinstance(maximum, int) or isinstance(maximum, bool) or maximum < 1:
            problems.append("concurrency: expected {max: N}, N a whole number of 1 or more")
        else:
            out["concurrency"] = maximum
            for key in set(concurrency) - {"max"}:
                warnings.append(f"concurrency.{key}: not supported by this cog server; ignored")
    variables = doc.get("environment")
    if variables is not None:
        out["variables"] = _variables(variables, problems)
    if "train" in doc:
        warnings.append("train: training (/trainings) is not supported yet; ignored")
    for key in doc:
        if key not in (*_PREDICT_KEYS, "environment"):
            warnings.append(f"{key}: not supported by this cog server; ignored")
    return out, problems, warnings


def _run_commands(value: Any, problems: list[str]) -> list[str]:
    if not isinstance(value, list):
        problems.append(f"build.run: expected a list of commands, got {yaml_type(value)}")
        return []
    commands = []
    for i, item in enumerate(value):
        if isinstance(item, dict):
            if item.get("mounts"):
                problems.append(
                    f"build.run[{i}].mounts: secret mounts are not supported by this cog server"
                )
            item = item.get("command")
        if not isinstance(item, str) or not item.strip():
            problems.append(f"build.run[{i}]: expected a command, got {yaml_type(item)}")
            continue
        commands.append(item)
    return commands


def _variables(value: Any, problems: list[str]) -> list[str]:
    if not isinstance(value, list):
        problems.append(f"environment: expected a list of NAME=value, got {yaml_type(value)}")
        return []
    seen: set[str] = set()
    variables = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not _VARIABLE.match(item):
            problems.append(f"environment[{i}]: {item!r} is not NAME=value")
            continue
        name = item.partition("=")[0]
        if name in seen:
            problems.append(f"environment[{i}]: {name} is set twice")
        seen.add(name)
        variables.append(item)
    return variables


def original_path(path: str, fmt: str) -> str:
    """A field path of the 2021-shaped document as the author's file spells it."""
    if fmt != PREDICT_FORMAT:
        return path
    if path.startswith("environment.architectures"):
        return "build.gpu"
    for old, new in _RENAMED:
        if path.startswith(old) and (old.endswith(".") or path[len(old) :][:1] in ("", "[", ".")):
            return new + path[len(old) :]
    return path
