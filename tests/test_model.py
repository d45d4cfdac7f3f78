"""The model API (cog.Model, cog.input, cog.Path) and finding the model named in cog.yaml."""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

import cog
from cog.runtime.model_ref import ModelLoadError, ModelRef
from cog.signature import SignatureError

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUNTIME_FILES = [
    "cog/__init__.py",
    "cog/model.py",
    "cog/signature.py",
    "cog/declarations.py",
    "cog/predictor.py",
    "cog/types.py",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "cog" / "runtime").glob("*.py")),
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "cog" / "worker").glob("*.py")),
]
SERVER_ONLY = ["aiodocker", "aiofiles", "cattrs", "structlog", "aiobotocore", "grpc", "pathspec"]


def test_import_cog_is_light_and_the_runtime_needs_no_server_packages():
    code = textwrap.dedent(
        """
        import json, sys
        import cog
        light = sorted(m for m in ("attrs", "aiohttp", "yaml") if m in sys.modules)
        cog.Model, cog.input, cog.Path
        import cog.runtime, cog.runtime.__main__, cog.runtime.app
        print(json.dumps({"light": light, "loaded": sorted(sys.modules)}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    report = json.loads(result.stdout)
    assert report["light"] == []
    loaded = set(report["loaded"])
    assert not [m for m in SERVER_ONLY if m in loaded or any(k.startswith(m + ".") for k in loaded)]
    assert "cog.config" not in loaded


def test_version_and_exports():
    assert cog.__version__ == "0.1.0"
    assert {"Model", "input", "Path"} <= set(cog.__all__)
    with pytest.raises(AttributeError):
        cog.nothing_here  # noqa: B018


def _python38():
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3.8")))
    for candidate in [*candidates, "python3.8"]:
        try:
            subprocess.run([candidate, "-c", "pass"], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            continue
        return candidate
    return None


def test_runtime_files_compile_on_python38():
    python38 = _python38()
    if python38 is None:
        pytest.skip("no Python 3.8 interpreter here to check the in-image runtime's syntax")
    files = [str(ROOT / f) for f in RUNTIME_FILES]
    code = "import sys\nfor f in sys.argv[1:]:\n    compile(open(f).read(), f, 'exec')\n"
    result = subprocess.run([python38, "-c", code, *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_path_is_a_pathlib_path():
    path = cog.Path("/tmp/x.png")
    assert isinstance(path, pathlib.Path)
    assert path.suffix == ".png"
    assert isinstance(path.with_name("y.png"), cog.Path)


def test_input_keeps_the_function_and_model_defaults():
    def run(self, x):
        return x

    assert cog.input("x", type=str)(run) is run

    class Plain(cog.Model):
        @cog.input("x", type=str)
        def run(self, x):
            return x.upper()

    model = Plain()
    assert model.setup() is None
    assert model.run(x="a") == "A"
    with pytest.raises(NotImplementedError):
        cog.Model().run()


def test_subclass_inherits_the_signature():
    class Base(cog.Model):
        @cog.input("x", type=int, default=1)
        def run(self, x):
            return x

    class Child(Base):
        def setup(self):
            pass

    from cog.model import signature_of

    assert signature_of(Child) == signature_of(Base)


# --- ModelRef: cog.yaml's model: "infer.py:Model" ----------------------------------------


def write_package(directory, model_source, config="model: infer.py:Model\n", **files):
    (directory / "cog.yaml").write_text(config)
    (directory / "infer.py").write_text(textwrap.dedent(model_source))
    for name, text in files.items():
        (directory / name).write_text(textwrap.dedent(text))
    return directory


def test_load_the_model_named_in_cog_yaml(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    write_package(
        tmp_path,
        """
        import cog
        from helper import shout

        class Model(cog.Model):
            @cog.input("text", type=str)
            def run(self, text):
                return shout(text)
        """,
        config='name: test\nmodel: "infer.py:Model"\nenvironment: {python_version: "3.11"}\n',
        **{"helper.py": "def shout(text):\n    return text.upper()\n"},
    )
    ref = ModelRef.from_directory(str(tmp_path))
    assert ref == ModelRef("infer.py", "Model", str(tmp_path))
    model_class = ref.load()
    assert model_class().run(text="hi") == "HI"


@pytest.mark.parametrize("reference", ["infer.py", "infer:Model", "infer.py:", "infer.py:1x"])
def test_bad_model_references(reference):
    with pytest.raises(ModelLoadError, match=re.escape("infer.py:Model")):
        ModelRef.parse(reference)


def test_cog_yaml_problems(tmp_path):
    with pytest.raises(ModelLoadError, match=re.escape("cog.yaml not found")):
        ModelRef.from_directory(str(tmp_path))
    (tmp_path / "cog.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ModelLoadError, match="not valid YAML"):
        ModelRef.from_directory(str(tmp_path))
    (tmp_path / "cog.yaml").write_text("name: x\n")
    with pytest.raises(ModelLoadError, match="does not name the model"):
        ModelRef.from_directory(str(tmp_path))


def test_load_errors(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelLoadError, match=re.escape("model file infer.py not found")):
        ModelRef("infer.py", "Model", str(tmp_path)).load()
    write_package(tmp_path, "class Other:\n    pass\n")
    with pytest.raises(ModelLoadError, match=re.escape("infer.py has no class Model")):
        ModelRef("infer.py", "Model", str(tmp_path)).load()
    # Any other class is a predictor of today's Cog, which needs predict() or run().
    with pytest.raises(SignatureError, match=re.escape("defines neither predict() nor run()")):
        ModelRef("infer.py", "Other", str(tmp_path)).load()


def test_load_reports_declaration_errors_with_the_file(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    write_package(
        tmp_path,
        """
        import cog

        class Model(cog.Model):
            @cog.input("scale", type=float, default=9.0, max=4.0)
            def run(self, scale):
                pass
        """,
    )
    with pytest.raises(SignatureError) as caught:
        ModelRef("infer.py", "Model", str(tmp_path)).load()
    (problem,) = caught.value.problems
    assert problem.startswith(f"{tmp_path / 'infer.py'}:5: Model.run: input 'scale':")


def test_a_model_file_named_like_a_stdlib_module_does_not_shadow_it(tmp_path, monkeypatch):
    import queue

    monkeypatch.syspath_prepend(str(tmp_path))
    write_package(
        tmp_path,
        "",
        config="model: queue.py:Model\n",
        **{
            "queue.py": """
            import cog

            class Model(cog.Model):
                def run(self):
                    return "from the model's queue.py"
            """
        },
    )
    try:
        model_class = ModelRef.from_directory(str(tmp_path)).load()
        assert model_class().run() == "from the model's queue.py"
        assert sys.modules["queue"] is queue  # what `import queue` gives everyone else
        assert model_class.__module__ == "_cog_model_queue"
        assert sys.modules["_cog_model_queue"].Model is model_class
    finally:
        sys.modules.pop("_cog_model_queue", None)
        sys.modules["queue"] = queue


@pytest.mark.parametrize(
    ("name", "stdlib"),
    [("colorsys", True), ("xml", True), ("math", True), ("infer", False), ("cog", False)],
)
def test_the_standard_library_is_known_before_python_3_10(monkeypatch, name, stdlib):
    """Python 3.8 and 3.9 have no sys.stdlib_module_names (the runtime once failed every
    model there for it): the standard library's own folders are looked in instead."""
    from cog.worker.loader import _in_standard_library

    monkeypatch.delattr(sys, "stdlib_module_names", raising=False)
    assert _in_standard_library(name) is stdlib


def test_a_model_file_is_the_module_its_name_says(tmp_path, monkeypatch):
    """Registered as `infer`, as `import infer` would: a sibling importing it gets the
    same module (not a second copy), and a spawned process can import its classes."""
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("infer", "helper"):  # other tests' model files of these names
        monkeypatch.delitem(sys.modules, name, raising=False)
    write_package(
        tmp_path,
        "",
        config="model: infer.py:Model\n",
        **{
            "infer.py": """
            import cog

            def square(x):
                return x * x

            class Model(cog.Model):
                def run(self):
                    import helper
                    return helper.model_class() is Model
            """,
            "helper.py": """
            def model_class():
                from infer import Model
                return Model
            """,
        },
    )
    try:
        model_class = ModelRef.from_directory(str(tmp_path)).load()
        assert model_class.__module__ == "infer"
        assert model_class().run() is True  # the sibling saw this very class
        square = sys.modules["infer"].square
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            assert pool.map(square, [3]) == [9]  # the child imported `infer` by its name
    finally:
        sys.modules.pop("infer", None)
        sys.modules.pop("helper", None)
