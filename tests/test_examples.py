"""The example models in examples/: each 2021 cog.yaml's `examples:` run against the
runtime, and today's Cog example driven through `/predictions` as a Cog client would.

Test dependency: the thumbnail example needs the Pillow version its cog.yaml pins
(``pip install pillow==11.3.0``), because its expected PNG is compared byte for byte.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import pathlib

import aiohttp
import pytest
import yaml

from cog.model import signature_of
from cog.predictor import predictor_signature
from cog.runtime import InferenceServer
from cog.runtime.model_ref import ModelRef
from cog.server.source import static_signature

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_config(directory):
    with open(directory / "cog.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)


ALL_DIRS = sorted(p.parent for p in EXAMPLES.glob("*/cog.yaml"))
#: Models written for Cog in 2021 (`model:`, `examples:`) ...
EXAMPLE_DIRS = [d for d in ALL_DIRS if "model" in load_config(d)]
#: ... and for today's Cog (`build:`, `predict:`).
PREDICTOR_DIRS = [d for d in ALL_DIRS if "predict" in load_config(d)]


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


def test_every_example_is_of_one_format_or_the_other():
    assert {d.name for d in EXAMPLE_DIRS} >= {"hello", "thumbnail", "sentiment"}
    assert {d.name for d in PREDICTOR_DIRS} >= {"wordcount"}
    assert sorted(EXAMPLE_DIRS + PREDICTOR_DIRS) == ALL_DIRS


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


# --- today's Cog --------------------------------------------------------------------------


def test_the_predictor_example_is_read_from_source_as_at_import():
    directory = EXAMPLES / "wordcount"
    config = load_config(directory)
    assert set(config) <= {"build", "predict", "image"}
    file, _, class_name = config["predict"].partition(":")
    spec = importlib.util.spec_from_file_location("example_wordcount", directory / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    imported = predictor_signature(getattr(module, class_name))
    static = static_signature((directory / file).read_text(encoding="utf-8"), class_name, file)
    assert static == imported
    assert list(imported.to_json()["arguments"]) == ["text", "document", "top", "skip_common"]


async def test_the_predictor_example_answers_predictions(aiohttp_client):
    directory = EXAMPLES / "wordcount"
    server = InferenceServer.from_directory(str(directory))
    client = await aiohttp_client(server.app)
    await server.runner.wait_started()
    health = await (await client.get("/health-check")).json()
    assert health["status"] == "READY", health

    text = "The cat and the hat; the cat's hat, the cat."
    body = await (await client.post("/predictions", json={"input": {"text": text}})).json()
    assert body["status"] == "succeeded", body
    assert body["output"] == {"words": 10, "distinct": 5, "top": ["cat", "hat", "cat's"]}

    poem = (directory / "poem.txt").read_bytes()
    document = "data:text/plain;base64," + base64.b64encode(poem).decode()
    answer = await client.post(
        "/predictions", json={"input": {"document": document, "top": 1, "skip_common": False}}
    )
    body = await answer.json()
    assert body["status"] == "succeeded", body
    assert body["output"] == {"words": 21, "distinct": 18, "top": ["on"]}

    response = await client.post("/predictions", json={"input": {"top": 99}})
    assert response.status == 422
    detail = (await response.json())["detail"]
    assert [problem["loc"] for problem in detail] == [["body", "input", "top"]], detail
