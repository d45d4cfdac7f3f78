"""Which cog server the CLI talks to: --remote, then $COG_REMOTE, then the saved one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from cog.cli.output import CLIError

DEFAULT_REMOTE = "http://localhost:8080"


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "cog" / "config.json"


def _read_saved() -> dict:
    try:
        return json.loads(config_path().read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot read {config_path()}: {exc}") from None


def normalize(url: str) -> str:
    if "://" not in url:
        url = f"http://{url}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CLIError(f"not a server URL: {url!r} (expected e.g. http://10.1.2.3:8080)")
    return url.rstrip("/")


def save_remote(url: str) -> str:
    url = normalize(url)
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = _read_saved()
    settings["remote"] = url
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as tmp:
        json.dump(settings, tmp, indent=2)
    os.replace(tmp.name, path)
    return url


def current_remote(override: str | None = None) -> tuple[str, str]:
    """The server URL and where it came from."""
    if override:
        return normalize(override), "--remote"
    if os.environ.get("COG_REMOTE"):
        return normalize(os.environ["COG_REMOTE"]), "$COG_REMOTE"
    saved = _read_saved().get("remote")
    if saved:
        return normalize(saved), str(config_path())
    return DEFAULT_REMOTE, "default"
