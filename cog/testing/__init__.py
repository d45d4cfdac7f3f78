"""The contract suites every backend runs, shipped with cog so plugins outside this
repository run the very same ones (they need pytest and pytest-asyncio):

- :class:`cog.testing.storage.StorageContract` for a storage backend,
- :class:`cog.testing.builder.BuilderContract` for an image builder.

A plugin's test module subclasses one and provides its fixtures; see each class, and
docs/plugins.md. Importing this package needs no pytest; importing a suite does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cog.testing.builder import BuilderContract
    from cog.testing.storage import StorageContract

__all__ = ["BuilderContract", "StorageContract"]


def __getattr__(name: str) -> Any:
    if name == "StorageContract":
        from cog.testing.storage import StorageContract

        return StorageContract
    if name == "BuilderContract":
        from cog.testing.builder import BuilderContract

        return BuilderContract
    raise AttributeError(f"module 'cog.testing' has no attribute {name!r}")
