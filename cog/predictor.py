"""Today's Cog API: ``cog.BasePredictor``/``cog.BaseRunner`` and ``cog.Input``.

A model author writes::

    class Predictor(BasePredictor):
        def setup(self):
            self.net = load("./weights")

        def predict(
            self,
            image: Path = Input(description="Input image"),
            scale: float = Input(default=1.5, ge=1.0, le=4.0),
        ) -> Path:
            ...

:func:`predictor_signature` reads such a class into the one
:class:`~cog.signature.Signature` both generations of model share (the rules are in
:mod:`cog.declarations`); the cog server reads the same from the source without importing
it (:mod:`cog.server.source`).

This module runs inside every image, in the model's own Python: Python 3.8+ and the
standard library only.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import io
import pathlib
import typing
from typing import Any, List, Union

from cog.declarations import MethodDeclaration, ParameterDeclaration, build_predictor_signature
from cog.signature import NO_DEFAULT, OutputType, Signature, SignatureError
from cog.types import AsyncConcatenateIterator, BaseModel, ConcatenateIterator, File, Secret

__all__ = [
    "BasePredictor",
    "BaseRunner",
    "FieldInfo",
    "Input",
    "method_name",
    "predictor_signature",
]


class FieldInfo:
    """What one ``Input(...)`` said (see :func:`Input`)."""

    __slots__ = (
        "choices",
        "default",
        "deprecated",
        "description",
        "ge",
        "le",
        "max_length",
        "min_length",
        "regex",
    )

    def __init__(self, default: Any = NO_DEFAULT, **options: Any) -> None:
        self.default = default
        for name in self.__slots__:
            if name != "default":
                setattr(self, name, options.get(name))

    def __repr__(self) -> str:
        shown = [f"{name}={getattr(self, name)!r}" for name in self.__slots__]
        return f"Input({', '.join(s for s in shown if not s.endswith('=None'))})"


def Input(  # Cog's name
    default: Any = NO_DEFAULT,
    *,
    description: str | None = None,
    ge: Union[int, float] | None = None,
    le: Union[int, float] | None = None,
    min_length: int | None = None,
    max_length: int | None = None,
    regex: str | None = None,
    choices: List[Union[str, int, float]] | None = None,
    deprecated: bool | None = None,
) -> Any:
    """Describe one input: the default value of a ``predict()``/``run()`` parameter.

    Without ``default`` the input is required; ``default=None`` makes it optional (the
    model gets None). ``ge``/``le`` bound numbers, ``min_length``/``max_length``/``regex``
    strings, ``choices`` lists the allowed values, ``deprecated=True`` marks an input that
    clients should stop sending.
    """
    return FieldInfo(
        default,
        description=description,
        ge=ge,
        le=le,
        min_length=min_length,
        max_length=max_length,
        regex=regex,
        choices=choices,
        deprecated=deprecated,
    )


class BasePredictor:
    """Base class of a predictor: ``setup()`` (optional, may take ``weights``) once, then
    ``predict(**inputs)`` per request; either may be ``async``."""

    def setup(self) -> None:
        """Load weights and anything else slow; called once, before the first prediction."""

    def predict(self, **inputs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not define predict()")


class BaseRunner(BasePredictor):
    """``BasePredictor`` under Cog's newer name: the method is ``run()``."""

    def run(self, **inputs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not define run()")


def method_name(cls: type) -> str:
    """The method that makes a prediction: ``run`` for a BaseRunner, else ``predict``
    when the class defines one, else ``run``."""
    if isinstance(cls, type) and issubclass(cls, BaseRunner):
        return "run"
    predict = getattr(cls, "predict", None)
    if predict is not None and predict is not BasePredictor.predict:
        return "predict"
    return "run"


def predictor_signature(cls: type) -> Signature:
    """The signature of a predictor class, checked; raises SignatureError."""
    name = method_name(cls)
    method = getattr(cls, name, None)
    qualname = f"{getattr(cls, '__qualname__', cls)}.{name}"
    if not callable(method) or method in (BasePredictor.predict, BaseRunner.run):
        raise SignatureError([f"{qualname}: the class defines neither predict() nor run()"])
    code = getattr(inspect.unwrap(method), "__code__", None)
    filename = code.co_filename if code else "<model>"
    line = code.co_firstlineno if code else None
    try:
        hints = typing.get_type_hints(method)
    except Exception as e:  # an annotation that names what is not there
        where = f"{filename}:{line if line is not None else '?'}: {qualname}"
        raise SignatureError([f"{where}: cannot read the annotations: {e}"]) from None
    parameters = []
    other = []
    kind = inspect.Parameter
    for position, parameter in enumerate(inspect.signature(method).parameters.values()):
        if position == 0 and parameter.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD):
            continue  # self
        if parameter.kind in (kind.VAR_POSITIONAL, kind.VAR_KEYWORD):
            other.append(f"*{parameter.name}: inputs must be named parameters")
            continue
        if parameter.kind is kind.POSITIONAL_ONLY:
            other.append(f"{parameter.name} is positional-only; inputs are passed by name")
            continue
        parameters.append(_parameter(parameter, hints.get(parameter.name), line))
    output, problem = _output(hints.get("return", inspect.Signature.empty))
    return build_predictor_signature(
        MethodDeclaration(
            parameters=tuple(parameters),
            output=output,
            output_problem=problem,
            other_problems=tuple(other),
            filename=filename,
            line=line,
            qualname=qualname,
        )
    )


