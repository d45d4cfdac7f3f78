"""The input signature of a model's ``run()``: what each ``@cog.input`` declared, as data.

One set of rules serves three readers:

- ``cog.Model`` checks a class's declarations when the class is defined
  (:func:`build_signature`, raising :class:`SignatureError` that lists every problem);
- the inference server converts and checks form values with :meth:`Argument.convert`
  and publishes :meth:`Signature.to_json` (``/help``) and an OpenAPI document
  (:mod:`cog.runtime.openapi`);
- the cog server reads the same signature from the model's source without importing it
  (:mod:`cog.server.source`), so it can be compared with what a built image reports.

JSON form (``/help``)::

    {"arguments": {"scale": {"type": "float", "help": "...", "default": 1.5,
                             "min": 1.0, "max": 4.0}, ...}}

Keys that were not declared are **omitted** (never null), so ``"default": null`` means
"optional; run() gets None" (the only default a file input may have) while a missing
``default`` means "required". Arguments are listed in the order of run()'s parameters.

This module runs inside every image: Python 3.8+, attrs and the standard library only.
"""

from __future__ import annotations

import enum
import inspect
import math
import pathlib
import re
import sys
from typing import Any, Callable, Iterable, Sequence

import attrs

#: The input types, by the name used in JSON.
TYPE_NAMES = ("str", "int", "float", "bool", "Path")
_JSON_SCHEMA_TYPES = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "Path": {"type": "string", "format": "binary"},
}
_A_TYPE = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "Path": "a file",
}
_TRUE = ("true", "1")
_FALSE = ("false", "0")
# ASCII digits and spaces only (``int()`` alone would take "1_000" and "\u0663"), so int
# and float inputs accept the same spellings.
_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*\Z", re.ASCII)
#: How much of a rejected value a message quotes.
_SHOWN = 40


class _NoDefault(enum.Enum):
    NO_DEFAULT = "NO_DEFAULT"

    def __repr__(self) -> str:
        return "NO_DEFAULT"


#: Marks an input without a default (a required input). ``None`` is a real default.
NO_DEFAULT = _NoDefault.NO_DEFAULT


class SignatureError(ValueError):
    """A model's inputs are declared wrongly.

    ``problems`` holds one line per problem, each starting with ``file:line:`` and naming
    the input; the message is all of them.
    """

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


class InputError(ValueError):
    """One input value is not acceptable; the message says why (without the input's name)."""


@attrs.frozen
class Argument:
    """One declared input of ``run()``."""

    name: str
    #: one of TYPE_NAMES
    type: str
    help: str | None = None
    #: NO_DEFAULT: required. Anything else (including None, 0, "", False) is the default.
    default: Any = NO_DEFAULT
    min: int | float | None = None
    max: int | float | None = None
    options: tuple[Any, ...] | None = None

    @property
    def required(self) -> bool:
        return self.default is NO_DEFAULT

    @property
    def is_file(self) -> bool:
        return self.type == "Path"

    def convert(self, raw: str) -> Any:
        """The value of a text form field, converted to this input's type and checked.

        Raises InputError. File inputs are not converted here (the server stores them).
        """
        if self.type == "str":
            value: Any = raw
        elif self.type == "int":
            if not _INTEGER.match(raw):
                raise InputError(f"{_show(raw)} is not an integer")
            try:
                value = int(raw)
            except ValueError:  # more digits than Python converts (3.11+; sys.int_info)
                digits = len(raw.strip().lstrip("+-"))
                limit = sys.get_int_max_str_digits()  # type: ignore[attr-defined]
                raise InputError(
                    f"is an integer of {digits} digits; at most {limit} are accepted"
                ) from None
        elif self.type == "float":
            try:
                if not raw.isascii() or "_" in raw:  # spelled as an int input must be
                    raise ValueError(raw)
                value = float(raw)
            except ValueError:
                raise InputError(f"{_show(raw)} is not a number") from None
            if not math.isfinite(value):
                raise InputError(f"{_show(raw)} is not a finite number")
        elif self.type == "bool":
            lowered = raw.strip().lower()
            if lowered in _TRUE:
                value = True
            elif lowered in _FALSE:
                value = False
            else:
                raise InputError(f"{_show(raw)} is not a boolean (use true, false, 1 or 0)")
        else:
            raise InputError("must be a file upload")
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        """Raise InputError if a value of the right type is out of range or not an option."""
        if self.min is not None and value < self.min:
            raise InputError(f"{_show(value)} is below the minimum {self.min!r}")
        if self.max is not None and value > self.max:
            raise InputError(f"{_show(value)} is above the maximum {self.max!r}")
        if self.options is not None and value not in self.options:
            allowed = ", ".join(repr(option) for option in self.options)
            raise InputError(f"{_show(value)} is not one of {allowed}")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": self.type}
        if self.help is not None:
            data["help"] = self.help
        if self.default is not NO_DEFAULT:
            data["default"] = self.default
        if self.min is not None:
            data["min"] = self.min
        if self.max is not None:
            data["max"] = self.max
        if self.options is not None:
            data["options"] = list(self.options)
        return data

    def to_json_schema(self) -> dict[str, Any]:
        schema = dict(_JSON_SCHEMA_TYPES[self.type])
        if self.help is not None:
            schema["description"] = self.help
        if self.default is not NO_DEFAULT:
            schema["default"] = self.default
            if self.default is None:
                schema["nullable"] = True
        if self.min is not None:
            schema["minimum"] = self.min
        if self.max is not None:
            schema["maximum"] = self.max
        if self.options is not None:
            schema["enum"] = list(self.options)
        return schema


def _show(value: Any) -> str:
    """``repr(value)``, shortened: a message quoting a megabyte of input helps nobody."""
    shown = repr(value)
    if len(shown) <= _SHOWN:
        return shown
    if isinstance(value, str):
        return f"{value[:_SHOWN]!r}... ({len(value)} characters)"
    return f"{shown[:_SHOWN]}... ({len(shown.lstrip('-'))} digits)"


@attrs.frozen
class Signature:
    """The inputs of a model's ``run()``, in the order of its parameters."""

    arguments: tuple[Argument, ...] = ()

    def argument(self, name: str) -> Argument | None:
        for argument in self.arguments:
            if argument.name == name:
                return argument
        return None

    def to_json(self) -> dict[str, Any]:
        """``{"arguments": {name: {type, help, default, min, max, options}}}``, unset omitted."""
        return {"arguments": {arg.name: arg.to_json() for arg in self.arguments}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Signature:
        """The inverse of to_json (for clients reading ``/help``)."""
        arguments = []
        for name, spec in data["arguments"].items():
            options = spec.get("options")
            arguments.append(
                Argument(
                    name=name,
                    type=spec["type"],
                    help=spec.get("help"),
                    default=spec.get("default", NO_DEFAULT),
                    min=spec.get("min"),
                    max=spec.get("max"),
                    options=None if options is None else tuple(options),
                )
            )
        return cls(tuple(arguments))

    def to_json_schema(self) -> dict[str, Any]:
        """The form of ``POST /infer`` as a JSON Schema object (OpenAPI 3.0 flavour)."""
        return {
            "type": "object",
            "properties": {arg.name: arg.to_json_schema() for arg in self.arguments},
            "required": [arg.name for arg in self.arguments if arg.required],
            "additionalProperties": False,
        }


# --- Declarations and their rules ------------------------------------------------------


@attrs.frozen
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


@attrs.frozen
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
    if type_ == "str" and isinstance(value, str):
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
    probe = attrs.evolve(probe, options=options)

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
    return attrs.evolve(probe, help=d.help if isinstance(d.help, str) else None, default=default)
