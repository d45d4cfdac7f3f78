"""The signature of a model: its inputs and (for today's predictors) its output, as data.

One signature model serves both generations of model:

- a 2021 model (``cog.Model`` with ``@cog.input``) and a predictor of today's Cog
  (``cog.BasePredictor``/``BaseRunner`` with ``Input(...)`` annotations) are both read
  into a :class:`Signature` (the rules are in :mod:`cog.declarations`);
- the inference runtime converts form fields with :meth:`Argument.convert` (``/infer``)
  and JSON values with :meth:`Argument.validate` (``/predictions``), and publishes
  :meth:`Signature.to_json` (``/help``) and OpenAPI (:mod:`cog.openapi`);
- the cog server reads the same signature from the model's source without importing it
  (:mod:`cog.server.source`), and stores its JSON in the package document.

JSON form (``/help``, the package document's ``Signature``)::

    {"arguments": {"scale": {"type": "float", "help": "...", "default": 1.5,
                             "min": 1.0, "max": 4.0}, ...},
     "kind": "predictor",                       # today's Cog only
     "output": {"type": "Path", "list": true}}  # today's Cog only

Keys that were not declared are **omitted** (never null), so ``"default": null`` means
"optional; the model gets None" while a missing ``default`` means "required". Arguments
are listed in the order of the method's parameters. A 2021 model's JSON is exactly what
it was before today's Cog was supported.

This module runs inside every image, in the model's own Python: Python 3.8+ and the
standard library only.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import sys
from typing import Any, Iterable

#: The input types, by the name used in JSON. File and Secret are today's Cog only.
TYPE_NAMES = ("str", "int", "float", "bool", "Path", "File", "Secret")
#: The types of a file: sent as an upload (``/infer``) or a URL (``/predictions``).
FILE_TYPES = ("Path", "File")
#: The kinds of signature: a 2021 ``cog.Model`` and a predictor of today's Cog.
KINDS = ("model", "predictor")
_A_TYPE = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "Path": "a file",
    "File": "a file",
    "Secret": "a string",
}
_TRUE = ("true", "1")
_FALSE = ("false", "0")
# ASCII digits and spaces only (``int()`` alone would take "1_000" and "\u0663"), so int
# and float inputs accept the same spellings.
_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*\Z", re.ASCII)
#: How much of a rejected value a message quotes.
_SHOWN = 40
#: The URL schemes a file input of /predictions may use.
FILE_URL_SCHEMES = ("data:", "http://", "https://")


class _NoDefault(enum.Enum):
    NO_DEFAULT = "NO_DEFAULT"

    def __repr__(self) -> str:
        return "NO_DEFAULT"


#: Marks an input without a default (a required input). ``None`` is a real default.
NO_DEFAULT = _NoDefault.NO_DEFAULT


class SignatureError(ValueError):
    """A model's inputs or output are declared wrongly.

    ``problems`` holds one line per problem, each starting with ``file:line:`` and naming
    the input; the message is all of them.
    """

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


class InputError(ValueError):
    """One input value is not acceptable; the message says why (without the input's name)."""


@dataclasses.dataclass(frozen=True)
class Argument:
    """One declared input."""

    name: str
    #: one of TYPE_NAMES
    type: str
    help: str | None = None
    #: NO_DEFAULT: required. Anything else (including None, 0, "", False) is the default.
    default: Any = NO_DEFAULT
    min: int | float | None = None
    max: int | float | None = None
    options: tuple[Any, ...] | None = None
    #: a list of values of ``type`` (``list[str]``)
    is_list: bool = False
    min_length: int | None = None
    max_length: int | None = None
    regex: str | None = None
    deprecated: bool = False

    @property
    def required(self) -> bool:
        return self.default is NO_DEFAULT

    @property
    def is_file(self) -> bool:
        return self.type in FILE_TYPES

    def convert(self, raw: str) -> Any:
        """The value of a text form field, converted to this input's type and checked.

        Raises InputError. File inputs are not converted here (the server stores them).
        """
        if self.type in ("str", "Secret"):
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

    def validate(self, value: Any) -> Any:
        """A JSON value (of ``POST /predictions``) checked against this input; the value
        as the model gets it, except that a file is still its URL. Raises InputError."""
        if value is None:
            if self.default is None:
                return None
            raise InputError("none is not an allowed value")
        if not self.is_list:
            return self._validate_one(value)
        if not isinstance(value, list):
            value = [value]  # one value for a list input, as Cog accepts it
        return [self._validate_one(item) for item in value]

    def _validate_one(self, value: Any) -> Any:
        kind = self.type
        if kind in ("str", "Secret"):
            if not isinstance(value, str):
                raise InputError(f"{_show(value)} is not a string")
        elif kind == "int":
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InputError(f"{_show(value)} is not an integer")
        elif kind == "float":
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise InputError(f"{_show(value)} is not a number")
            if not math.isfinite(value):
                raise InputError(f"{_show(value)} is not a finite number")
            value = float(value)
        elif kind == "bool":
            if not isinstance(value, bool):
                raise InputError(f"{_show(value)} is not a boolean")
        else:  # a file: its URL
            if not isinstance(value, str) or not value.startswith(FILE_URL_SCHEMES):
                raise InputError(
                    f"{_show(value)} is not a file URL (use a data: URI or an http(s) URL)"
                )
            return value
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        """Raise InputError if a value of the right type breaks a constraint."""
        if self.min is not None and value < self.min:
            raise InputError(f"{_show(value)} is below the minimum {self.min!r}")
        if self.max is not None and value > self.max:
            raise InputError(f"{_show(value)} is above the maximum {self.max!r}")
        if self.options is not None and value not in self.options:
            allowed = ", ".join(repr(option) for option in self.options)
            raise InputError(f"{_show(value)} is not one of {allowed}")
        if self.min_length is not None and len(value) < self.min_length:
            raise InputError(f"{_show(value)} is shorter than {self.min_length} characters")
        if self.max_length is not None and len(value) > self.max_length:
            raise InputError(f"{_show(value)} is longer than {self.max_length} characters")
        if self.regex is not None and re.match(self.regex, value) is None:
            raise InputError(f"{_show(value)} does not match {self.regex!r}")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": self.type}
        if self.is_list:
            data["list"] = True
        if self.help is not None:
            data["help"] = self.help
        if self.default is not NO_DEFAULT:
            data["default"] = list(self.default) if self.is_list and self.default else self.default
        for key in ("min", "max", "min_length", "max_length", "regex"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        if self.options is not None:
            data["options"] = list(self.options)
        if self.deprecated:
            data["deprecated"] = True
        return data

    @classmethod
    def from_json(cls, name: str, spec: dict[str, Any]) -> Argument:
        options = spec.get("options")
        default = spec.get("default", NO_DEFAULT)
        if spec.get("list") and isinstance(default, list):
            default = tuple(default)
        return cls(
            name=name,
            type=spec["type"],
            help=spec.get("help"),
            default=default,
            min=spec.get("min"),
            max=spec.get("max"),
            options=None if options is None else tuple(options),
            is_list=bool(spec.get("list")),
            min_length=spec.get("min_length"),
            max_length=spec.get("max_length"),
            regex=spec.get("regex"),
            deprecated=bool(spec.get("deprecated")),
        )


def _show(value: Any) -> str:
    """``repr(value)``, shortened: a message quoting a megabyte of input helps nobody."""
    shown = repr(value)
    if len(shown) <= _SHOWN:
        return shown
    if isinstance(value, str):
        return f"{value[:_SHOWN]!r}... ({len(value)} characters)"
    if isinstance(value, int):
        return f"{shown[:_SHOWN]}... ({len(shown.lstrip('-'))} digits)"
    return f"{shown[:_SHOWN]}..."


@dataclasses.dataclass(frozen=True)
class OutputType:
    """What a predictor's method returns (today's Cog; a 2021 model's output is free)."""

    #: one of TYPE_NAMES, "any" (unannotated, dict, Any) or "object" (a BaseModel)
    type: str = "any"
    is_list: bool = False
    #: yielded one by one (``Iterator[T]``); the answer is the list of them
    iterator: bool = False
    #: ``ConcatenateIterator[str]``: the pieces make one text
    concatenate: bool = False
    #: a field of an object that may be None
    optional: bool = False
    #: the class name of an object
    name: str | None = None
    #: an object's fields, in order
    fields: tuple[tuple[str, OutputType], ...] = ()

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": self.type}
        for key, value in (
            ("list", self.is_list),
            ("iterator", self.iterator),
            ("concatenate", self.concatenate),
            ("optional", self.optional),
        ):
            if value:
                data[key] = True
        if self.name is not None:
            data["name"] = self.name
        if self.type == "object":
            data["fields"] = {name: field.to_json() for name, field in self.fields}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OutputType:
        fields = tuple(
            (name, cls.from_json(spec)) for name, spec in (data.get("fields") or {}).items()
        )
        return cls(
            type=data["type"],
            is_list=bool(data.get("list")),
            iterator=bool(data.get("iterator")),
            concatenate=bool(data.get("concatenate")),
            optional=bool(data.get("optional")),
            name=data.get("name"),
            fields=fields,
        )


@dataclasses.dataclass(frozen=True)
class Signature:
    """The inputs of a model, in the order of its parameters; a predictor's output type."""

    arguments: tuple[Argument, ...] = ()
    #: "model" (2021: cog.Model and @cog.input) or "predictor" (today's Cog)
    kind: str = "model"
    #: a predictor's output type (None for a 2021 model, whose output is free)
    output: OutputType | None = None

    def argument(self, name: str) -> Argument | None:
        for argument in self.arguments:
            if argument.name == name:
                return argument
        return None

    def to_json(self) -> dict[str, Any]:
        """``{"arguments": {name: {...}}}``, with ``kind`` and ``output`` for a predictor."""
        data: dict[str, Any] = {"arguments": {arg.name: arg.to_json() for arg in self.arguments}}
        if self.kind != "model":
            data["kind"] = self.kind
        if self.output is not None:
            data["output"] = self.output.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Signature:
        """The inverse of to_json (for clients reading ``/help`` or a package document)."""
        output = data.get("output")
        return cls(
            tuple(Argument.from_json(name, spec) for name, spec in data["arguments"].items()),
            kind=data.get("kind", "model"),
            output=None if output is None else OutputType.from_json(output),
        )
