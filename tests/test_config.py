"""cog.yaml: load, validate, complete, and the wire format."""

from __future__ import annotations

from pathlib import Path

import pytest

from cog import cuda
from cog.config import (
    Config,
    ConfigError,
    DirectoryFiles,
    Environment,
    check_config,
    complete_config,
    defaults_taken,
    load_config,
    validate_config,
)
from cog.config_wire import config_from_json, config_to_json
from cog.requirements import pinned, requirement_specs

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MODEL = "import cog\n\nclass Model(cog.Model):\n    def run(self):\n        return 1\n"


class Files:
    """PackageFiles over a dict, for validate/complete without touching the disk."""

    def __init__(self, files: dict[str, str]):
        self.files = files

    def exists(self, path: str) -> bool:
        return path in self.files

    def read_text(self, path: str) -> str:
        return self.files[path]


def problems_of(text: str, files: dict[str, str] | None = None) -> list[str]:
    files = {"infer.py": MODEL, **(files or {})}
    with pytest.raises(ConfigError) as caught:
        check_config(text, Files(files))
    return list(caught.value.problems)


@pytest.mark.parametrize("name", ["hello", "thumbnail", "sentiment"])
def test_examples_are_valid_and_round_trip(name):
    root = EXAMPLES / name
    files = DirectoryFiles(root)
    config = load_config((root / "cog.yaml").read_text())
    validate_config(config, files)
    config = complete_config(config, files)
    assert config.name == f"examples/{name}"
    assert config_from_json(config_to_json(config)) == config


def test_wire_format_is_the_seeds():
    config = load_config("name: a/b\nmodel: infer.py:Model\n")
    assert config_to_json(config) == {
        "Name": "a/b",
        "Environment": {
            "PythonVersion": "3.8",
            "PythonRequirements": "",
            "PythonPackages": None,
            "SystemPackages": None,
            "Architectures": ["cpu"],
            "CUDA": "",
            "CuDNN": "",
        },
        "Model": "infer.py:Model",
        "Examples": None,
    }


def test_defaults():
    config = load_config("model: infer.py:Model\n")
    assert config == Config(model="infer.py:Model", environment=Environment())
    assert config.environment.python_version == "3.8"  # Cog 2021's, for its models
    assert config.environment.architectures == ("cpu",)


@pytest.mark.parametrize(
    ("text", "notes"),
    [
        ("model: infer.py:Model\n", ["python_version not set: using 3.8, Cog's default"]),
        (
            "model: infer.py:Model\nenvironment:\n",
            ["python_version not set: using 3.8, Cog's default"],
        ),
        (
            "model: infer.py:Model\nenvironment:\n  python_packages: [pillow==8.2.0]\n",
            ["python_version not set: using 3.8, Cog's default"],
        ),
        ("model: infer.py:Model\nenvironment:\n  python_version: '3.8'\n", []),
        ("model: infer.py:Model\nenvironment:\n  python_version: '3.11'\n", []),
        # today's Cog (build: and predict:) has a default of its own
        (
            "build:\n  gpu: false\npredict: predict.py:Predictor\n",
            ["python_version not set: using 3.13, Cog's default"],
        ),
        ("predict: predict.py:Predictor\n", ["python_version not set: using 3.13, Cog's default"]),
        ("build:\n  python_version: '3.11'\npredict: predict.py:Predictor\n", []),
    ],
)
def test_the_default_python_is_named_for_the_build_log(text, notes):
    assert defaults_taken(text) == notes


@pytest.mark.parametrize(
    ("version", "problem"),
    [
        ("3.99", "3.99 is no CPython release (the newest is 3.15)"),
        ("3.16", "3.16 is no CPython release (the newest is 3.15)"),
        ("4", "4 is no CPython release (the newest is 3.15)"),
        ("4.0", "4.0 is no CPython release (the newest is 3.15)"),
        ("3.999999", "3.999999 is no CPython release (the newest is 3.15)"),
        ("3.8.10", "'3.8.10': give the major and minor version only, e.g. \"3.8\""),
        ("3", "'3': give the major and minor version only, e.g. \"3.15\""),
        ("3.7", "3.7 is older than the cog runtime supports (3.8 or newer)"),
        ("2.7", "2.7 is older than the cog runtime supports (3.8 or newer)"),
        ("three", "'three' must look like \"3.11\" (major.minor)"),
    ],
)
def test_a_python_version_must_be_a_cpython_release(version, problem):
    text = f"model: infer.py:Model\nenvironment:\n  python_version: '{version}'\n"
    assert problems_of(text) == [f"environment.python_version: {problem}"]


