"""cog.yaml in today's Cog format (build:, predict:): one config model with the 2021 one."""

from __future__ import annotations

import pytest

from cog.config import (
    ConfigError,
    check_config,
    load_config,
)
from cog.config_wire import config_from_json, config_to_json

PREDICTOR = "from cog import BasePredictor\n\nclass Predictor(BasePredictor):\n    pass\n"


class Files:
    def __init__(self, files):
        self.files = files

    def exists(self, path):
        return path in self.files

    def read_text(self, path):
        return self.files[path]


TODAY = """
build:
  python_version: "3.11.4"
  gpu: true
  python_packages: ["torch==2.1.0"]
  python_requirements: requirements.txt
  system_packages: [ffmpeg]
  cuda: "12.1"
  run:
    - echo one
    - command: echo two
predict: "predict.py:Predictor"
image: "acme/upscaler"
concurrency:
  max: 4
environment:
  - HF_HOME=/src/cache
  - EMPTY=
"""


def problems_of(text, files=None):
    with pytest.raises(ConfigError) as info:
        check_config(text, Files(files or {"predict.py": PREDICTOR}))
    return list(info.value.problems)


def test_todays_format_maps_onto_the_one_config_model():
    warnings: list[str] = []
    config = load_config(TODAY, warnings=warnings)
    assert warnings == []
    assert config.model == "predict.py:Predictor"
    assert config.name == "acme/upscaler"
    assert config.concurrency == 4
    assert config.variables == ("HF_HOME=/src/cache", "EMPTY=")
    env = config.environment
    assert env.python_version == "3.11"  # Cog takes a patch version; images are per minor
    assert env.architectures == ("cpu", "gpu")
    assert env.python_packages == ("torch==2.1.0",)
    assert env.system_packages == ("ffmpeg",)
    assert env.cuda == "12.1"
    assert env.run == ("echo one", "echo two")
    assert config_from_json(config_to_json(config)) == config
    doc = config_to_json(config)
    assert doc["Model"] == "predict.py:Predictor"
    assert doc["Format"] == "predict"
    assert doc["Concurrency"] == 4
    assert doc["Environment"]["Run"] == ["echo one", "echo two"]


def test_run_is_predicts_newer_name_and_gpu_false_builds_cpu_only():
    config = load_config('run: "run.py:Runner"\nbuild:\n  gpu: false\n')
    assert config.model == "run.py:Runner"
    assert config.environment.architectures == ("cpu",)
    assert config.concurrency == 1


def test_a_2021_config_keeps_the_seeds_document():
    doc = config_to_json(load_config("model: infer.py:Model\n"))
    assert set(doc) == {"Name", "Model", "Environment", "Examples"}
    assert "Run" not in doc["Environment"]


def test_newer_keys_and_train_are_warnings():
    warnings: list[str] = []
    config = load_config(
        "predict: p.py:P\ntrain: t.py:train\nbuild:\n  sdk_version: '0.18'\n  cog_runtime: true\n"
        "concurrency: {max: 2, default_target: 1}\nweights: []\n",
        warnings=warnings,
    )
    assert config.concurrency == 2
    assert sorted(warnings) == [
        "build.cog_runtime: not supported by this cog server; ignored",
        "build.sdk_version: not supported by this cog server; ignored",
        "concurrency.default_target: not supported by this cog server; ignored",
        "train: training (/trainings) is not supported yet; ignored",
        "weights: not supported by this cog server; ignored",
    ]


@pytest.mark.parametrize(
    "text",
    [
        "model: infer.py:Model\nbuild: {}\n",
        "predict: p.py:P\nexamples: []\n",
        "name: a/b\nimage: a/b\npredict: p.py:P\n",
    ],
)
def test_mixing_the_formats_is_one_clear_error(text):
    with pytest.raises(ConfigError) as info:
        load_config(text)
    (problem,) = info.value.problems
    assert problem.startswith("cog.yaml mixes two formats: ")
    assert "use one of them" in problem


def test_a_2021_config_cannot_use_todays_fields():
    with pytest.raises(ConfigError) as info:
        load_config("model: m.py:M\nenvironment:\n  run: [ls]\n")
    assert info.value.problems == ("environment: unknown key: run (a key of today's build:)",)


def test_problems_name_the_keys_as_the_file_spells_them():
    problems = problems_of(
        "predict: nothing\nimage: Bad Name\nbuild:\n  gpu: yes please\n"
        "  python_packages: [torch]\n  python_version: '2.7'\n  system_packages: [5]\n"
        "  run: [{command: ls, mounts: [{type: secret}]}, 7]\n"
        "concurrency: {max: 0}\nenvironment: [NOEQUALS, A=1, A=2]\n"
    )
    assert problems == [
        "build.gpu: expected true or false, got a string",
        "build.run[0].mounts: secret mounts are not supported by this cog server",
        "build.run[1]: expected a command, got an integer",
        "concurrency: expected {max: N}, N a whole number of 1 or more",
        "environment[0]: 'NOEQUALS' is not NAME=value",
        "environment[2]: A is set twice",
        "build.system_packages: item 1: expected a string, got an integer",
    ]
    problems = problems_of(
        "predict: nothing\nimage: Bad Name\nbuild:\n  python_packages: ['--index-url=x']\n"
    )
    assert problems == [
        "image: 'Bad Name' is not a valid image name (lowercase letters, digits, '.', '_', "
        "'-' and '/' between parts, e.g. 'acme/colorizer')",
        "predict: 'nothing' must be 'file.py:ClassName', e.g. 'infer.py:Model'",
        "build.python_packages[0]: '--index-url=x' is not a requirement "
        "(name[extras] and version specifiers, or a git+https:// URL)",
    ]


def test_todays_python_packages_take_any_requirement_as_cog_does():
    """Cog passes build.python_packages to pip as they are (its own test projects list
    `pydantic>=1.10.0`); a 2021 cog.yaml keeps its rule: pinned."""
    today = (
        "predict: predict.py:Predictor\nbuild:\n  python_packages:\n"
        "    - pydantic>=1.10.0\n    - torch\n    - numpy>=1.2,<2\n"
        "    - requests[socks]~=2.31\n    - \"pywin32; sys_platform == 'win32'\"\n"
    )
    config = check_config(today, Files({"predict.py": PREDICTOR}))
    assert config.environment.python_packages[0] == "pydantic>=1.10.0"
    assert problems_of(
        "predict: predict.py:Predictor\nbuild:\n  python_packages: ['x>=1 && rm -rf /']\n"
    ) == [
        "build.python_packages[0]: 'x>=1 && rm -rf /' is not a requirement "
        "(name[extras] and version specifiers, or a git+https:// URL)"
    ]


def test_predict_is_required_and_must_name_a_class_in_the_package():
    assert problems_of("build: {python_version: '3.11'}\n") == ["predict: is required"]
    assert problems_of("predict: predict.py:Missing\n") == [
        "predict: predict.py defines no class Missing (it defines Predictor)"
    ]
    config = check_config("predict: predict.py:Predictor\n", Files({"predict.py": PREDICTOR}))
    assert config.format == "predict"
