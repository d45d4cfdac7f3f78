"""Cog: package machine learning models.

Inside an image only the runtime is used (``cog.Model``, ``cog.input``, ``cog.Path`` and
``python -m cog.server``); it must never import the server-only dependencies.
"""

__version__ = "0.1.0"