def _parameter(parameter: inspect.Parameter, hint: Any, line: int | None) -> ParameterDeclaration:
    default = parameter.default
    info = default if isinstance(default, FieldInfo) else None
    if info is not None:
        default = info.default
    elif default is inspect.Parameter.empty:
        default = NO_DEFAULT
    type_, is_list, optional, problem = _input_type(hint)
    options = {} if info is None else {name: getattr(info, name) for name in FieldInfo.__slots__}
    options.pop("default", None)
    return ParameterDeclaration(
        name=parameter.name,
        type=type_,
        type_problem=problem,
        is_list=is_list,
        optional=optional,
        default=default,
        line=line,
        **options,
    )


def _strip_optional(hint: Any) -> tuple[Any, bool]:
    args = getattr(hint, "__args__", None)
    if _is_union(hint) and args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return hint, False


def _is_union(hint: Any) -> bool:
    origin = typing.get_origin(hint) if hasattr(typing, "get_origin") else None
    return origin is Union or type(hint).__name__ == "UnionType"


def _list_item(hint: Any) -> Any:
    """X for list[X]/List[X]; None when hint is not a list type."""
    origin = getattr(hint, "__origin__", None)
    if origin is list:
        args = getattr(hint, "__args__", ())
        return args[0] if args else Any
    if hint is list:
        return Any
    return None


def _scalar(hint: Any) -> str | None:
    if hint is str:
        return "str"
    if hint is bool:
        return "bool"
    if hint is int:
        return "int"
    if hint is float:
        return "float"
    if isinstance(hint, type):
        if issubclass(hint, pathlib.PurePath):
            return "Path"
        if issubclass(hint, Secret):
            return "Secret"
        if issubclass(hint, (File, io.IOBase)):
            return "File"
    return None


def _input_type(hint: Any) -> tuple[str | None, bool, bool, str]:
    """(type name, is a list, is Optional, the problem when the type is None)."""
    if hint is None:
        return None, False, False, "has no type annotation"
    inner, optional = _strip_optional(hint)
    item = _list_item(inner)
    type_ = _scalar(item if item is not None else inner)
    if type_ is None:
        problem = (
            f"{_describe(hint)} is not an input type (use str, int, float, bool, cog.Path, "
            "cog.File, cog.Secret, Optional[...] or list[...])"
        )
        return None, False, optional, problem
    return type_, item is not None, optional, ""


def _describe(hint: Any) -> str:
    if getattr(hint, "__origin__", None) is not None or _is_union(hint):
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", None) or str(hint)


def _output(hint: Any) -> tuple[OutputType | None, str]:
    """The output type of a return annotation, or (None, why it is not one)."""
    if hint is inspect.Signature.empty or hint is Any or hint is dict or hint is type(None):
        return OutputType("any"), ""
    if getattr(hint, "__origin__", None) is dict:
        return OutputType("any"), ""
    origin = getattr(hint, "__origin__", None)
    args = getattr(hint, "__args__", ()) or (Any,)
    if origin in (ConcatenateIterator, AsyncConcatenateIterator):
        item, problem = _output(args[0])
        if item is None or item.type != "str":
            return None, "ConcatenateIterator must be of str"
        return OutputType("str", iterator=True, concatenate=True), ""
    if origin in (
        collections.abc.Iterator,
        collections.abc.AsyncIterator,
        collections.abc.Generator,
        collections.abc.AsyncGenerator,
        collections.abc.Iterable,
    ):
        item, problem = _output(args[0])
        if item is None:
            return None, problem
        return _replace(item, iterator=True), ""
    item = _list_item(hint)
    if item is not None:
        inner, problem = _output(item)
        if inner is None:
            return None, problem
        return _replace(inner, is_list=True), ""
    if _is_union(hint):
        return None, f"{_describe(hint)}: a prediction returns a value (Optional is for fields)"
    scalar = _scalar(hint)
    if scalar is not None:
        return OutputType(scalar), ""
    if isinstance(hint, type) and (
        issubclass(hint, BaseModel) or hasattr(hint, "model_fields") or hasattr(hint, "__fields__")
    ):
        return _object(hint)
    return None, f"{_describe(hint)} is not an output type"


def _object(cls: type) -> tuple[OutputType | None, str]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception as e:
        return None, f"cannot read the fields of {cls.__name__}: {e}"
    fields = []
    for name, hint in hints.items():
        if name.startswith("_") or typing.get_origin(hint) is typing.ClassVar:
            continue
        inner, optional = _strip_optional(hint)
        field, problem = _output(inner)
        if field is None or field.iterator or field.type == "object":
            return None, f"{cls.__name__}.{name}: {problem or 'not a field type'}"
        fields.append((name, _replace(field, optional=optional)))
    return OutputType("object", name=cls.__name__, fields=tuple(fields)), ""


def _replace(output: OutputType, **changes: Any) -> OutputType:
    return dataclasses.replace(output, **changes)
