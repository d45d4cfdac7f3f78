"""cog.yaml: the schema, and the three pure steps load -> validate -> complete.

Both formats of cog.yaml, the 2021 one and today's Cog's (``build:``, ``predict:``), are
read into this one config model (:mod:`cog.config_formats`), checked by the same rules
and sent as the same wire JSON.

- :func:`load_config` parses YAML (once its size, nesting and number of values are
  within the bounds of :mod:`cog.config_bounds`) and structures it into frozen attrs
  classes; syntax errors carry line and column, schema errors (unknown keys, wrong types, missing
  ``model``) carry their field path, all reported at once.
- :func:`validate_config` checks the config against the package's files and lists every
  problem (unpinned packages, missing files, unknown architectures, ...).
- :func:`complete_config` fills in what the author left out, notably the CUDA/cuDNN pair
  for GPU images from the pinned torch/tensorflow (see :mod:`cog.cuda`).

:mod:`cog.config_wire` is its wire format, the original Cog's Go-style document.
"""

from __future__ import annotations

import ast
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import cattrs
import yaml

from cog.config_bounds import (
    MAX_EXAMPLES,
    MAX_MODEL_SOURCE,
    MAX_NAME,
    YAML_LOADER,
    dockerfile_problem,
    plain_path_problem,
    shape_problems,
)
from cog.config_formats import (
    MODEL_FORMAT,
    PREDICT_DEFAULT_PYTHON,
    PREDICT_FORMAT,
    detect_format,
    original_path,
    translate,
    yaml_type,
)
from cog.cuda import NoCudaPair, choose_pair
from cog.requirements import pinned, requirement_specs
from cog.units import format_size

ARCHITECTURES = ("cpu", "gpu")
#: The Python of a package whose cog.yaml names none: Cog 2021's default, so that the
#: models written for it build unchanged (the build log says when it is used).
DEFAULT_PYTHON_VERSION = "3.8"
#: The oldest Python the in-image runtime runs on (cog.builders.runtime declares it too).
RUNTIME_MIN_PYTHON = (3, 8)
#: The newest CPython release (3.15.0: October 2026); a python_version past it is refused.
#: Raise it when CPython releases the next one.
NEWEST_PYTHON = (3, 15)


@attrs.frozen
class Environment:
    python_version: str = DEFAULT_PYTHON_VERSION
    python_requirements: str = ""
    python_packages: tuple[str, ...] = ()
    system_packages: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ("cpu",)
    cuda: str = ""
    cudnn: str = ""
    #: shell commands run after the packages are installed (today's ``build.run``)
    run: tuple[str, ...] = ()


@attrs.frozen
class Example:
    #: input name -> literal value, or "@path" of a file inside the package
    input: dict[str, str] = attrs.field(factory=dict)
    #: expected output: text, or "@path" of a file inside the package; None: not checked
    output: str | None = None


@attrs.frozen
class Config:
    model: str
    name: str = ""
    environment: Environment = attrs.field(factory=Environment)
    examples: tuple[Example, ...] = ()
    #: predictions at once (today's ``concurrency.max``; an async predictor's)
    concurrency: int = 1
    #: ``NAME=value`` for the image's environment (today's ``environment:`` list)
    variables: tuple[str, ...] = ()
    #: the cog.yaml format: MODEL_FORMAT (2021) or PREDICT_FORMAT (today's Cog)
    format: str = MODEL_FORMAT


class ConfigError(Exception):
    """A cog.yaml we cannot use; ``problems`` lists each one as ``field.path: message``."""

    def __init__(self, problems: Sequence[str], config: Config | None = None):
        self.problems = tuple(problems)
        #: what could still be read despite the problems (unknown keys ignored), if anything
        self.config = config
        super().__init__("\n".join(f"  - {p}" for p in self.problems))


class PackageFiles(typing.Protocol):
    """What validate/complete need to know about a package's files (zip or directory)."""

    def exists(self, path: str) -> bool: ...

    def read_text(self, path: str) -> str: ...


