"""The model API: ``cog.Model``, ``@cog.input``, ``cog.Path``, ``cog.request_directory`` and
``cog.make_temp_path``.

A model author writes::

    class Model(cog.Model):
        def setup(self):
            self.net = load("./weights")

        @cog.input("image", type=cog.Path, help="Input image")
        @cog.input("scale", type=float, default=1.5, min=1.0, max=4.0)
        def run(self, image, scale):
            ...

Models written for Cog from June 2021 on name the method ``predict()`` instead of
``run()``; either works (when a class has both, ``run()`` is the one served). Declarations
are checked when the class is defined: every problem is raised at once as
:class:`cog.signature.SignatureError`, naming the model file, the line and the input.

This module runs inside every image, in the model's own Python: Python 3.8+ and the
standard library only.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile
import threading
from typing import Any, Callable, TypeVar

from cog.declarations import InputDeclaration, build_signature, run_parameters
from cog.signature import NO_DEFAULT, Signature, SignatureError
from cog.types import Path

__all__ = [
    "METHODS",
    "Model",
    "Path",
    "input",
    "make_temp_path",
    "method_of",
    "request_directory",
    "signature_of",
]

_Function = TypeVar("_Function", bound=Callable[..., Any])
_INPUTS = "_cog_inputs"
_SIGNATURE = "_cog_signature"
#: The names of a model's inference method, in order of preference: ``run()`` (Cog's first
#: API) and ``predict()`` (its name in Cog models from June 2021).
METHODS = ("run", "predict")


class _Request(threading.local):
    """What the server tells the thread running an inference (see request_directory)."""

    #: makes (once) and returns this inference's temporary directory; None outside one
    directory: Callable[[], str] | None = None


_request = _Request()


def request_directory() -> Path:
    """The temporary directory of the inference running in this thread.

    It is made on first use, holds the inference's file inputs too, and is removed with
    everything in it when the inference is answered: write outputs and scratch files here.
    Call it from the thread that runs ``run()`` (threads that ``run()`` starts have no
    inference of their own). Outside the inference server, say when a test calls ``run()``
    itself, each call makes a new directory that nobody removes.
    """
    directory = _request.directory
    if directory is None:
        return Path(tempfile.mkdtemp(prefix="cog-"))
    return Path(directory())


def make_temp_path(filename: str) -> Path:
    """A path named ``filename`` in a new, empty temporary directory: Cog 2021's helper for
    output files (``out = cog.make_temp_path("output.png"); image.save(out); return out``).

    The directory is made inside the inference's own (:func:`request_directory`), so it is
    removed, with the file, once the answer is sent. ``filename`` is a relative path that
    stays inside the directory (parent folders in it are not made).
    """
    name = pathlib.PurePosixPath(filename)
    if not name.parts or name.is_absolute() or ".." in name.parts:
        raise ValueError(f"make_temp_path() takes a file name, not {filename!r}")
    return Path(tempfile.mkdtemp(prefix="output-", dir=request_directory())) / name


def input(
    name: str,
    type: type,
    *,
    default: Any = NO_DEFAULT,
    min: float | None = None,
    max: float | None = None,
    options: list[Any] | None = None,
    help: str | None = None,
) -> Callable[[_Function], _Function]:
    """Declare an input of ``run()`` (or ``predict()``).

    ``type`` is str, int, float, bool or cog.Path (a file). Without ``default`` the input is
    required; ``default=None`` makes it optional (run() gets None), the only default a file
    input may have. ``min``/``max`` bound
    numbers; ``options`` lists the allowed values (two or more; not for files). Decorators
    stack, one per input; the checks run when the class is defined.
    """
    declaration = InputDeclaration(
        name=name,
        type=type,
        help=help,
        default=default,
        min=min,
        max=max,
        options=options,
        line=sys._getframe(1).f_lineno,  # the decorator's line, for messages
    )

    def decorate(function: _Function) -> _Function:
        # A new list each time: decorated functions never share declarations.
        setattr(function, _INPUTS, [declaration, *getattr(function, _INPUTS, [])])
        return function

    return decorate


class Model:
    """Base class of a model: override ``setup()`` (optional) and ``run()`` or ``predict()``.

    The inference server creates one instance, calls ``setup()`` once before the first
    inference, then calls ``run(**inputs)`` for every request, in a worker thread (for a
    model that defines ``predict()`` instead, ``run()`` calls it). It may return str, int,
    float, bool, None, a list or dict (sent as JSON), bytes, or a cog.Path (the file is
    sent).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if any(name in cls.__dict__ for name in METHODS):
            setattr(cls, _SIGNATURE, _build(cls))

    def setup(self) -> None:
        """Load weights and anything else slow; called once, before the first inference."""

    def run(self, **inputs: Any) -> Any:
        """Run one inference on the declared inputs and return the output."""
        if method_of(type(self)) == "predict":
            return self.predict(**inputs)
        raise NotImplementedError(f"{type(self).__name__} defines neither run() nor predict()")

    def predict(self, **inputs: Any) -> Any:
        """What ``run()`` is called in models written for Cog from June 2021: define either."""
        raise NotImplementedError(f"{type(self).__name__} defines neither run() nor predict()")


def method_of(model_class: type[Model]) -> str | None:
    """The name of the method that runs a model class's inferences: ``"run"`` when it
    defines ``run()`` (itself or a base class below cog.Model), else ``"predict"`` when it
    defines that; None when it defines neither."""
    for name in METHODS:
        if getattr(model_class, name, None) is not getattr(Model, name):
            return name
    return None


def signature_of(model_class: type) -> Signature:
    """The input signature of a model class, checked; raises SignatureError."""
    if not (isinstance(model_class, type) and issubclass(model_class, Model)):
        raise SignatureError([f"{model_class!r} is not a subclass of cog.Model"])
    if method_of(model_class) is None:
        raise SignatureError([f"{model_class.__qualname__} defines neither run() nor predict()"])
    signature = getattr(model_class, _SIGNATURE, None)
    if signature is None:
        signature = _build(model_class)
        setattr(model_class, _SIGNATURE, signature)
    return signature


def _build(cls: type) -> Signature:
    name = method_of(cls) or "run"
    method = getattr(cls, name)
    if not callable(method):
        raise SignatureError([f"{cls.__qualname__}.{name} is not a method"])
    declarations = getattr(method, _INPUTS, [])
    return build_signature(declarations, run_parameters(method, f"{cls.__qualname__}.{name}"))
