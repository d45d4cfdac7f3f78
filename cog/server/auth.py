"""Who may do what: identities and scopes, the authenticator interface, the tokens file,
and the one middleware that applies them.

Every route says what it needs where it is added (:class:`Routes`, used by
:func:`cog.server.views.add_routes`): a :class:`Scope` (``read``, ``write``, ``admin``),
or :data:`PUBLIC` (no authentication: ``/ping``) or :data:`IDENTIFIED` (any caller the
authenticator knows, whatever its scopes). :func:`authorize` asks the app's
:class:`Authenticator` who sent a request and refuses what its identity may not do: 401
(with ``WWW-Authenticate: Bearer``) when the caller is unknown or anonymous, 403 naming the
scope when a known caller lacks it. A route that declared nothing needs ``admin``: an
undeclared route fails closed.

:class:`TokensFile` is the default authenticator (``cog server --tokens FILE``); services
that embed the API pass their own to :func:`cog.server.app.make_app`.
"""

from __future__ import annotations

import abc
import enum
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Union

import attrs
import structlog
from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

log = structlog.get_logger("cog.server")

ANONYMOUS = "anonymous"
#: what `cog token new` makes: a prefix that says what the secret is, then 256 random bits
TOKEN_PREFIX = "cog_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
_DIGEST = re.compile(r"[0-9a-f]{64}")


class Scope(str, enum.Enum):
    """What a token may do. Each is granted on its own: ``admin`` does not imply ``read``."""

    #: list, show, download, logs
    READ = "read"
    #: upload, rebuild
    WRITE = "write"
    #: delete
    ADMIN = "admin"
    #: predictions through the server (its Docker engine runs the model): uses the
    #: server's CPU and memory, changes nothing in the registry
    RUN = "run"


class Access(enum.Enum):
    """What a route needs when it needs no scope."""

    #: nothing: the authenticator is not asked (``/ping``)
    PUBLIC = "public"
    #: a caller the authenticator accepts, with any scopes or none (``/v1/whoami``)
    IDENTIFIED = "identified"


PUBLIC = Access.PUBLIC
IDENTIFIED = Access.IDENTIFIED
Requirement = Union[Scope, Access]
ALL_SCOPES = frozenset(Scope)


@attrs.frozen
class Identity:
    """Who sent a request, and what they may do. ``name`` goes to the access log and the
    records a caller changes; it is never the secret."""

    name: str
    scopes: frozenset[Scope] = frozenset()
    #: no credentials were given: a missing scope asks for them (401), not 403
    anonymous: bool = False

    def may(self, scope: Scope) -> bool:
        return scope in self.scopes


class Unauthenticated(Exception):
    """No usable credentials: 401 with ``WWW-Authenticate: Bearer``."""


class Forbidden(Exception):
    """A known caller without the scope a route needs: 403."""

    def __init__(self, identity: Identity, scope: Scope):
        self.scope = scope
        super().__init__(
            f"{identity.name!r} may not do this: it needs the {scope.value!r} scope "
            f"(it has: {', '.join(sorted(s.value for s in identity.scopes)) or 'none'})"
        )


class Authenticator(abc.ABC):
    """Says who sent a request. Embedders of the API pass their own to ``make_app``."""

    @abc.abstractmethod
    async def authenticate(self, request: web.Request) -> Identity:
        """The caller's identity, with its scopes; anonymous callers get one too (with the
        scopes this server grants them, perhaps none). Raise :class:`Unauthenticated` for
        credentials that are refused. Never log the credentials."""


class OpenAccess(Authenticator):
    """No authentication: every caller may do everything (``cog server`` without
    ``--tokens``, which then listens on 127.0.0.1 only unless told otherwise)."""

    async def authenticate(self, request: web.Request) -> Identity:
        return Identity(ANONYMOUS, ALL_SCOPES, anonymous=True)


class TokensFileError(Exception):
    """A tokens file that cannot be used (the server refuses to start)."""


