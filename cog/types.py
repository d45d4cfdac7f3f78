"""The types a model's inputs and outputs are made of: ``cog.Path``, ``cog.File``,
``cog.Secret``, ``cog.ConcatenateIterator``, ``cog.BaseModel``, and the exception a
cancelled prediction raises.

This module runs inside every image, in the model's own Python: Python 3.8+ and the
standard library only.
"""

from __future__ import annotations

import io
import pathlib
import typing
from typing import Any, Dict, TypeVar

_T = TypeVar("_T")


class Path(type(pathlib.Path())):  # type: ignore[misc]  # the concrete class (PosixPath)
    """A file: the type of a file input, and a file output when the model returns one.

    Every inference has a temporary directory of its own, which the server removes with
    everything in it once it answers (a file output there is read first). File inputs
    arrive in it, each in a folder of its own, under the name the client gave the file,
    so a model may write its output next to its input (``image.with_name("out.png")``) or
    in ``cog.request_directory()``. A file returned from anywhere else (say
    ``tempfile.mkstemp()``, or a file shipped with the model) is sent and left where it is.
    """


class File(io.IOBase):
    """A file input given to the model as an open binary file (deprecated in Cog in favour
    of :class:`Path`); as an output, any file-like object, whose content is sent."""


class Secret:
    """A string that hides itself when printed: ``get_secret_value()`` gives it."""

    __slots__ = ("_value",)

    def __init__(self, secret_value: str | None = None) -> None:
        self._value = secret_value

    def get_secret_value(self) -> str | None:
        return self._value

    @property
    def secret_value(self) -> str | None:
        return self._value

    def __str__(self) -> str:
        return "**********" if self._value is not None else ""

    def __repr__(self) -> str:
        return f"Secret({self})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class ConcatenateIterator(typing.Iterator[_T]):
    """The return type of a predictor that yields pieces of one text (tokens, say):
    ``-> ConcatenateIterator[str]``. Clients show the pieces joined."""

    def __next__(self) -> _T:  # pragma: no cover - a marker, never instantiated
        raise StopIteration


class AsyncConcatenateIterator(typing.AsyncIterator[_T]):
    """``ConcatenateIterator`` for an ``async`` predictor."""

    async def __anext__(self) -> _T:  # pragma: no cover - a marker, never instantiated
        raise StopAsyncIteration


class CancelationException(BaseException):
    """Raised in a synchronous prediction when it is cancelled.

    A ``BaseException`` (like ``KeyboardInterrupt``), so ``except Exception`` in model
    code does not swallow it. A model may catch it to clean up, and must raise it again.
    """


class BaseModel:
    """An output with named fields: subclass it and annotate the fields.

    ``Output(text="hi", score=0.5)`` makes one; a field annotated ``Optional[...]`` may be
    left out (it is None), a field with a value in the class body defaults to it. It is
    sent as a JSON object. A model that used pydantic's ``BaseModel`` (as Cog's own did)
    works too: the runtime reads any object with ``model_dump()`` or ``dict()``.
    """

    def __init__(self, **values: Any) -> None:
        fields = _fields(type(self))
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(unknown)}")
        for name, (has_default, default) in fields.items():
            if name in values:
                setattr(self, name, values[name])
            elif has_default:
                setattr(self, name, default)
            else:
                raise TypeError(f"{type(self).__name__}() is missing the field {name!r}")

    def dict(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in _fields(type(self))}

    model_dump = dict

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.dict() == self.dict()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.dict().items())
        return f"{type(self).__name__}({inner})"


def _fields(cls: type) -> Dict[str, Any]:
    """name -> (has a default, the default), for the annotated fields of cls and its bases."""
    fields: Dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        for name, annotation in vars(klass).get("__annotations__", {}).items():
            if name.startswith("_"):
                continue
            if name in vars(klass):
                fields[name] = (True, vars(klass)[name])
            elif _is_optional(annotation):
                fields[name] = (True, None)
            else:
                fields[name] = (False, None)
    return fields


def _is_optional(annotation: Any) -> bool:
    """Whether a field's annotation (an object, or its text under postponed evaluation)
    admits None."""
    if isinstance(annotation, str):
        text = annotation.replace(" ", "")
        return text.startswith(("Optional[", "typing.Optional[")) or "|None" in text
    return type(None) in getattr(annotation, "__args__", ())
