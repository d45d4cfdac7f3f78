"""Cog: package machine learning models.

Inside an image only the runtime is used (``cog.Model``, ``cog.input``, ``cog.Path``,
``cog.request_directory``, ``cog.make_temp_path`` and ``python -m cog.runtime``); it must
never import the server-only dependencies. The model API is loaded on first use, so
``import cog`` stays light for the cog server and the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Model", "Path", "__version__", "input", "make_temp_path", "request_directory"]

if TYPE_CHECKING:
    from cog.model import Model, Path, input, make_temp_path, request_directory

_LAZY = ("Model", "Path", "input", "make_temp_path", "request_directory")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from cog import model

        value = getattr(model, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cog' has no attribute {name!r}")
