"""The rules that turn what a model declares into a :class:`~cog.signature.Signature`.

Two generations of declaration, one set of rules for each, one Signature for both:

- 2021: ``@cog.input("name", type=..., default=..., min=..., max=..., options=...)`` on
  ``run()`` (:func:`build_signature`);
- today's Cog: annotated parameters of ``predict()``/``run()`` with ``Input(...)``
  defaults, and an annotated return type (:func:`build_predictor_signature`).

The readers (the model's class at import, :mod:`cog.predictor`; the model's source read
without importing it, :mod:`cog.server.source`) describe what they found as declarations;
the rules here check them, collect every problem and say where it is.

This module runs inside every image, in the model's own Python: Python 3.8+ and the
standard library only.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import pathlib
import re
from typing import Any, Callable, Sequence

from cog.signature import (
    _A_TYPE,
    FILE_TYPES,
    NO_DEFAULT,
    Argument,
    InputError,
    OutputType,
    Signature,
    SignatureError,
)

# --- 2021: @cog.input declarations ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InputDeclaration:
    """What one ``@cog.input(...)`` said, before it is checked (values may be anything)."""

    name: Any
    #: a Python type (str, int, float, bool, a pathlib.Path subclass) as written
    type: Any
    help: Any = None
    default: Any = NO_DEFAULT
    min: Any = None
    max: Any = None
    options: Any = None
    #: where the decorator is, for messages
    line: int | None = None


@dataclasses.dataclass(frozen=True)
class RunParameters:
    """What a model's ``run()`` accepts, and where it is."""

    #: named parameters after ``self``, in order
    names: tuple[str, ...]
    #: run() has ``**kwargs``, so any input name is a parameter
    takes_any: bool = False
    #: parameters that can only be passed by position (inputs are passed by name)
    positional_only: tuple[str, ...] = ()
    filename: str = "<model>"
    line: int | None = None
    qualname: str = "Model.run"
    is_async: bool = False


