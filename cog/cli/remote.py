"""Which cog server the CLI talks to (--remote, then $COG_REMOTE, then the saved one), and
the token it sends there ($COG_TOKEN, else the one `cog login` saved for that server).

Both are saved in one JSON file under $XDG_CONFIG_HOME/cog, readable by its owner only
(mode 0600: it holds tokens)."""

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


def _write_saved(settings: dict) -> None:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # A new file each time (mode 0600 from mkstemp), moved over the old one: never a
    # moment where the tokens are readable by others or half written.
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as tmp:
        os.chmod(tmp.name, 0o600)
        json.dump(settings, tmp, indent=2)
    os.replace(tmp.name, path)


def save_remote(url: str) -> str:
    url = normalize(url)
    settings = _read_saved()
    settings["remote"] = url
    _write_saved(settings)
    return url


def _saved_tokens(settings: dict) -> dict[str, str]:
    tokens = settings.get("tokens")
    return tokens if isinstance(tokens, dict) else {}


def save_token(url: str, token: str) -> None:
    """Remember token for the server at url (`cog login`)."""
    settings = _read_saved()
    settings["tokens"] = {**_saved_tokens(settings), normalize(url): token}
    _write_saved(settings)


def forget_token(url: str) -> bool:
    """Forget the token saved for url (`cog logout`); whether there was one."""
    settings = _read_saved()
    tokens = _saved_tokens(settings)
    if normalize(url) not in tokens:
        return False
    del tokens[normalize(url)]
    settings["tokens"] = tokens
    _write_saved(settings)
    return True


def current_token(url: str) -> tuple[str | None, str]:
    """The token to send to url, and where it came from."""
    if os.environ.get("COG_TOKEN"):
        return os.environ["COG_TOKEN"].strip(), "$COG_TOKEN"
    token = _saved_tokens(_read_saved()).get(normalize(url))
    if isinstance(token, str) and token:
        return token, str(config_path())
    return None, "none"


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
