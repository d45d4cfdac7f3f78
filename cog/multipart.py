"""Reading multipart/form-data bodies with aiohttp: one account of a body its parser
cannot read, for the cog server's uploads and the in-image runtime's forms alike.

Only the parser's errors are translated: a client that goes away, or a cancelled
request, passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

T = TypeVar("T")

#: What aiohttp raises for a body it cannot parse as multipart: a missing starting or
#: closing boundary, a header line without a colon, a body that does not decode as its
#: Content-Encoding says (the parser's error arrives wrapped in RequestPayloadError).
_MALFORMED = (ValueError, AssertionError, HttpProcessingError, web.RequestPayloadError)


class MalformedBody(Exception):
    """A body the parser cannot read; ``str()`` says why, for the client."""

    def __init__(self, message: str, *, undecodable: bool = False):
        super().__init__(message)
        #: the rest of the body cannot be read at all (its framing or encoding is lost):
        #: the connection cannot carry another request
        self.undecodable = undecodable


async def parsing(step: Awaitable[T]) -> T:
    """Await one step of reading a multipart body; MalformedBody if the body is bad."""
    try:
        return await step
    except web.RequestPayloadError as exc:
        raise MalformedBody(describe(exc), undecodable=True) from None
    except _MALFORMED as exc:
        raise MalformedBody(describe(exc)) from None


def describe(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, web.RequestPayloadError) else exc
    text = cause.message if isinstance(cause, HttpProcessingError) else str(exc)
    text = " ".join(text.split())
    if text == "Reading after EOF":
        return "the body ended before the closing boundary (truncated upload?)"
    if text.startswith("Could not find starting boundary"):
        return (
            "the body does not start with the boundary declared in Content-Type "
            "(empty body, or not multipart/form-data)"
        )
    return text or type(exc).__name__
