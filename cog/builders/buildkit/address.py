"""BuildKit addresses (``tcp://``, ``unix://``, ``docker-grpc://``) parsed into :class:`Address`."""

from __future__ import annotations

import ipaddress
import os
import urllib.parse

import attrs

from cog.builders import BuilderConfigError
from cog.engine.client import engine_address


@attrs.frozen
class Address:
    """Where BuildKit is, parsed from the operator's address."""

    #: as written (messages name the builder with it)
    text: str
    #: tcp, unix or docker-grpc
    scheme: str
    #: grpcio target for tcp/unix ("host:port", "unix:///path"); "" for docker-grpc
    target: str = ""
    #: host of a tcp address or of a tcp engine (to tell local from remote)
    host: str | None = None
    #: docker-grpc: the engine, "unix:///path" or "tcp://host:port"
    engine: str | None = None

    @property
    def is_local(self) -> bool:
        """Can BuildKit reach this machine's 127.0.0.1 (the default context URL)?"""
        return self.host is None or _is_loopback(self.host)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_address(text: str, docker_host: str | None = None) -> Address:
    """Parse a BuildKit address; BuilderConfigError for anything else."""
    url = urllib.parse.urlsplit(text)
    if url.scheme == "tcp":
        if not url.hostname or not url.port:
            raise BuilderConfigError(f"BuildKit address {text!r}: expected tcp://HOST:PORT")
        host = url.hostname if ":" not in url.hostname else f"[{url.hostname}]"
        return Address(text, "tcp", target=f"{host}:{url.port}", host=url.hostname)
    if url.scheme == "unix":
        path = url.netloc + url.path
        if not path.startswith("/"):
            raise BuilderConfigError(f"BuildKit address {text!r}: expected unix:///ABSOLUTE/PATH")
        return Address(text, "unix", target=f"unix://{path}")
    if url.scheme == "docker-grpc":
        if url.path and not url.netloc:
            engine = f"unix://{url.path}"
        elif url.netloc:
            engine = f"tcp://{url.netloc}"
        else:
            engine = engine_address(docker_host)
        return Address(text, "docker-grpc", engine=engine, host=_engine_host(engine, text))
    raise BuilderConfigError(
        f"BuildKit address {text!r}: use tcp://HOST:PORT, unix:///PATH or docker-grpc://[ENGINE]"
    )


def _engine_host(engine: str, text: str) -> str | None:
    url = urllib.parse.urlsplit(engine)
    if url.scheme == "unix":
        return None
    if url.scheme in ("tcp", "http") and url.hostname and url.port:
        if os.environ.get("DOCKER_TLS_VERIFY"):
            raise BuilderConfigError(
                f"BuildKit address {text!r}: the engine {engine} wants TLS, which docker-grpc "
                "does not do; run a buildkitd and use tcp:// with --buildkit-tls-*"
            )
        return url.hostname
    raise BuilderConfigError(
        f"BuildKit address {text!r}: engine {engine!r} is neither unix:///PATH nor tcp://HOST:PORT"
    )
