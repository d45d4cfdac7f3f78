"""The inference server that runs inside every built image: ``python -m cog.runtime``.

Routes: ``GET /ping`` (readiness), ``GET /help`` (the input signature as JSON),
``GET /openapi.json``, ``POST /infer`` (a multipart form of inputs; the output as the
response). See :mod:`cog.runtime.app`. Python 3.8+, aiohttp, attrs and pyyaml only.
"""

from __future__ import annotations

from cog.runtime.app import InferenceServer, create_app
from cog.runtime.model_ref import ModelLoadError, ModelRef

__all__ = ["InferenceServer", "ModelLoadError", "ModelRef", "create_app"]
