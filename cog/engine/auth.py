"""Registry credentials, read as Docker reads them, for the engine's pushes and pulls.

The file is Docker's own config (``$DOCKER_CONFIG/config.json``, else
``~/.docker/config.json``, as ``docker login`` writes it) or any file in its format
(``cog server --registry-auth FILE``). Only its ``auths`` are used: for each registry,
``auth`` (base64 of ``user:password``), or ``username`` and ``password``, or an
``identitytoken``. Credential helpers (``credsStore``, ``credHelpers``) are programs
cog does not run: write the registry's entry into ``auths`` (or a file of its own).

The file is read at each push and pull, as the docker CLI does: a ``docker login`` done
while the server runs counts at once. What goes to the engine is its ``X-Registry-Auth``
header: base64url JSON of the credentials and the registry's address.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: the anonymous X-Registry-Auth: "{}" in base64
ANONYMOUS = "e30="
#: the key Docker uses for Docker Hub
DOCKER_HUB = "https://index.docker.io/v1/"


class RegistryAuthError(Exception):
    """A credentials file that cannot be used."""


def docker_config_path() -> Path:
    """Docker's own config: $DOCKER_CONFIG/config.json, else ~/.docker/config.json."""
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def registry_of(image: str) -> str:
    """The registry an image reference names, as Docker reads it: the first part when it
    has a dot or a port or is localhost, else Docker Hub."""
    first, sep, _ = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return DOCKER_HUB


def _host(key: str) -> str:
    """An ``auths`` key (``https://host:5000/v1/``, ``host:5000``) as the bare host[:port]."""
    if key == DOCKER_HUB or key.rstrip("/") in ("index.docker.io", "docker.io"):
        return DOCKER_HUB
    text = key.split("://", 1)[-1]
    return text.split("/", 1)[0]


def _entry(key: str, value: Any, source: str) -> dict[str, str]:
    """One ``auths`` entry as the engine's credentials (username/password or token)."""
    where = f"{source}: auths[{key!r}]"
    if not isinstance(value, Mapping):
        raise RegistryAuthError(f"{where} is not an object")
    if value.get("identitytoken"):
        return {"identitytoken": str(value["identitytoken"])}
    username, password = value.get("username"), value.get("password")
    if value.get("auth"):
        try:
            decoded = base64.b64decode(str(value["auth"]), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise RegistryAuthError(f"{where}.auth is not base64 of user:password") from None
        username, sep, password = decoded.partition(":")
        if not sep:
            raise RegistryAuthError(f"{where}.auth is not base64 of user:password")
    if not username or password is None:
        raise RegistryAuthError(f"{where} has no auth, username/password or identitytoken")
    return {"username": str(username), "password": str(password)}


def read_credentials(path: Path, *, required: bool) -> dict[str, dict[str, str]]:
    """host[:port] -> credentials, from a Docker config file. A missing file is no
    credentials unless required (a file the operator named)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if required:
            raise RegistryAuthError(f"registry credentials file {path} does not exist") from None
        return {}
    except OSError as exc:
        raise RegistryAuthError(f"cannot read registry credentials {path}: {exc}") from None
    try:
        document = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise RegistryAuthError(f"{path} is not JSON: {exc}") from None
    auths = document.get("auths") if isinstance(document, dict) else None
    if auths is None:
        return {}
    if not isinstance(auths, dict):
        raise RegistryAuthError(f"{path}: auths is not an object")
    return {_host(key): _entry(key, value, str(path)) for key, value in auths.items()}


class RegistryAuth:
    """Where an engine's pushes and pulls find their credentials: the file named, else
    Docker's own config (see the module docstring)."""

    def __init__(self, path: Path | None = None):
        self.path = path

    def check(self) -> None:
        """Read the file now: RegistryAuthError for one that cannot be used (at start)."""
        self.credentials()

    def credentials(self) -> dict[str, dict[str, str]]:
        if self.path is not None:
            return read_credentials(self.path, required=True)
        return read_credentials(docker_config_path(), required=False)

    def source(self) -> str:
        return str(self.path or docker_config_path())

    def header(self, image: str) -> str:
        """The X-Registry-Auth value for a push or pull of image."""
        registry = registry_of(image)
        found = self.credentials().get(registry)
        if found is None:
            return ANONYMOUS
        document = {**found, "serveraddress": registry}
        return base64.urlsafe_b64encode(json.dumps(document).encode()).decode()

    def has_credentials(self, image: str) -> bool:
        return registry_of(image) in self.credentials()
