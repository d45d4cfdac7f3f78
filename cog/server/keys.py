"""The cog server's application state: typed keys, declared once, that handlers read."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from cog.server.catalog import Catalog
from cog.server.examples import ExampleFiles
from cog.server.ingest import IngestService
from cog.server.settings import ServerSettings
from cog.server.warm import WarmPool
from cog.storage import Storage

SETTINGS = web.AppKey("settings", ServerSettings)
STORAGE = web.AppKey("storage", Storage)
CATALOG = web.AppKey("catalog", Catalog)
INGEST = web.AppKey("ingest", IngestService)
TMP_DIR = web.AppKey("tmp_dir", Path)
EXAMPLE_FILES = web.AppKey("example_files", ExampleFiles)
WARM_POOL = web.AppKey("warm_pool", WarmPool)