class DirectoryFiles:
    """PackageFiles over a model directory on disk."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def _path(self, path: str) -> Path | None:
        candidate = (self.root / path).resolve()
        return candidate if candidate.is_relative_to(self.root) else None

    def exists(self, path: str) -> bool:
        resolved = self._path(path)
        return resolved is not None and resolved.is_file()

    def read_text(self, path: str) -> str:
        resolved = self._path(path)
        if resolved is None:
            raise FileNotFoundError(path)
        return resolved.read_text(encoding="utf-8")


# -- load -------------------------------------------------------------------------------

_loader = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)


def _strict_str(value: Any, _: type) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        raise TypeError(
            f"expected a string, got the number {value}; write versions in quotes, "
            'e.g. "3.10" (unquoted, YAML reads 3.10 as 3.1)'
        )
    raise TypeError(f"expected a string, got {_yaml_type(value)}")


def _string_list(value: Any, _: type) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list of strings, got {_yaml_type(value)}")
    problems = [
        f"item {i + 1}: expected a string, got {_yaml_type(v)}"
        for i, v in enumerate(value)
        if not isinstance(v, str)
    ]
    if problems:
        raise TypeError("; ".join(problems))
    return tuple(value)


_yaml_type = yaml_type


_lenient = cattrs.Converter(forbid_extra_keys=False)
for _converter in (_loader, _lenient):
    _converter.register_structure_hook(str, _strict_str)
    _converter.register_structure_hook_func(lambda t: t == tuple[str, ...], _string_list)


def _scalar_text(value: Any) -> Any:
    """Example values may be written as YAML numbers or booleans; they are sent as text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return value


def _normalize_examples(doc: dict[str, Any]) -> None:
    examples = doc.get("examples")
    if not isinstance(examples, list):
        return
    for example in examples:
        if isinstance(example, dict):
            if isinstance(example.get("input"), dict):
                example["input"] = {k: _scalar_text(v) for k, v in example["input"].items()}
            if "output" in example:
                example["output"] = _scalar_text(example["output"])


_DROP = object()


def _shaped(value: Any, kind: Any, path: str, problems: list[str]) -> Any:
    """value with every mapping and list of the schema checked for being one (and with
    text keys); what is not is reported at its field path and left out (_DROP) so that
    structuring can still report everything else. Scalars are cattrs' to check."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if attrs.has(kind) or origin is dict:
        if value is None and path != "cog.yaml":  # `environment:` with nothing under it
            return {}
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {_yaml_type(value)}")
            return _DROP
        for key in value:
            if not isinstance(key, str):
                problems.append(
                    f"{path}: keys must be names, got {_yaml_type(key)} ({key!r}); "
                    "quote it if it is meant as one"
                )
        value = {k: v for k, v in value.items() if isinstance(k, str)}
        if origin is dict:
            return value
        fields = typing.get_type_hints(kind)
        shaped = {}
        for key, item in value.items():
            inner = item
            if key in fields:
                inner = _shaped(item, fields[key], _join(path, key), problems)
            if inner is not _DROP:
                shaped[key] = inner
        return shaped
    if origin is tuple and args and args[0] is not str:  # a list of mappings (examples)
        if value is None:
            return []
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {_yaml_type(value)}")
            return _DROP
        items = [_shaped(item, args[0], f"{path}[{i}]", problems) for i, item in enumerate(value)]
        # A bad item stays as an empty one, so that later items keep their numbers.
        return [{} if item is _DROP else item for item in items]
    return value


def _join(path: str, key: str) -> str:
    return key if path == "cog.yaml" else f"{path}.{key}"


def _duplicate_keys(text: str | bytes, source: str) -> list[str]:
    """Keys given twice in one mapping (YAML keeps the last silently), with positions."""
    try:
        root = yaml.compose(text, Loader=YAML_LOADER)
    except yaml.YAMLError:
        return []  # reported by load_config as the syntax error it is
    problems: list[str] = []
    seen_nodes: set[int] = set()

    def walk(node: yaml.Node | None, path: str) -> None:
        if node is None or id(node) in seen_nodes:  # aliases may repeat a node
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key, item in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in first:
                        mark, earlier = key.start_mark, first[key.value].start_mark
                        problems.append(
                            f"{source}: line {mark.line + 1}, column {mark.column + 1}: "
                            f"duplicate key {_join(path, key.value)} (first given on line "
                            f"{earlier.line + 1}); YAML would keep only the last"
                        )
                    else:
                        first[key.value] = key
                    walk(item, _join(path, key.value))
                else:
                    walk(item, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{path}[{i}]")

    walk(root, "cog.yaml")
    return problems


def _format_error(exc: BaseException, _type: Any) -> str:
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        keys = ", ".join(sorted(str(k) for k in exc.extra_fields))
        return f"unknown key{'s' if len(exc.extra_fields) > 1 else ''}: {keys}"
    if isinstance(exc, KeyError):
        return "is required"
    if isinstance(exc, TypeError):
        return str(exc)
    if isinstance(exc, (AttributeError, ValueError)):
        return "has the wrong shape (expected a mapping)" if "items" in str(exc) else str(exc)
    return str(exc)


def _path(path: str) -> str:
    """cattrs' '$.environment.python_packages[1]' -> 'environment.python_packages[1]'."""
    path = path.removeprefix("$").removeprefix(".")
    return re.sub(r"\['([^']*)'\]", r".\1", path) or "cog.yaml"


