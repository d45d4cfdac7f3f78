"""Which scope each route needs, declared beside its handler (``@requires("read")``).

The server's authentication middleware reads the declaration of the route a request
matched (:func:`required_scope`); a route that declares ``None`` is open to anyone (the
page's own files must load before it can ask for a token).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

Handler = TypeVar("Handler", bound=Callable[..., Any])

#: read: list, show, download, logs; write: upload, rebuild; admin: delete;
#: run: inferences on the server's Docker engine (see docs/web.md)
SCOPES = ("read", "write", "admin", "run")
_ATTRIBUTE = "cog_required_scope"
UNDECLARED = object()


def requires(scope: str | None) -> Callable[[Handler], Handler]:
    """Declare the scope a handler needs; None: open to anyone."""
    if scope is not None and scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r} (scopes: {', '.join(SCOPES)})")

    def declare(handler: Handler) -> Handler:
        setattr(handler, _ATTRIBUTE, scope)
        return handler

    return declare


def required_scope(handler: Callable[..., Any]) -> Any:
    """The scope a handler declared (None: open), or UNDECLARED."""
    return getattr(handler, _ATTRIBUTE, UNDECLARED)