@pytest.mark.parametrize("version", ["3.8", "3.9", "3.10", "3.11", "3.12", "3.13", "3.14", "3.15"])
def test_every_cpython_release_the_runtime_runs_on_is_taken(version):
    text = f"model: infer.py:Model\nenvironment:\n  python_version: '{version}'\n"
    assert check_config(text, Files({"infer.py": MODEL})).environment.python_version == version


def test_example_values_become_text():
    config = load_config(
        "model: infer.py:Model\nexamples:\n  - input: {n: 3, x: 1.5, flag: true}\n    output: 4\n"
    )
    assert config.examples[0].input == {"n": "3", "x": "1.5", "flag": "true"}
    assert config.examples[0].output == "4"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model: [unclosed\n", "line 2, column 1"),
        ("", "empty"),
        ("- just\n- a list\n", "expected a mapping"),
        ("name: x\n", "model: is required"),
        ("model: infer.py:Model\nbogus: 1\n", "cog.yaml: unknown key: bogus"),
        ("model: infer.py:Model\nenvironment:\n  pyhton_version: '3.8'\n", "pyhton_version"),
        ("model: infer.py:Model\nenvironment:\n  python_version: 3.10\n", "quotes"),
        ("model: infer.py:Model\nenvironment:\n  python_packages: numpy\n", "list of strings"),
        ("model: infer.py:Model\nenvironment: [1]\n", "environment"),
        ("model: 7\n", "model: expected a string"),
    ],
)
def test_load_errors(text, expected):
    problems = problems_of(text)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("environment: 5\n", "environment: expected a mapping, got an integer"),
        ("environment: hello\n", "environment: expected a mapping, got a string"),
        ("environment: [cpu]\n", "environment: expected a mapping, got a list"),
        ("examples: {input: 1}\n", "examples: expected a list, got a mapping"),
        ("examples: x\n", "examples: expected a list, got a string"),
        ("examples: [1]\n", "examples[0]: expected a mapping, got an integer"),
        ("examples: [{input: 1}]\n", "examples[0].input: expected a mapping, got an integer"),
        (
            "examples:\n  - input: {a: x}\n  - input: [a]\n",
            "examples[1].input: expected a mapping, got a list",
        ),
        ("examples: [{input: {1: a}}]\n", "examples[0].input: keys must be names, got an integer"),
        ("3: x\n", "cog.yaml: keys must be names, got an integer (3)"),
    ],
)
def test_wrong_shapes_say_what_was_expected_where(text, expected):
    problems = problems_of("model: infer.py:Model\n" + text)
    assert any(p.startswith(expected) for p in problems), problems
    assert not [p for p in problems if "object" in p or "iterable" in p], problems


def test_a_wrong_shape_does_not_hide_the_other_problems():
    problems = problems_of(
        "model: infer.py:Nope\nbogus: 1\nenvironment: 5\n"
        "examples:\n  - 1\n  - input: {image: '@nope.png'}\n"
    )
    assert problems == [
        "environment: expected a mapping, got an integer",
        "examples[0]: expected a mapping, got an integer",
        "cog.yaml: unknown key: bogus",
        "model: infer.py defines no class Nope (it defines Model)",
        "examples[1].input.image: nope.png is not in the package",
    ]


def test_empty_sections_are_the_defaults():
    config = load_config("model: infer.py:Model\nenvironment:\nexamples:\n")
    assert config == Config(model="infer.py:Model")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "model: infer.py:Model\nname: a/b\nmodel: other.py:Model\n",
            "cog.yaml: line 3, column 1: duplicate key model (first given on line 1)",
        ),
        (
            "model: infer.py:Model\nenvironment:\n  architectures: [gpu]\n"
            "  cuda: '11.8'\n  cuda: '12.1'\n",
            "cog.yaml: line 5, column 3: duplicate key environment.cuda (first given on line 4)",
        ),
        (
            "model: infer.py:Model\nexamples:\n  - input: {text: a, text: b}\n",
            "cog.yaml: line 3, column 22: duplicate key examples[0].input.text (first given "
            "on line 3)",
        ),
    ],
)
def test_duplicate_keys_are_refused_with_their_position(text, expected):
    problems = problems_of(text)
    assert any(p.startswith(expected) for p in problems), problems


