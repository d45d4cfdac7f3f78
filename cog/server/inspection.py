"""What the cog server learns from an uploaded package before it stores or builds it.

Blocking (zipfile, YAML, ``ast``): call these in a worker thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from cog.config import Config, ConfigError, check_config, defaults_taken
from cog.package import InvalidPackage, PackageArchive, PackageLimits
from cog.package.scan import ScannedMember
from cog.server.source import static_signature
from cog.signature import SignatureError


@attrs.frozen
class Inspection:
    #: the package's cog.yaml, validated against its files and completed
    config: Config
    #: the model's inputs read from its source ({"arguments": {...}}); None when they
    #: cannot be known without running it (the built image tells)
    signature: dict[str, Any] | None
    #: what cog.yaml says that this server ignores (keys of newer Cog releases)
    warnings: tuple[str, ...] = ()


def inspect_package(path: Path, limits: PackageLimits) -> Inspection:
    """Check an uploaded zip's structure and its cog.yaml, and read the model's inputs.

    Members are read only as far as the config needs: :func:`verify_package` reads the
    rest. Raises InvalidPackage or ConfigError (every problem at once).
    """
    with PackageArchive.open(path, limits, verify=False) as archive:
        warnings: list[str] = []
        config = check_config(archive.read_text("cog.yaml"), archive, warnings=warnings)
        return Inspection(config, _signature(archive, config), tuple(warnings))


def build_notes(path: Path, limits: PackageLimits) -> list[str]:
    """What the build log says first about a stored package: the defaults its cog.yaml
    relies on (the Python it gets when it names none). Nothing for a package that today's
    limits refuse (a rebuild): its build goes on without them."""
    try:
        with PackageArchive.open(path, limits, verify=False) as archive:
            return defaults_taken(archive.read_text("cog.yaml"))
    except InvalidPackage:
        return []


def verify_package(
    path: Path, limits: PackageLimits, scanned: Mapping[int, ScannedMember] | None = None
) -> None:
    """Decompress every member once: InvalidPackage for a corrupt one, or one that expands
    past what its header declares (a lying zip bomb). Members ``scanned`` already
    checked as they arrived are not read again (see PackageArchive.open)."""
    with PackageArchive.open(path, limits, verify=True, scanned=scanned):
        pass


def _signature(archive: PackageArchive, config: Config) -> dict[str, Any] | None:
    """The signature read from the model file without importing it; None if not knowable so.

    Inputs declared wrongly (a default outside min/max, ...) are refused now, before any
    image is built, with the same messages the model would give at import.
    """
    module, _, class_name = config.model.partition(":")
    try:
        signature = static_signature(archive.read_text(module), class_name, filename=module)
    except SignatureError as exc:
        raise ConfigError(exc.problems or (str(exc),)) from None
    except SyntaxError:
        return None
    return signature.to_json() if signature is not None else None