@attrs.frozen
class TokenEntry:
    """One line of a tokens file: ``NAME SCOPES SHA256``."""

    name: str
    scopes: frozenset[Scope]
    #: the SHA-256 of the token: the file holds no secret
    digest: bytes

    def line(self) -> str:
        scopes = ",".join(s.value for s in Scope if s in self.scopes)
        return f"{self.name} {scopes} {self.digest.hex()}"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_scopes(text: str) -> frozenset[Scope]:
    """'read,write' -> the scopes; ValueError naming what is not one."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError("no scopes given (use read, write, admin, run, comma-separated)")
    unknown = [name for name in names if name not in {s.value for s in Scope}]
    if unknown:
        raise ValueError(
            f"unknown scope{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            "(use read, write, admin, run)"
        )
    return frozenset(Scope(name) for name in names)


def check_token_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name == ANONYMOUS:
        raise ValueError(
            f"{name!r} is not a usable token name (letters, digits and . _ @ + -, "
            f"at most 64, not {ANONYMOUS!r})"
        )
    return name


def parse_tokens(text: str, source: str) -> tuple[TokenEntry, ...]:
    """The entries of a tokens file; TokensFileError naming every bad line."""
    entries: list[TokenEntry] = []
    problems: list[str] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        where = f"{source} line {number}"
        if len(parts) != 3:
            problems.append(f"{where}: expected NAME SCOPES SHA256, got {len(parts)} fields")
            continue
        name, scopes, digest = parts
        try:
            check_token_name(name)
            if not _DIGEST.fullmatch(digest):
                raise ValueError("the third field must be the token's SHA-256 in lowercase hex")
            entry = TokenEntry(name, parse_scopes(scopes), bytes.fromhex(digest))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if name in names:
            problems.append(f"{where}: the name {name!r} is given twice")
        if entry.digest in digests:
            problems.append(f"{where}: the same token is given twice")
        names.add(name)
        digests.add(entry.digest)
        entries.append(entry)
    if problems:
        raise TokensFileError("; ".join(problems))
    return tuple(entries)


class TokensFile(Authenticator):
    """Bearer tokens checked against a file of ``NAME SCOPES SHA256`` lines.

    The file is read when the server starts (a bad one stops it) and read again when it
    changes, so tokens are added and revoked without a restart; a change that breaks the
    file is logged and the last good entries stay in force. ``anonymous_scopes`` are what
    a caller with no token may do (``--public-read`` grants ``read``).
    """

    #: seconds between looks at the file for a change
    recheck = 1.0

    def __init__(self, path: Path, *, anonymous_scopes: Iterable[Scope] = ()):
        self.path = Path(path)
        self.anonymous_scopes = frozenset(anonymous_scopes)
        self._stamp = self._file_stamp()
        self._entries = self._read()
        self._checked = time.monotonic()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            info = os.stat(self.path)
        except OSError:
            return None
        return info.st_ino, info.st_size, info.st_mtime_ns

    def _read(self) -> tuple[TokenEntry, ...]:
        try:
            text = self.path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise TokensFileError(f"cannot read the tokens file {self.path}: {exc}") from None
        return parse_tokens(text, str(self.path))

    def entries(self) -> tuple[TokenEntry, ...]:
        """The entries in force, read again if the file changed."""
        now = time.monotonic()
        if now - self._checked >= self.recheck:
            self._checked = now
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._entries = self._read()
                    log.info("tokens file reloaded", path=str(self.path), tokens=len(self._entries))
                except TokensFileError as exc:
                    log.error("tokens file not reloaded; the previous tokens stay", error=str(exc))
        return self._entries

    async def authenticate(self, request: web.Request) -> Identity:
        header = request.headers.get("Authorization")
        if header is None:
            return Identity(ANONYMOUS, self.anonymous_scopes, anonymous=True)
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("the Authorization header must be 'Bearer TOKEN'")
        digest = token_digest(token)
        found: TokenEntry | None = None
        # Every entry is compared, each in constant time: how long this takes does not
        # depend on which entry matches, or how much of one does.
        for entry in self.entries():
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        if found is None:
            raise Unauthenticated("this token is not known to the server (revoked, or mistyped)")
        return Identity(found.name, found.scopes)


# -- routes and the middleware --------------------------------------------------------

AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
ROUTE_ACCESS = web.AppKey("route_access", dict)
IDENTITY = web.RequestKey("identity", Identity)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Routes:
    """Where routes are added, each with what it needs: one line a route, e.g.
    ``routes.post("/v1/packages/upload", upload, Scope.WRITE)``."""

    def __init__(self, app: web.Application):
        self.app = app
        self.access: dict[AbstractRoute, Requirement] = app.setdefault(ROUTE_ACCESS, {})

    def declare(self, route: AbstractRoute, need: Requirement) -> AbstractRoute:
        """Say what an already added route needs (for routes added some other way)."""
        self.access[route] = need
        return route

    def add(self, method: str, path: str, handler: Handler, need: Requirement) -> AbstractRoute:
        if method == "GET":
            route = self.app.router.add_get(path, handler)
            for sibling in route.resource or ():  # the HEAD route add_get made with it
                if sibling.method == "HEAD" and sibling.handler is handler:
                    self.declare(sibling, need)
        else:
            route = self.app.router.add_route(method, path, handler)
        return self.declare(route, need)

    def get(self, path: str, handler: Handler, need: Requirement) -> AbstractRoute:
        return self.add("GET", path, handler, need)

    def post(self, path: str, handler: Handler, need: Requirement) -> AbstractRoute:
        return self.add("POST", path, handler, need)

    def delete(self, path: str, handler: Handler, need: Requirement) -> AbstractRoute:
        return self.add("DELETE", path, handler, need)


def requirement(request: web.Request) -> Requirement | None:
    """What the request's route needs; None when no route matched (a 404 or 405 to come:
    nothing to protect)."""
    route = request.match_info.route
    if route.resource is None:  # aiohttp's system route for "not found"/"not allowed"
        return None
    return request.app.get(ROUTE_ACCESS, {}).get(route, Scope.ADMIN)


def identity(request: web.Request) -> Identity:
    """Who sent the request (the middleware has asked); anonymous on a public route."""
    return request.get(IDENTITY) or Identity(ANONYMOUS, anonymous=True)


@web.middleware
async def authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place where requests are authenticated and their scope is checked."""
    need = requirement(request)
    if need is None or need is PUBLIC:
        return await handler(request)
    who = await request.app[AUTHENTICATOR].authenticate(request)
    request[IDENTITY] = who
    structlog.contextvars.bind_contextvars(who=who.name)
    if isinstance(need, Scope) and not who.may(need):
        if who.anonymous:
            raise Unauthenticated(
                f"this server needs a token with the {need.value!r} scope for this "
                "(send Authorization: Bearer TOKEN)"
            )
        raise Forbidden(who, need)
    return await handler(request)


__all__ = [
    "ALL_SCOPES",
    "ANONYMOUS",
    "AUTHENTICATOR",
    "IDENTIFIED",
    "PUBLIC",
    "Access",
    "Authenticator",
    "Forbidden",
    "Identity",
    "OpenAccess",
    "Routes",
    "Scope",
    "TokenEntry",
    "TokensFile",
    "TokensFileError",
    "Unauthenticated",
    "authorize",
    "identity",
    "new_token",
    "parse_scopes",
    "parse_tokens",
    "token_digest",
]
