"""The example models in examples/: each cog.yaml's `examples:` run against the server.

Test dependency: the thumbnail example needs the Pillow version its cog.yaml pins
(``pip install pillow==11.3.0``), because its expected PNG is compared byte for byte.
"""

from __future__ import annotations

import io
import json
import pathlib

import aiohttp
import pytest
import yaml

from cog.model import signature_of
from cog.runtime import InferenceServer
from cog.runtime.model_ref import ModelRef
from cog.server.source import static_signature

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_DIRS = sorted(p.parent for p in EXAMPLES.glob("*/cog.yaml"))


def load_config(directory):
    with open(directory / "cog.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)


def require_pinned_packages(config):
    for requirement in config.get("environment", {}).get("python_packages", []):
        name, _, version = requirement.partition("==")
        if name.lower() == "pillow":
            try:
                import PIL
            except ImportError:
                pytest.fail(f"test dependency missing: pip install {requirement}")
            assert PIL.__version__ == version, (
                f"the example pins {requirement} (its expected output is byte-exact); "
                f"this environment has Pillow {PIL.__version__}"
            )


def example_form(directory, inputs):
    writer = aiohttp.MultipartWriter("form-data")
    for name, value in inputs.items():
        value = str(value)
        if value.startswith("@"):
            path = directory / value[1:]
            part = writer.append(io.BytesIO(path.read_bytes()))
            part.set_content_disposition("form-data", name=name, filename=path.name)
        else:
            part = writer.append(value)
            part.set_content_disposition("form-data", name=name)
    return writer


def test_there_are_three_examples():
    assert {d.name for d in EXAMPLE_DIRS} >= {"hello", "thumbnail", "sentiment"}


@pytest.mark.parametrize("directory", EXAMPLE_DIRS, ids=lambda d: d.name)
def test_example_config_follows_the_schema(directory):
    config = load_config(directory)
    assert set(config) <= {"name", "model", "environment", "examples"}
    assert config["environment"]["python_version"] == "3.11"
    assert config["environment"]["architectures"] == ["cpu"]
    for requirement in config["environment"].get("python_packages", []):
        assert "==" in requirement, "example packages are pinned"
    assert config["examples"], "every example model lists examples"
    for example in config["examples"]:
        assert set(example) == {"input", "output"}
        for value in [*example["input"].values(), example["output"]]:
            assert isinstance(value, str)
            if value.startswith("@"):
                assert (directory / value[1:]).is_file(), value


@pytest.mark.parametrize("directory", EXAMPLE_DIRS, ids=lambda d: d.name)
def test_static_signature_equals_the_served_one(directory, monkeypatch):
    config = load_config(directory)
    require_pinned_packages(config)
    monkeypatch.syspath_prepend(str(directory))
    ref = ModelRef.from_directory(str(directory))
    source = (directory / ref.file).read_text(encoding="utf-8")
    static = static_signature(source, ref.class_name, ref.file)
    assert static is not None, "example inputs must be readable without importing the model"
    assert static.to_json() == signature_of(ref.load()).to_json()


@pytest.mark.parametrize("directory", EXAMPLE_DIRS, ids=lambda d: d.name)
async def test_example_inferences(directory, aiohttp_client, monkeypatch, tmp_path):
    config = load_config(directory)
    require_pinned_packages(config)
    monkeypatch.syspath_prepend(str(directory))
    monkeypatch.chdir(directory)  # as in the image: the package is the working directory
    server = InferenceServer.from_directory(".")
    client = await aiohttp_client(server.app)
    await server.runner.wait_started()
    assert (await client.get("/ping")).status == 200, server.runner.error
    for example in config["examples"]:
        response = await client.post("/infer", data=example_form(directory, example["input"]))
        body = await response.read()
        assert response.status == 200, body
        expected = example["output"]
        if expected.startswith("@"):
            assert body == (directory / expected[1:]).read_bytes(), example
        elif response.content_type == "application/json":
            assert json.loads(body) == json.loads(expected), example
        else:
            assert body.decode("utf-8") == expected, example
