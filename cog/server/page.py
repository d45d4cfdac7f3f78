"""The web page the cog server serves at ``/``: the package list, each package's page, and
the "Try it" forms; plain HTML, CSS and JavaScript shipped in ``cog/server/static/``.

The page is one document (``index.html``) for every page URL (``/``,
``/packages/<id>``); its script reads the JSON API with the visitor's token, if any, from
the browser's session storage. Assets are read once, served from memory with their gzip
form when the browser takes it, and named by a hash of their content (``?v=``), so that
browsers keep them until they change.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources

import attrs
from aiohttp import web

from cog.server.auth import PUBLIC, Routes

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
#: what the page may load and talk to: itself only (pictures also as blob: and data: URLs)
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


@attrs.frozen
class Asset:
    body: bytes
    gzipped: bytes
    content_type: str
    etag: str


def _asset(name: str, body: bytes) -> Asset:
    suffix = name[name.rfind(".") :]
    digest = hashlib.sha256(body).hexdigest()[:16]
    return Asset(body, gzip.compress(body, 9, mtime=0), TYPES[suffix], f'"{digest}"')


def load_assets() -> dict[str, Asset]:
    """The page's files, with index.html naming the others by their content's hash."""
    folder = importlib.resources.files("cog.server") / "static"
    assets = {
        item.name: _asset(item.name, item.read_bytes())
        for item in folder.iterdir()
        if item.name[item.name.rfind(".") :] in TYPES and item.name != "index.html"
    }
    index = (folder / "index.html").read_text()
    for name, asset in assets.items():
        index = index.replace(f"/static/{name}", f"/static/{name}?v={asset.etag.strip(chr(34))}")
    assets["index.html"] = _asset("index.html", index.encode())
    return assets


ASSETS = web.AppKey("page_assets", dict)


def add_routes(app: web.Application) -> None:
    app[ASSETS] = load_assets()
    # Open to anyone: the page must load before it can ask for a token.
    routes = Routes(app)
    routes.get("/", index, PUBLIC)
    routes.get("/packages/{ref}", index, PUBLIC)
    routes.get("/static/{name}", static, PUBLIC)


def _respond(request: web.Request, asset: Asset, cache: str) -> web.Response:
    headers = {
        "ETag": asset.etag,
        "Cache-Control": cache,
        "Vary": "Accept-Encoding",
        "X-Content-Type-Options": "nosniff",
    }
    if asset.content_type.startswith("text/html"):
        headers["Content-Security-Policy"] = POLICY
        headers["Referrer-Policy"] = "same-origin"
    if asset.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    body = asset.body
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        body = asset.gzipped
        headers["Content-Encoding"] = "gzip"
    headers["Content-Type"] = asset.content_type
    return web.Response(body=body, headers=headers)


async def index(request: web.Request) -> web.Response:
    """The page: the same document for every page URL; its script shows the right one."""
    return _respond(request, request.app[ASSETS]["index.html"], "no-cache")


async def static(request: web.Request) -> web.Response:
    asset = request.app[ASSETS].get(request.match_info["name"])
    if asset is None or request.match_info["name"] == "index.html":
        raise web.HTTPNotFound(text=f"no such file: {request.path}")
    versioned = request.query.get("v") == asset.etag.strip('"')
    cache = "public, max-age=31536000, immutable" if versioned else "no-cache"
    return _respond(request, asset, cache)