def load_config(
    text: str | bytes, source: str = "cog.yaml", warnings: list[str] | None = None
) -> Config:
    """The config of a cog.yaml in either format; ConfigError lists every problem.
    What is ignored (keys of newer Cog releases) is appended to ``warnings``."""
    too_big = shape_problems(text, source)
    if too_big:
        raise ConfigError(too_big)
    try:
        doc = yaml.load(text, Loader=YAML_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{source}: {where}invalid YAML: {problem}"]) from None
    if doc is None:
        needs = "`predict: file.py:ClassName` (2021 format: `model: file.py:ClassName`)"
        raise ConfigError([f"{source} is empty; it needs at least {needs}"])
    if not isinstance(doc, dict):
        raise ConfigError([f"{source}: expected a mapping of keys, got {_yaml_type(doc)}"])
    problems = _duplicate_keys(text, source)
    fmt, mixed = detect_format(doc)
    if mixed:
        raise ConfigError(problems + mixed)
    found: list[str] = []
    if fmt == PREDICT_FORMAT:
        doc, translated, ignored = translate({k: v for k, v in doc.items() if isinstance(k, str)})
        problems += translated
        if warnings is not None:
            warnings += ignored
    else:
        for key in ("concurrency", "variables", "format"):
            if key in doc:  # fields of the config model that only today's format sets
                found.append(f"cog.yaml: unknown key: {key}")
                del doc[key]
        environment = doc.get("environment")
        if isinstance(environment, dict) and "run" in environment:
            found.append("environment: unknown key: run (a key of today's build:)")
            environment = {k: v for k, v in environment.items() if k != "run"}
            doc["environment"] = environment
    doc = _shaped(doc, Config, "cog.yaml", found)
    _normalize_examples(doc)
    try:
        config = _loader.structure(doc, Config)
    except cattrs.BaseValidationError as exc:
        for message in cattrs.transform_error(exc, format_exception=_format_error):
            text, _, path = message.rpartition(" @ ")
            found.append(f"{_path(path)}: {text}")
        config = None
    problems += [_in_format(problem, fmt) for problem in found]
    if problems:
        try:
            partial = config or _lenient.structure(doc, Config)
        except (cattrs.BaseValidationError, TypeError, ValueError, KeyError, AttributeError):
            partial = None
        raise ConfigError(problems, partial) from None
    assert config is not None
    return config


def _in_format(problem: str, fmt: str) -> str:
    """A problem ("path: message") with its path as the author's file spells it."""
    path, sep, message = problem.partition(": ")
    return f"{original_path(path, fmt)}{sep}{message}" if sep else problem


# -- validate ---------------------------------------------------------------------------

_NAME = re.compile(
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
)
_MODEL = re.compile(r"(?P<file>[\w./-]+\.py):(?P<cls>[A-Za-z_]\w*)")
_PIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?:\[[A-Za-z0-9._,-]+\])?==[A-Za-z0-9.*+!_-]+")
#: one requirement as today's Cog takes it in build.python_packages: a name, extras,
#: version specifiers, a marker (no pip options: they would change where pip looks)
_REQUIREMENT = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9._-]*(?:\[[A-Za-z0-9._,-]+\])?"
    r"(?:\s*(?:===|==|!=|~=|>=|<=|>|<)\s*[A-Za-z0-9.*+!_-]+"
    r"(?:\s*,\s*(?:===|==|!=|~=|>=|<=|>|<)\s*[A-Za-z0-9.*+!_-]+)*)?"
    r"(?:\s*;\s*[A-Za-z0-9_.<>=!~'\" ()-]+)?"
)
_VCS = re.compile(r"git\+(?:https?|ssh)://[A-Za-z0-9._~:/@%+#=&?-]+")
_DEB = re.compile(r"[a-z0-9][a-z0-9+.-]+(?:=[A-Za-z0-9.+~:-]+)?")


