"""The model API: ``cog.Model``, ``@cog.input``, ``cog.Path`` and ``cog.request_directory``.

A model author writes::

    class Model(cog.Model):
        def setup(self):
            self.net = load("./weights")

        @cog.input("image", type=cog.Path, help="Input image")
        @cog.input("scale", type=float, default=1.5, min=1.0, max=4.0)
        def run(self, image, scale):
            ...

Declarations are checked when the class is defined: every problem is raised at once as
:class:`cog.signature.SignatureError`, naming the model file, the line and the input.

This module runs inside every image, in the model's own Python: Python 3.8+ and the
standard library only.
"""

from __future__ import annotations

import sys
import tempfile
import threading
from typing import Any, Callable, TypeVar

from cog.declarations import InputDeclaration, build_signature, run_parameters
from cog.signature import NO_DEFAULT, Signature, SignatureError
from cog.types import Path

__all__ = ["Model", "Path", "input", "request_directory", "signature_of"]

_Function = TypeVar("_Function", bound=Callable[..., Any])
_INPUTS = "_cog_inputs"
_SIGNATURE = "_cog_signature"


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
    """Declare an input of ``run()``.

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
    """Base class of a model: override ``setup()`` (optional) and ``run()``.

    The inference server creates one instance, calls ``setup()`` once before the first
    inference, then calls ``run(**inputs)`` for every request, in a worker thread.
    ``run()`` may return str, int, float, bool, None, a list or dict (sent as JSON), bytes,
    or a cog.Path (the file is sent).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "run" in cls.__dict__:
            setattr(cls, _SIGNATURE, _build(cls))

    def setup(self) -> None:
        """Load weights and anything else slow; called once, before the first ``run()``."""

    def run(self, **inputs: Any) -> Any:
        """Run one inference on the declared inputs and return the output."""
        raise NotImplementedError(f"{type(self).__name__} does not define run()")


def signature_of(model_class: type) -> Signature:
    """The input signature of a model class, checked; raises SignatureError."""
    if not (isinstance(model_class, type) and issubclass(model_class, Model)):
        raise SignatureError([f"{model_class!r} is not a subclass of cog.Model"])
    if model_class.run is Model.run:
        raise SignatureError([f"{model_class.__qualname__} does not define run()"])
    signature = getattr(model_class, _SIGNATURE, None)
    if signature is None:
        signature = _build(model_class)
        setattr(model_class, _SIGNATURE, signature)
    return signature


def _build(cls: type) -> Signature:
    run = cls.run
    if not callable(run):
        raise SignatureError([f"{cls.__qualname__}.run is not a method"])
    declarations = getattr(run, _INPUTS, [])
    return build_signature(declarations, run_parameters(run, f"{cls.__qualname__}.run"))