def run_parameters(function: Callable[..., Any], qualname: str | None = None) -> RunParameters:
    """The parameters of a ``run`` function (unbound: its first parameter is ``self``)."""
    code = getattr(inspect.unwrap(function), "__code__", None)
    parameters = list(inspect.signature(function).parameters.values())
    if parameters and parameters[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        parameters = parameters[1:]
    kind = inspect.Parameter
    return RunParameters(
        names=tuple(
            p.name for p in parameters if p.kind not in (kind.VAR_POSITIONAL, kind.VAR_KEYWORD)
        ),
        takes_any=any(p.kind is kind.VAR_KEYWORD for p in parameters),
        positional_only=tuple(p.name for p in parameters if p.kind is kind.POSITIONAL_ONLY),
        filename=code.co_filename if code else "<model>",
        line=code.co_firstlineno if code else None,
        qualname=qualname or getattr(function, "__qualname__", "run"),
        is_async=inspect.iscoroutinefunction(function),
    )


def type_name(value: Any) -> str | None:
    """The JSON name of an input type given in ``@cog.input(type=...)``, or None."""
    if value is str:
        return "str"
    if value is bool:
        return "bool"
    if value is int:
        return "int"
    if value is float:
        return "float"
    if isinstance(value, type) and issubclass(value, pathlib.PurePath):
        return "Path"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _conform(type_: str, value: Any) -> Any:
    """A declared literal (default or option) as the input's type; raises InputError."""
    if type_ in ("str", "Secret") and isinstance(value, str):
        return value
    if type_ == "bool" and isinstance(value, bool):
        return value
    if type_ == "int" and _is_number(value) and isinstance(value, int):
        return value
    if type_ == "float" and _is_number(value):
        if not math.isfinite(value):
            raise InputError(f"{value!r} is not a finite number")
        return float(value)
    raise InputError(f"{value!r} is not {_A_TYPE[type_]}")


def build_signature(declarations: Sequence[InputDeclaration], run: RunParameters) -> Signature:
    """Check every declaration against the rules and ``run()``; the Signature, or SignatureError.

    Every problem is collected, so a model author sees them all at once.
    """
    problems: list[str] = []

    def where(line: int | None) -> str:
        return f"{run.filename}:{line if line is not None else '?'}: {run.qualname}"

    method = run.qualname.rpartition(".")[2] + "()"  # run() or predict()
    if run.is_async:
        problems.append(f"{where(run.line)}: {method} must be a plain method, not async")
    arguments: dict[str, Argument] = {}
    seen: set[str] = set()
    for declaration in declarations:
        name = declaration.name
        if not isinstance(name, str) or not name:
            problems.append(f"{where(declaration.line)}: an input's name must be a string")
            continue
        found: list[str] = []
        argument = _check_declaration(declaration, found)
        if name in seen:
            found.insert(0, "declared more than once")
        elif not run.takes_any and name not in run.names:
            found.insert(0, f"is not a parameter of {method}")
        elif name in run.positional_only:
            found.insert(
                0, f"is a positional-only parameter of {method}; inputs are passed by name"
            )
        problems.extend(f"{where(declaration.line)}: input {name!r}: {p}" for p in found)
        if argument is not None and name not in seen:
            arguments[name] = argument
        seen.add(name)
    declared = {d.name for d in declarations if isinstance(d.name, str)}
    for parameter in run.names:
        if parameter not in declared:
            problems.append(
                f"{where(run.line)}: parameter {parameter!r} of {method} has no @cog.input"
            )
    if problems:
        raise SignatureError(problems)
    ordered = [arguments[n] for n in run.names if n in arguments]
    ordered += [a for n, a in arguments.items() if n not in run.names]
    return Signature(tuple(ordered))


def _check_declaration(d: InputDeclaration, problems: list[str]) -> Argument | None:
    """One declaration as an Argument, appending what is wrong with it to ``problems``."""
    type_ = type_name(d.type)
    if type_ is None:
        problems.append(f"type must be str, int, float, bool or cog.Path, not {d.type!r}")
        return None
    if d.help is not None and not isinstance(d.help, str):
        problems.append(f"help must be a string, not {d.help!r}")
    numeric = type_ in ("int", "float")
    bounds: dict[str, Any] = {"min": None, "max": None}
    for key in bounds:
        bound = getattr(d, key)
        if bound is None:
            continue
        if not numeric:
            problems.append(f"{key} is only allowed for int and float inputs, not {type_}")
        elif not _is_number(bound) or not math.isfinite(bound):
            problems.append(f"{key} must be a number, not {bound!r}")
        else:
            bounds[key] = float(bound) if type_ == "float" else bound
    low, high = bounds["min"], bounds["max"]
    if low is not None and high is not None and low > high:
        problems.append(f"min {low!r} is above max {high!r}")
    probe = Argument(name=d.name, type=type_, min=low, max=high)

    options: tuple[Any, ...] | None = None
    if d.options is not None:
        if type_ == "Path":
            problems.append("options are not allowed for file inputs")
        elif not isinstance(d.options, (list, tuple)):
            problems.append(f"options must be a list, not {d.options!r}")
        elif len(d.options) < 2:
            problems.append("options must list two or more values")
        else:
            conformed = []
            for option in d.options:
                try:
                    value = _conform(type_, option)
                    probe.check(value)
                except InputError as e:
                    problems.append(f"option {e}")
                    continue
                if value in conformed:
                    problems.append(f"option {option!r} is listed twice")
                conformed.append(value)
            options = tuple(conformed)
    probe = dataclasses.replace(probe, options=options)

    default = d.default
    if default is not NO_DEFAULT:
        if type_ == "Path" and default is not None:
            problems.append("a file input cannot have a default (default=None: optional)")
            default = NO_DEFAULT
        elif default is not None:
            try:
                default = _conform(type_, default)
                probe.check(default)
            except InputError as e:
                problems.append(f"default {e}")
    return dataclasses.replace(
        probe, help=d.help if isinstance(d.help, str) else None, default=default
    )


# --- Today's Cog: annotated parameters with Input(...) ------------------------------------

#: Input() options and the input types they apply to
_NUMERIC = ("int", "float")
_TEXT = ("str", "Secret")


@dataclasses.dataclass(frozen=True)
class ParameterDeclaration:
    """One parameter of a predictor's ``predict()``/``run()``, as a reader found it."""

    name: str
    #: a name of TYPE_NAMES; None when the annotation is missing or not an input type
    type: str | None
    #: what is wrong with the annotation, when type is None
    type_problem: str = "has no type annotation"
    is_list: bool = False
    #: annotated Optional[...] (or ``X | None``)
    optional: bool = False
    #: the literal default: the parameter's own, or Input()'s
    default: Any = NO_DEFAULT
    description: Any = None
    ge: Any = None
    le: Any = None
    min_length: Any = None
    max_length: Any = None
    regex: Any = None
    choices: Any = None
    deprecated: Any = None
    line: int | None = None


@dataclasses.dataclass(frozen=True)
class MethodDeclaration:
    """A predictor's ``predict()``/``run()``: its parameters and its return type."""

    parameters: tuple[ParameterDeclaration, ...]
    #: the return type; None when its annotation is not an output type
    output: OutputType | None
    #: what is wrong with the return annotation, when output is None
    output_problem: str = ""
    #: **kwargs, *args or positional-only parameters: what predictors cannot take
    other_problems: tuple[str, ...] = ()
    filename: str = "<model>"
    line: int | None = None
    qualname: str = "Predictor.predict"


def build_predictor_signature(method: MethodDeclaration) -> Signature:
    """Check a predictor's declarations; the Signature, or SignatureError listing every
    problem (each with its file, line and parameter)."""
    problems: list[str] = []

    def where(line: int | None) -> str:
        return f"{method.filename}:{line if line is not None else '?'}: {method.qualname}"

    problems += [f"{where(method.line)}: {p}" for p in method.other_problems]
    arguments = []
    for parameter in method.parameters:
        found: list[str] = []
        argument = _check_parameter(parameter, found)
        problems += [f"{where(parameter.line)}: input {parameter.name!r}: {p}" for p in found]
        if argument is not None:
            arguments.append(argument)
    if method.output is None:
        problems.append(f"{where(method.line)}: output: {method.output_problem}")
    if problems:
        raise SignatureError(problems)
    return Signature(tuple(arguments), kind="predictor", output=method.output)


def _check_parameter(p: ParameterDeclaration, problems: list[str]) -> Argument | None:
    if p.type is None:
        problems.append(p.type_problem)
        return None
    type_ = p.type
    if p.description is not None and not isinstance(p.description, str):
        problems.append(f"description must be a string, not {p.description!r}")
    if p.deprecated is not None and not isinstance(p.deprecated, bool):
        problems.append(f"deprecated must be True or False, not {p.deprecated!r}")
    bounds: dict[str, Any] = {}
    for key, allowed in (
        ("ge", _NUMERIC),
        ("le", _NUMERIC),
        ("min_length", _TEXT),
        ("max_length", _TEXT),
    ):
        bound = getattr(p, key)
        if bound is None:
            continue
        if type_ not in allowed:
            problems.append(f"{key} is only allowed for {' and '.join(allowed)} inputs")
        elif key in ("ge", "le") and (not _is_number(bound) or not math.isfinite(bound)):
            problems.append(f"{key} must be a number, not {bound!r}")
        elif key in ("min_length", "max_length") and (
            not isinstance(bound, int) or isinstance(bound, bool) or bound < 0
        ):
            problems.append(f"{key} must be a whole number, not {bound!r}")
        else:
            bounds[key] = float(bound) if type_ == "float" and key in ("ge", "le") else bound
    if "ge" in bounds and "le" in bounds and bounds["ge"] > bounds["le"]:
        problems.append(f"ge {bounds['ge']!r} is above le {bounds['le']!r}")
    if (
        "min_length" in bounds
        and "max_length" in bounds
        and bounds["min_length"] > bounds["max_length"]
    ):
        problems.append("min_length is above max_length")
    regex = None
    if p.regex is not None:
        if type_ not in _TEXT:
            problems.append("regex is only allowed for str inputs")
        elif not isinstance(p.regex, str):
            problems.append(f"regex must be a string, not {p.regex!r}")
        else:
            try:
                re.compile(p.regex)
                regex = p.regex
            except re.error as e:
                problems.append(f"regex {p.regex!r} is not a regular expression: {e}")
    probe = Argument(
        name=p.name,
        type=type_,
        min=bounds.get("ge"),
        max=bounds.get("le"),
        is_list=p.is_list,
        min_length=bounds.get("min_length"),
        max_length=bounds.get("max_length"),
        regex=regex,
    )
    options = None
    if p.choices is not None:
        if type_ in FILE_TYPES or type_ in ("bool", "Secret"):
            problems.append(f"choices are not allowed for {type_} inputs")
        elif not isinstance(p.choices, (list, tuple)) or not p.choices:
            problems.append(f"choices must be a list of values, not {p.choices!r}")
        else:
            conformed: list[Any] = []
            for choice in p.choices:
                try:
                    value = _conform(type_, choice)
                    probe.check(value)
                except InputError as e:
                    problems.append(f"choice {e}")
                    continue
                if value in conformed:
                    problems.append(f"choice {choice!r} is listed twice")
                conformed.append(value)
            options = tuple(conformed)
    probe = dataclasses.replace(probe, options=options)

    default = p.default
    if default is NO_DEFAULT and p.optional:
        default = None  # Optional[...] without a default: the model gets None
    if default is not NO_DEFAULT and default is not None:
        try:
            default = _conform_default(probe, default)
        except InputError as e:
            problems.append(f"default {e}")
            default = NO_DEFAULT
    return dataclasses.replace(
        probe,
        help=p.description if isinstance(p.description, str) else None,
        default=default,
        deprecated=p.deprecated is True,
    )


def _conform_default(argument: Argument, value: Any) -> Any:
    if argument.is_file:
        raise InputError(f"{value!r}: a file input cannot have a default (default=None: optional)")
    if argument.is_list:
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{value!r} is not a list")
        items = tuple(_conform(argument.type, item) for item in value)
        for item in items:
            argument.check(item)
        return items
    value = _conform(argument.type, value)
    argument.check(value)
    return value