def test_yaml_merge_keys_are_not_duplicates():
    text = (
        "model: infer.py:Model\nbase: &base {input: {text: a}}\n"
        "examples:\n  - <<: *base\n    output: x\n"
    )
    problems = problems_of(text)
    assert problems == ["cog.yaml: unknown key: base"], problems


@pytest.mark.parametrize(
    ("env", "files", "expected"),
    [
        ("python_packages: [numpy]", {}, "python_packages[0]: 'numpy' is not pinned"),
        ("python_packages: ['numpy>=1.0']", {}, "not pinned"),
        ("python_packages: ['numpy==1; rm -rf /']", {}, "not pinned"),
        ("python_requirements: requirements.txt", {}, "requirements.txt is not in the package"),
        ("python_requirements: ../x.txt", {}, "inside the package"),
        ("architectures: [tpu]", {}, "unknown architecture 'tpu'"),
        ("architectures: []", {}, "at least one"),
        ("architectures: [cpu, cpu]", {}, "twice"),
        ("cuda: '11.8'", {}, "cuda: set, but architectures has no gpu"),
        ("cudnn: '8'", {}, "cudnn: set, but architectures has no gpu"),
        ("system_packages: ['ffmpeg; curl evil']", {}, "not a Debian package name"),
    ],
)
def test_validation_problems(env, files, expected):
    problems = problems_of(f"model: infer.py:Model\nenvironment:\n  {env}\n", files)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    ("spec", "ok"),
    [
        ("torch==1.7.1", True),
        ("Pillow==11.3.0", True),
        ("uvicorn[standard]==0.30.0", True),
        ("git+https://github.com/org/repo.git@v1#egg=repo", True),
        ("torch", False),
        ("torch~=1.7", False),
    ],
)
def test_pinning(spec, ok):
    text = f"model: infer.py:Model\nenvironment:\n  python_packages: ['{spec}']\n"
    config = load_config(text)
    if ok:
        validate_config(config, Files({"infer.py": MODEL}))
    else:
        with pytest.raises(ConfigError):
            validate_config(config, Files({"infer.py": MODEL}))


@pytest.mark.parametrize(
    ("model", "files", "expected"),
    [
        ("infer.py", {"infer.py": MODEL}, "must be 'file.py:ClassName'"),
        ("missing.py:Model", {}, "missing.py is not in the package"),
        ("infer.py:Other", {"infer.py": MODEL}, "defines no class Other (it defines Model)"),
        ("infer.py:Model", {"infer.py": "class Model(:\n"}, "line 1: syntax error"),
        ("/abs.py:Model", {}, "must be"),
    ],
)
def test_model_problems(model, files, expected):
    config = load_config(f"model: '{model}'\n")
    with pytest.raises(ConfigError) as caught:
        validate_config(config, Files(files))
    assert any(expected in p for p in caught.value.problems), caught.value.problems


def test_every_problem_is_listed_at_once():
    text = (
        "name: Not Valid\nmodel: missing.py:M\nenvironment:\n"
        "  python_packages: [numpy, scipy]\n  architectures: [tpu]\n  cuda: '11.8'\n"
        "examples:\n  - input: {image: '@nope.png'}\n    output: '@out.png'\n"
    )
    problems = problems_of(text)
    assert len(problems) == 8, problems
    joined = "\n".join(problems)
    for words in ("name:", "missing.py", "numpy", "scipy", "tpu", "cuda", "nope.png", "out.png"):
        assert words in joined
    assert "  - " in str(ConfigError(problems))


def test_unknown_keys_and_validation_problems_together():
    problems = problems_of("model: infer.py:Nope\nbogus: 1\nenvironment:\n  python_packages: [x]\n")
    joined = "\n".join(problems)
    assert "unknown key: bogus" in joined and "'x' is not pinned" in joined and "Nope" in joined


