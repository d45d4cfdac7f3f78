"""The BuildKit builder (``--builder buildkit``): builds through BuildKit's gRPC control API.

Operators' guide: docs/buildkit.md.
"""

from __future__ import annotations

from cog.builders.buildkit.address import Address, parse_address
from cog.builders.buildkit.builder import BuildKitBuilder, BuildKitInfo, choose_exporter
from cog.builders.buildkit.connection import BuildKitConnection, TLSFiles
from cog.builders.buildkit.context_server import ContextServer
from cog.builders.buildkit.progress import Progress
from cog.builders.buildkit.tunnel import EngineTunnel

__all__ = [
    "Address",
    "BuildKitBuilder",
    "BuildKitConnection",
    "BuildKitInfo",
    "ContextServer",
    "EngineTunnel",
    "Progress",
    "TLSFiles",
    "choose_exporter",
    "parse_address",
]
