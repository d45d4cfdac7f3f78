"""What an attack sweep sent, each refused as the uploader's 400 with a message, before
anything is stored or built: configs built to cost CPU and memory, names and paths that
would mean something else later, values that would only fail at build time.

Real app, real local storage (store-only: every one of these is refused before a build
would start; the build-time defects they stood for are in the messages)."""

from __future__ import annotations

import json

import pytest

from cog.builders import BuilderSettings
from cog.server.app import ServerSettings, make_app
from cog.server.keys import STORAGE
from tests.registry_helpers import form, nothing_spooled, raw_zip, stored_keys

MODEL = """\
import cog


class Model(cog.Model):
    @cog.input("text", type=str)
    def run(self, text):
        return text
"""
HEAD = "model: infer.py:Model\nenvironment:\n  python_version: '3.11'\n"
PREDICTOR = """\
from cog import BasePredictor, Input


class Predictor(BasePredictor):
    def predict(self, text: str = Input()) -> str:
        return text
"""


def package(cog_yaml: str, **files: str | bytes) -> bytes:
    return raw_zip({"cog.yaml": cog_yaml, "infer.py": MODEL, **files})


def examples(count: int) -> str:
    return "examples:\n" + "".join(
        f"  - input: {{text: t{i}}}\n    output: t{i}\n" for i in range(count)
    )


def nested(depth: int) -> str:
    return "model: infer.py:Model\nextra: " + "[" * depth + "]" * depth + "\n"


def laughs() -> str:
    """The billion laughs: nine levels of aliases, each ten of the one before (about 1 KB
    of YAML for 10^9 values once expanded)."""
    lines = [HEAD, 'anchors:\n  - &a0 ["lol"]\n']
    for level in range(1, 10):
        lines.append(f"  - &a{level} [{', '.join([f'*a{level - 1}'] * 10)}]\n")
    return "".join(lines) + "examples: *a9\n"


HOSTILE = {
    "a cog.yaml of 8 MB": (
        package(HEAD + examples(180_000)),
        "MiB; at most 256.0 KiB",
    ),
    "more examples than a check runs": (
        package(HEAD + examples(101)),
        "examples: 101 examples; at most 100",
    ),
    "YAML nested 10,000 deep": (package(nested(10_000)), "nest"),
    "YAML nested 21 deep": (package(nested(21)), "nested more than 20 deep"),
    "YAML aliases that expand a billion times": (
        package(laughs()),
        "values once its aliases are expanded",
    ),
    "model source nested past the parser": (
        package(HEAD, **{"infer.py": MODEL + "x = " + "1 + " * 100_000 + "1\n"}),
        "model: infer.py nests deeper than the server reads",
    ),
    "today's cog.yaml nested 10,000 deep": (
        raw_zip(
            {
                "cog.yaml": "predict: predict.py:Predictor\nbuild:\n  python_packages: "
                + "[" * 10_000
                + "]" * 10_000
                + "\n",
                "predict.py": PREDICTOR,
            }
        ),
        "nest",
    ),
    "a predictor's annotation nested past the source reader": (
        raw_zip(
            {
                "cog.yaml": "predict: predict.py:Predictor\nbuild:\n  python_version: '3.11'\n",
                "predict.py": PREDICTOR.replace("text: str", "text: " + " | ".join(["str"] * 900)),
            }
        ),
        "predict.py nests deeper than the server reads",
    ),
    "a model file of 2 MiB": (
        package(HEAD, **{"infer.py": MODEL + "#" * (2 * 1024 * 1024) + "\n"}),
        "model: infer.py is 2.0 MiB; the model's own file may be at most 1.0 MiB",
    ),
    "an example file through ..": (
        package(HEAD + "examples:\n  - input: {text: '@a/../cog.yaml'}\n", **{"a/x": "x"}),
        "examples[0].input.text: 'a/../cog.yaml' must be a plain path inside the package",
    ),
    "an expected file through ..": (
        package(HEAD + "examples:\n  - input: {text: hi}\n    output: '@a/../cog.yaml'\n"),
        "examples[0].output: 'a/../cog.yaml' must be a plain path inside the package",
    ),
    "a requirements name Docker reads as a pattern": (
        package(HEAD + "  python_requirements: '[r].txt'\n", **{"[r].txt": "", "r.txt": ""}),
        "environment.python_requirements: '[r].txt' has characters a Dockerfile reads as a "
        "pattern or a variable",
    ),
    "a requirements path with a dot part": (
        package(HEAD + "  python_requirements: './r.txt'\n", **{"r.txt": ""}),
        "environment.python_requirements: './r.txt' must be a plain path inside the package",
    ),
    "a name of 300 characters": (
        package("name: " + "a" * 300 + "\n" + HEAD),
        "name: 300 characters; an image name may have at most 255",
    ),
    "a Python that does not exist": (
        package(HEAD.replace("'3.11'", "'3.99999999999999999999'")),
        "environment.python_version: '3.99999999999999999999' must look like \"3.11\"",
    ),
}


@pytest.fixture
async def client(aiohttp_client, tmp_path):
    settings = ServerSettings(
        storage_url=f"file://{tmp_path / 'store'}",
        builder=None,
        builder_settings=BuilderSettings(registry="registry.example.com:5000"),
        tmp_dir=tmp_path / "spool",
        max_upload_bytes=64 * 1024 * 1024,
    )
    return await aiohttp_client(make_app(settings))


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_a_hostile_upload_is_the_uploaders_400(client, tmp_path, case):
    data, words = HOSTILE[case]
    response = await client.post("/v1/packages/upload", data=form(data))
    body = await response.json()
    assert response.status == 400, body
    assert words in body["error"], body["error"]
    assert await stored_keys(client.app[STORAGE]) == []
    await nothing_spooled(tmp_path / "spool")


async def test_a_name_too_long_behind_the_registry_is_refused_at_upload(aiohttp_client, tmp_path):
    """A server that builds names its images <registry>/<name>: too long for a registry
    (over 255) is the uploader's 400 now, not a failed push later."""
    from tests.test_ingest import GatedBuilder

    settings = ServerSettings(
        storage_url=f"file://{tmp_path / 'store'}",
        builder_settings=BuilderSettings(registry="registry.example.com:5000"),
        tmp_dir=tmp_path / "spool",
    )
    client = await aiohttp_client(make_app(settings, builder=GatedBuilder()))
    data = package("name: " + "a" * 250 + "\n" + HEAD)
    response = await client.post("/v1/packages/upload", data=form(data))
    assert response.status == 400
    assert (
        "name: registry.example.com:5000/aaaaaaaaaaaaaa... (276 characters) is longer than a "
        "registry takes (255); choose a shorter name"
    ) in (await response.json())["error"]
    assert await stored_keys(client.app[STORAGE]) == []


async def test_a_listing_carries_summaries_not_configs(client):
    data = package(HEAD + examples(100))
    document = await (await client.post("/v1/packages/upload", data=form(data))).json()
    assert len(document["Config"]["Examples"]) == 100
    listing = await (await client.get("/v1/packages/")).json()
    assert listing == [
        {key: document[key] for key in ("ID", "Name", "Status", "Created", "Updated", "Size",
                                         "Artifacts", "Error", "UploadedBy")}
    ]  # fmt: skip
    shown = await (await client.get(f"/v1/packages/{document['ID']}")).json()
    assert shown == document
    assert len(json.dumps(listing)) < 1000