def gpu(packages: list[str], extra: str = "", files: dict[str, str] | None = None) -> Environment:
    text = (
        f"model: infer.py:Model\nenvironment:\n  architectures: [gpu]\n"
        f"  python_packages: {packages!r}\n{extra}"
    )
    files = {"infer.py": MODEL, **(files or {})}
    config = load_config(text)
    validate_config(config, Files(files))
    return complete_config(config, Files(files)).environment


def test_tensorflow_pins_one_pair():
    env = gpu(["tensorflow==2.4.0"])
    assert (env.cuda, env.cudnn) == ("11.0", "8.0")
    env = gpu(["tensorflow==1.15.0"])
    assert (env.cuda, env.cudnn) == ("10.0", "7.4")
    env = gpu(["tensorflow==2.10.1"])
    assert (env.cuda, env.cudnn) == ("11.2", "8.1")


def test_torch_picks_its_newest_cuda():
    env = gpu(["torch==1.7.1"])
    assert (env.cuda, env.cudnn) == ("11.0", "8")
    env = gpu(["torch==2.1.0"])
    assert env.cuda == "12.1"


def test_torch_and_tensorflow_must_agree():
    env = gpu(["torch==1.7.1", "tensorflow==2.4.0"])
    assert (env.cuda, env.cudnn) == ("11.0", "8.0")  # TensorFlow's pair, as it publishes it
    env = gpu(["torch==1.7.1", "tensorflow==2.3.0"])
    assert env.cuda == "10.1"
    with pytest.raises(ConfigError) as caught:
        gpu(["torch==1.9.0", "tensorflow==2.4.0"])
    message = str(caught.value)
    assert "torch==1.9.0" in message and "tensorflow==2.4.0" in message


def test_explicit_cuda_must_fit():
    env = gpu(["torch==1.7.1"], "  cuda: '10.2'\n")
    assert (env.cuda, env.cudnn) == ("10.2", "7")
    with pytest.raises(ConfigError, match=r"CUDA 11.2 does not fit.*torch==1.7.1"):
        gpu(["torch==1.7.1"], "  cuda: '11.2'\n")
    with pytest.raises(ConfigError, match="cuDNN 7"):
        gpu(["tensorflow==2.4.0"], "  cuda: '11.0'\n  cudnn: '7'\n")


def test_explicit_cudnn_alone_picks_a_cuda_with_it():
    env = gpu(["torch==1.7.1"], "  cudnn: '7'\n")
    assert (env.cuda, env.cudnn) == ("10.2", "7")  # the newest CUDA whose wheels carry cuDNN 7
    with pytest.raises(ConfigError, match=r"cuDNN 8 does not fit.*torch==2.5.1"):
        gpu(["torch==2.5.1"], "  cudnn: '8'\n")


@pytest.mark.parametrize(
    ("extra", "pair"),
    [
        ("  cuda: '11.8'\n", ("11.8", "8")),
        ("  cuda: '12.5'\n", ("12.5", "9.3")),  # only TensorFlow publishes it: its cuDNN
        ("  cuda: '10.0'\n", ("10.0", "7.4")),
        ("  cuda: '11.8'\n  cudnn: '9'\n", ("11.8", "9")),  # torch 2.4+ cu118
        ("  cuda: '11.2'\n  cudnn: '8.1.1'\n", ("11.2", "8.1.1")),
        ("  cudnn: '7'\n", ("10.2", "7")),  # the newest CUDA with cuDNN 7
        ("  cudnn: '9'\n", ("12.1", "9")),  # the default CUDA, which has one
    ],
)
def test_explicit_pair_without_a_framework_is_a_known_one(extra, pair):
    env = gpu([], extra)
    assert (env.cuda, env.cudnn) == pair


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "  cuda: '11.8'\n  cudnn: '7'\n",
            "environment.cudnn: CUDA 11.8 with cuDNN 7 is not a known pair "
            "(CUDA 11.8 comes with cuDNN 8 or 9)",
        ),
        ("  cuda: '11.4'\n", "environment.cuda: CUDA 11.4 is not in cog's CUDA table (known: "),
        ("  cudnn: '4'\n", "environment.cudnn: cuDNN 4 is not in cog's CUDA table"),
    ],
)
def test_explicit_pair_nobody_publishes_is_an_error(extra, message):
    with pytest.raises(ConfigError) as caught:
        gpu([], extra)
    assert caught.value.problems[0].startswith(message), caught.value.problems


