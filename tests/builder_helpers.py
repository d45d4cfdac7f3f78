"""Building example packages for builder tests: real directories, real zips, real configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cog.builders import BuildEvent, BuildLog, BuildRequest, BuiltImage
from cog.config import Config, DirectoryFiles, complete_config, load_config, validate_config
from cog.package import short_id, write_package
from cog.server.source import static_signature

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def copy_example(name: str, dest: Path) -> Path:
    target = dest / name
    shutil.copytree(EXAMPLES / name, target)
    return target


def load_dir(root: Path) -> Config:
    files = DirectoryFiles(root)
    config = load_config((root / "cog.yaml").read_text())
    validate_config(config, files)
    return complete_config(config, files)


def package_request(
    root: Path, zip_path: Path, registry: str, *, target: str = "cpu"
) -> BuildRequest:
    """A BuildRequest for the model directory root, zipped to zip_path."""
    with open(zip_path, "wb") as out:
        package_id = write_package(root, out)
    config = load_dir(root)
    module, _, class_name = config.model.partition(":")
    signature = static_signature((root / module).read_text(), class_name)
    name = config.name or "cog-test"
    suffix = "" if target == "cpu" else f"-{target}"
    return BuildRequest(
        package_id=package_id,
        package_zip=zip_path,
        config=config,
        target=target,
        image=f"{registry}/{name}:{short_id(package_id)}{suffix}",
        signature_json=json.dumps(signature.to_json()) if signature else None,
    )


async def iterate(items):
    """A list's items as an async iterator (events gathered already, collected again)."""
    for item in items:
        yield item


async def collect(events) -> tuple[list[BuildLog], list[BuiltImage]]:
    logs: list[BuildLog] = []
    built: list[BuiltImage] = []
    async for event in events:
        if isinstance(event, BuildLog):
            logs.append(event)
        elif isinstance(event, BuiltImage):
            built.append(event)
    return logs, built


def lines(logs: list[BuildEvent]) -> list[str]:
    return [event.line for event in logs if isinstance(event, BuildLog)]
