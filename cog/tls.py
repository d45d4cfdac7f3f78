"""aiohttp imported without its certificates, which it loads as it is imported.

aiohttp makes its default TLS contexts at import, loading the system's CA certificates
into them: 0.07 to 0.1 s on a small machine, a quarter of the CLI's start and of the
inference server's, for connections that are nearly always plain HTTP (the CLI to its cog
server, the cog server to a model's Unix socket). :func:`import_aiohttp` imports it with
those loads put off; :func:`load_certificates` makes them (once), and each user of aiohttp
over TLS calls it first. Until then a TLS connection of aiohttp's defaults fails its
verification: it never goes unverified.

Standard library only, Python 3.8 and later: the inference server imports it in images.
"""

from __future__ import annotations

import ssl
import sys
import threading
from typing import Any, Callable

_put_off: list[tuple[Callable[..., Any], ssl.SSLContext, tuple[Any, ...]]] = []
_lock = threading.Lock()


def import_aiohttp() -> None:
    """Import aiohttp with the certificate loads of its TLS contexts put off (nothing to
    do when it is imported already)."""
    if "aiohttp" in sys.modules:
        return
    cls = ssl.SSLContext
    default_certs, verify_paths = cls.load_default_certs, cls.set_default_verify_paths

    def put_off_default_certs(self: ssl.SSLContext, purpose: Any = ssl.Purpose.SERVER_AUTH):
        _put_off.append((default_certs, self, (purpose,)))

    def put_off_verify_paths(self: ssl.SSLContext) -> None:
        _put_off.append((verify_paths, self, ()))

    cls.load_default_certs = put_off_default_certs  # type: ignore[method-assign]
    cls.set_default_verify_paths = put_off_verify_paths  # type: ignore[method-assign]
    try:
        import aiohttp  # noqa: F401
    finally:
        cls.load_default_certs = default_certs  # type: ignore[method-assign]
        cls.set_default_verify_paths = verify_paths  # type: ignore[method-assign]


def load_certificates() -> None:
    """Make the loads put off, once (a caller meanwhile waits for them to be made)."""
    with _lock:
        while _put_off:
            load, context, args = _put_off.pop(0)
            load(context, *args)


def load_certificates_in_background(done: Callable[[], None] | None = None) -> None:
    """Start making the loads in a thread (OpenSSL's loading does not hold the GIL);
    ``done`` is called in it after them.

    Not a daemon: a process that ends meanwhile waits for it (a tenth of a second) rather
    than tearing OpenSSL down under a thread that is inside it (which crashed it)."""

    def load() -> None:
        load_certificates()
        if done is not None:
            done()

    threading.Thread(target=load, name="cog-certificates").start()


def certificates_put_off() -> int:
    """How many loads are still put off (for tests)."""
    return len(_put_off)
