"""Cog: package machine learning models.

Inside an image only the model API is used, in the model's own Python, which holds
nothing of cog but these pure-Python modules: the 2021 API (``cog.Model``, ``cog.input``,
``cog.request_directory``, ``cog.make_temp_path``), today's Cog API
(``cog.BasePredictor``, ``cog.BaseRunner``, ``cog.Input``), the types both use
(``cog.Path``, ``cog.File``, ``cog.Secret``, ``cog.ConcatenateIterator``,
``cog.BaseModel``) and the worker process that runs the model (``python -m cog.worker``).
The API is loaded on first use, so ``import cog`` stays light for the cog server and the
CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "AsyncConcatenateIterator",
    "BaseModel",
    "BasePredictor",
    "BaseRunner",
    "CancelationException",
    "ConcatenateIterator",
    "File",
    "Input",
    "Model",
    "Path",
    "Secret",
    "__version__",
    "input",
    "make_temp_path",
    "request_directory",
]

if TYPE_CHECKING:
    from cog.model import Model, input, make_temp_path, request_directory
    from cog.predictor import BasePredictor, BaseRunner, Input
    from cog.types import (
        AsyncConcatenateIterator,
        BaseModel,
        CancelationException,
        ConcatenateIterator,
        File,
        Path,
        Secret,
    )

_LAZY = {
    "Model": "cog.model",
    "input": "cog.model",
    "request_directory": "cog.model",
    "make_temp_path": "cog.model",
    "BasePredictor": "cog.predictor",
    "BaseRunner": "cog.predictor",
    "Input": "cog.predictor",
    "Path": "cog.types",
    "File": "cog.types",
    "Secret": "cog.types",
    "ConcatenateIterator": "cog.types",
    "AsyncConcatenateIterator": "cog.types",
    "BaseModel": "cog.types",
    "CancelationException": "cog.types",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        import importlib

        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cog' has no attribute {name!r}")