def _model_problems(config: Config, files: PackageFiles) -> list[str]:
    match = _MODEL.fullmatch(config.model)
    if not match or plain_path_problem(match["file"]):
        return [f"model: {config.model!r} must be 'file.py:ClassName', e.g. 'infer.py:Model'"]
    module, class_name = match["file"], match["cls"]
    if not files.exists(module):
        return [f"model: {module} is not in the package"]
    try:
        source = files.read_text(module)
    except (UnicodeDecodeError, ValueError) as exc:
        return [f"model: {module} cannot be read as UTF-8 Python: {exc}"]
    if len(source) > MAX_MODEL_SOURCE:
        return [
            f"model: {module} is {format_size(len(source))}; the model's own file may be at "
            f"most {format_size(MAX_MODEL_SOURCE)} (put data in files of their own)"
        ]
    try:
        tree = ast.parse(source, filename=module)
    except SyntaxError as exc:
        return [f"model: {module} line {exc.lineno}: syntax error: {exc.msg}"]
    except ValueError as exc:
        return [f"model: {module} cannot be read as UTF-8 Python: {exc}"]
    except (RecursionError, MemoryError):
        return [f"model: {module} nests deeper than the server reads; simplify it"]
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    if class_name not in classes:
        found = f" (it defines {', '.join(sorted(classes))})" if classes else ""
        return [f"model: {module} defines no class {class_name}{found}"]
    return []


def name_problem(name: str) -> str | None:
    """Why a package name cannot name its images, or None."""
    if len(name) > MAX_NAME:
        return f"{len(name)} characters; an image name may have at most {MAX_NAME}"
    if _NAME.fullmatch(name):
        return None
    return (
        f"{name[:200]!r} is not a valid image name (lowercase letters, digits, "
        "'.', '_', '-' and '/' between parts, e.g. 'acme/colorizer')"
    )


def _python_version_problem(version: str) -> str | None:
    """Why a python_version cannot be built, or None: it must name a CPython release
    (major.minor) that the runtime runs on."""
    newest = "{}.{}".format(*NEWEST_PYTHON)
    oldest = "{}.{}".format(*RUNTIME_MIN_PYTHON)
    if not re.fullmatch(r"\d{1,9}(\.\d{1,9})*", version):
        return f'{version!r} must look like "3.11" (major.minor)'
    parts = tuple(int(part) for part in version.split("."))
    if parts[:2] > NEWEST_PYTHON:
        return f"{version} is no CPython release (the newest is {newest})"
    if len(parts) != 2:
        example = "{}.{}".format(*parts) if len(parts) > 2 else newest
        return f'{version!r}: give the major and minor version only, e.g. "{example}"'
    if parts < RUNTIME_MIN_PYTHON:
        return f"{version} is older than the cog runtime supports ({oldest} or newer)"
    return None


def validate_config(config: Config, files: PackageFiles) -> None:
    """Raise ConfigError listing every problem of config for a package with these files."""
    problems = [_in_format(problem, config.format) for problem in _problems(config, files)]
    if problems:
        raise ConfigError(problems)


