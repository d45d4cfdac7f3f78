"""The inference server that runs inside every built image: ``python -m cog.server``.

Routes: ``GET /ping`` (readiness), ``GET /help`` (the input signature as JSON),
``GET /openapi.json``, ``POST /infer`` (a multipart form of inputs; the output as the
response). See :mod:`cog.server.app`. Python 3.8+, aiohttp, attrs and pyyaml only.
"""

from __future__ import annotations

from cog.server.app import InferenceServer, create_app
from cog.server.model_ref import ModelLoadError, ModelRef

__all__ = ["InferenceServer", "ModelLoadError", "ModelRef", "create_app"]
