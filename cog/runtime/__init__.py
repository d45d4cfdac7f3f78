"""The inference server that runs inside every built image: ``python -m cog.runtime``.

Routes: ``GET /ping`` (readiness), ``GET /help`` (the input signature as JSON),
``GET /openapi.json``, ``POST /infer`` (a multipart form of inputs; the output as the
response). See :mod:`cog.runtime.app`. Python 3.8+, aiohttp, attrs and pyyaml only.

Its names are loaded on first use: ``python -m cog.runtime`` imports this package first,
and starts the model's worker before it imports aiohttp (see :mod:`cog.runtime.__main__`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cog.runtime.app import InferenceServer, create_app
    from cog.runtime.model_ref import ModelLoadError, ModelRef

__all__ = ["InferenceServer", "ModelLoadError", "ModelRef", "create_app"]

_LAZY = {
    "InferenceServer": "cog.runtime.app",
    "create_app": "cog.runtime.app",
    "ModelLoadError": "cog.runtime.model_ref",
    "ModelRef": "cog.runtime.model_ref",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cog.runtime' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
