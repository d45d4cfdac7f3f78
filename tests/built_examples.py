"""examples/hello and examples/thumbnail built once per test session by a real `cog server`
(Docker builder, the real registry), into a store that tests then open with servers of
their own (which run the models, without building them again)."""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import pytest

from cog.builders import BuilderSettings
from cog.server.app import ServerSettings
from cog.server.settings import PredictionOptions
from tests.registry_helpers import EXAMPLES, package_bytes, post_package
from tests.test_cli import cog_server


@attrs.frozen
class Built:
    store: Path
    registry: str
    hello: str
    thumbnail: str

    def settings(self, tmp_path: Path, **predictions) -> ServerSettings:
        return ServerSettings(
            storage_url=f"file://{self.store}",
            builder="docker",
            builder_settings=BuilderSettings(registry=self.registry),
            tmp_dir=tmp_path / "spool",
            predictions=PredictionOptions(**predictions),
        )


@pytest.fixture(scope="session")
def built_examples(tmp_path_factory, registry, base_images) -> Built:
    root = tmp_path_factory.mktemp("built")
    ids = {}
    with cog_server(root, dict(os.environ), "--check-timeout", "120") as url:
        for example in ("hello", "thumbnail"):
            data, package_id = package_bytes(EXAMPLES / example)
            status, document = post_package(url, data)
            assert status == 200 and document["Status"] == "ready", document
            ids[example] = package_id
    return Built(root / "store", registry, ids["hello"], ids["thumbnail"])