def test_unknown_framework_version_is_an_error():
    with pytest.raises(ConfigError, match=r"torch==0.4.1 is not in cog's CUDA table"):
        gpu(["torch==0.4.1"])


def test_pins_in_the_requirements_file_count():
    env = gpu(
        [],
        "  python_requirements: requirements.txt\n",
        files={"requirements.txt": "# deps\ntensorflow==2.12.0  # gpu\n-i https://x\n"},
    )
    assert env.cuda == "11.8"


@pytest.mark.parametrize(
    "text",
    ["\ufefftorch==1.7.1\n", "torch==1.7.1\t# the CPU build on PyPI\n"],
    ids=["byte-order-mark", "tab-before-comment"],
)
def test_pins_in_the_requirements_file_as_pip_reads_them(text):
    env = gpu([], "  python_requirements: requirements.txt\n", files={"requirements.txt": text})
    assert env.cuda == "11.0"  # torch 1.7.1's


def test_requirement_specs_are_the_lines_pip_installs():
    text = (
        "\ufeffnumpy==1.26.4\n\n# a comment\n-r more.txt\n--index-url https://x/simple\n"
        "torch==2.1.0\t# cpu\nrequests  # any\npkg @ https://h/p.whl#sha256=ab  # url\n"
    )
    specs = requirement_specs(text)
    assert specs == [
        "numpy==1.26.4",
        "",
        "",
        "",
        "",
        "torch==2.1.0",
        "requests",
        "pkg @ https://h/p.whl#sha256=ab",
    ]
    assert len(specs) == len(text.splitlines())  # one per line, for rewriting in place
    assert pinned([*specs, "Torch_Audio[x] == 2.1.0 ; python_version < '3.12'"]) == {
        "numpy": "1.26.4",
        "torch": "2.1.0",
        "torch-audio": "2.1.0",
    }


def test_gpu_without_framework_gets_the_default_pair():
    env = gpu([])
    default = cuda.default_gpu()
    assert (env.cuda, env.cudnn) == (default.cuda, default.cudnn)


def test_cuda_table_covers_the_promised_range():
    for version in ("1.4", "1.8", "1.13", "2.0", "2.5", "2.8", "2.9"):
        assert cuda.torch_pairs(f"{version}.0"), version
    for version in ("1.0", "1.15", "2.0", "2.10", "2.19", "2.20", "2.21"):
        assert cuda.tensorflow_pair(f"{version}.0"), version
    assert cuda.torch_cuda_suffix("1.7.1", "11.0") == "cu110"
    # Values, from the frameworks' own tables: PyTorch's wheel variants per release, and
    # TensorFlow's tested build configurations (cuDNN as precisely as it publishes it).
    releases = ("1.7.1", "1.13.1", "2.6.0", "2.9.1")
    torch = {v: [p.cuda for p in cuda.torch_pairs(v)] for v in releases}
    assert torch == {  # newest first
        "1.7.1": ["11.0", "10.2", "10.1", "9.2"],
        "1.13.1": ["11.7", "11.6"],
        "2.6.0": ["12.6", "12.4", "11.8"],
        "2.9.1": ["13.0", "12.8", "12.6"],
    }
    assert cuda.torch_cuda_suffix("2.9.1", "13.0") == "cu130"
    tf = {v: cuda.tensorflow_pair(v) for v in ("1.4.0", "1.15.5", "2.3.0", "2.4.1", "2.10.0")}
    assert {v: (p.cuda, p.cudnn) for v, p in tf.items()} == {
        "1.4.0": ("8.0", "6"),
        "1.15.5": ("10.0", "7.4"),
        "2.3.0": ("10.1", "7.6"),
        "2.4.1": ("11.0", "8.0"),
        "2.10.0": ("11.2", "8.1"),
    }
    assert cuda.tensorflow_pair("2.14.0") == cuda.CudaPair("11.8", "8.7")
    assert cuda.tensorflow_pair("2.18.0") == cuda.CudaPair("12.5", "9.3")
    assert cuda.torch_cuda_suffix("1.7.1", "12.1") is None
    assert cuda.tensorflow_gpu_package("1.15.0") == "tensorflow_gpu"
    assert cuda.tensorflow_gpu_package("2.4.0") == "tensorflow"
    assert cuda.torchvision_for("1.7.1") == "0.8"