def _problems(config: Config, files: PackageFiles) -> list[str]:
    env = config.environment
    problems: list[str] = []
    if config.name and name_problem(config.name):
        problems.append(f"name: {name_problem(config.name)}")
    problems += _model_problems(config, files)
    problem = _python_version_problem(env.python_version)
    if problem:
        problems.append(f"environment.python_version: {problem}")
    if env.python_requirements:
        path = env.python_requirements
        problem = plain_path_problem(path) or dockerfile_problem(path)
        if problem:
            problems.append(f"environment.python_requirements: {problem}")
        elif not files.exists(env.python_requirements):
            problems.append(
                f"environment.python_requirements: {env.python_requirements} is not in the package"
            )
    for i, spec in enumerate(env.python_packages):
        if _PIN.fullmatch(spec) or _VCS.fullmatch(spec):
            continue
        if config.format == PREDICT_FORMAT:  # today's Cog passes any requirement to pip
            if not _REQUIREMENT.fullmatch(spec):
                problems.append(
                    f"environment.python_packages[{i}]: {spec!r} is not a requirement "
                    "(name[extras] and version specifiers, or a git+https:// URL)"
                )
        else:
            problems.append(
                f"environment.python_packages[{i}]: {spec!r} is not pinned; "
                "use name==version (or a git+https:// URL)"
            )
    for i, package in enumerate(env.system_packages):
        if not _DEB.fullmatch(package):
            problems.append(
                f"environment.system_packages[{i}]: {package!r} is not a Debian package name"
            )
    if not env.architectures:
        problems.append("environment.architectures: must name at least one of cpu, gpu")
    for i, arch in enumerate(env.architectures):
        if arch not in ARCHITECTURES:
            problems.append(
                f"environment.architectures[{i}]: unknown architecture {arch!r} (use cpu or gpu)"
            )
    if len(set(env.architectures)) != len(env.architectures):
        problems.append("environment.architectures: lists an architecture twice")
    for field, value, pattern in (
        ("cuda", env.cuda, r"\d+\.\d+"),
        ("cudnn", env.cudnn, r"\d+(\.\d+)*"),
    ):
        if value and "gpu" not in env.architectures:
            problems.append(f"environment.{field}: set, but architectures has no gpu")
        elif value and not re.fullmatch(pattern, value):
            problems.append(f'environment.{field}: {value!r} is not a version like "11.8"')
    if len(config.examples) > MAX_EXAMPLES:
        problems.append(
            f"examples: {len(config.examples)} examples; at most {MAX_EXAMPLES} (each is run "
            "by the check after a build)"
        )
    for i, example in enumerate(config.examples[:MAX_EXAMPLES]):
        for name, value in example.input.items():
            if not name.isidentifier():
                problems.append(f"examples[{i}].input: {name!r} is not an input name")
            if value.startswith("@"):
                problems += _example_file(f"examples[{i}].input.{name}", value[1:], files)
        if example.output is not None and example.output.startswith("@"):
            problems += _example_file(f"examples[{i}].output", example.output[1:], files)
    if config.concurrency < 1:
        problems.append(f"concurrency: {config.concurrency} is not 1 or more")
    for i, command in enumerate(env.run):
        if not command.strip() or "\0" in command:
            problems.append(f"environment.run[{i}]: {command!r} is not a command")
    return problems


def _example_file(where: str, path: str, files: PackageFiles) -> list[str]:
    problem = plain_path_problem(path)
    if problem:
        return [f"{where}: {problem}"]
    if not files.exists(path):
        return [f"{where}: {path} is not in the package"]
    return []


def check_config(
    text: str | bytes,
    files: PackageFiles,
    source: str = "cog.yaml",
    warnings: list[str] | None = None,
) -> Config:
    """load -> validate -> complete, reporting the problems of all three steps at once
    (what is ignored is appended to ``warnings``)."""
    try:
        config = load_config(text, source, warnings)
    except ConfigError as exc:
        if exc.config is None:
            raise
        problems = list(exc.problems)
        try:
            validate_config(exc.config, files)
        except ConfigError as more:
            problems += more.problems
        raise ConfigError(problems) from None
    validate_config(config, files)
    return complete_config(config, files)


# -- complete ---------------------------------------------------------------------------


def pinned_versions(config: Config, files: PackageFiles) -> dict[str, str]:
    """requirement_key(name) -> version, from python_packages and the requirements file."""
    specs = list(config.environment.python_packages)
    requirements = config.environment.python_requirements
    if requirements and files.exists(requirements):
        specs += requirement_specs(files.read_text(requirements))
    return pinned(specs)


def complete_config(config: Config, files: PackageFiles) -> Config:
    """Defaults filled in; for GPU images the CUDA/cuDNN pair. Raises ConfigError."""
    env = config.environment
    if "gpu" not in env.architectures:
        return config
    try:
        pair = choose_pair(pinned_versions(config, files), env.cuda, env.cudnn)
    except NoCudaPair as exc:
        field = f"environment.{exc.field}" if exc.field else "environment"
        raise ConfigError([f"{field}: {exc}"]) from None
    return attrs.evolve(config, environment=attrs.evolve(env, cuda=pair.cuda, cudnn=pair.cudnn))


def defaults_taken(text: str | bytes) -> list[str]:
    """Lines for the build log naming the defaults a cog.yaml relies on: the Python of a
    2021-format one (``model:``, ``environment:``) or of today's (``build:``); the text is
    one that load_config accepts."""
    doc = yaml.load(text, Loader=YAML_LOADER)
    if not isinstance(doc, dict):
        return []
    fmt, _ = detect_format(doc)
    section, default = doc.get("environment"), DEFAULT_PYTHON_VERSION
    if fmt == PREDICT_FORMAT:
        section, default = doc.get("build"), PREDICT_DEFAULT_PYTHON
    elif "model" not in doc:
        return []
    if "python_version" not in (section if isinstance(section, dict) else {}):
        return [f"python_version not set: using {default}, Cog's default"]
    return []
