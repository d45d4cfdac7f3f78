"""Today's Cog API (BasePredictor, Input, the types) read into the one signature model,
at import and statically from source, with the same rules."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import textwrap
from typing import Iterator, List, Optional

import pytest

import cog
from cog import BaseModel, BasePredictor, BaseRunner, ConcatenateIterator, Input, Path, Secret
from cog.predictor import method_name, predictor_signature
from cog.server.source import static_signature
from cog.signature import NO_DEFAULT, InputError, Signature, SignatureError
from tests.test_model import _python38

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def load(path: pathlib.Path, name: str):
    spec = importlib.util.spec_from_file_location(f"fixture_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def test_the_kitchen_predictor_read_at_import_and_from_source_alike():
    source = (FIXTURES / "kitchen" / "predict.py").read_text()
    imported = predictor_signature(load(FIXTURES / "kitchen" / "predict.py", "Predictor"))
    static = static_signature(source, "Predictor", "predict.py")
    assert static == imported
    doc = imported.to_json()
    assert doc["kind"] == "predictor"
    arguments = doc["arguments"]
    assert list(arguments)[:3] == ["text", "count", "scale"]
    assert arguments["text"] == {
        "type": "str",
        "help": "Some text",
        "default": "world",
        "min_length": 1,
        "max_length": 50,
    }
    assert arguments["count"] == {"type": "int", "default": 2, "min": 1, "max": 5}
    assert arguments["flavour"]["options"] == ["plain", "spicy"]
    assert arguments["code"]["regex"] == r"[a-z]+\Z"
    assert arguments["image"] == {"type": "Path", "help": "A file, echoed back", "default": None}
    assert arguments["pages"] == {
        "type": "Path",
        "list": True,
        "help": "Files, counted",
        "default": None,
    }
    assert arguments["blob"] == {"type": "File", "default": None}
    assert arguments["token"] == {"type": "Secret", "default": None}
    assert arguments["tags"] == {"type": "str", "list": True, "default": ["a", "b"]}
    assert arguments["old"] == {"type": "str", "default": "x", "deprecated": True}
    assert doc["output"] == {
        "type": "object",
        "name": "Output",
        "fields": {
            "text": {"type": "str"},
            "number": {"type": "float"},
            "file": {"type": "Path"},
            "files": {"type": "Path", "list": True},
            "missing": {"type": "Path", "optional": True},
        },
    }
    assert Signature.from_json(json.loads(json.dumps(doc))) == imported


def test_an_async_runner_streaming_text_read_from_source():
    signature = static_signature((FIXTURES / "stream" / "run.py").read_text(), "Runner", "run.py")
    assert signature.to_json() == {
        "arguments": {
            "prompt": {"type": "str", "help": "Words to stream back"},
            "repeat": {"type": "int", "default": 1, "min": 1, "max": 3},
            "wait": {"type": "float", "default": 0.0, "min": 0.0, "max": 60.0},
        },
        "kind": "predictor",
        "output": {"type": "str", "iterator": True, "concatenate": True},
    }


def test_output_kinds():
    def output_of(annotation):
        cls = type("P", (BasePredictor,), {"predict": _method(annotation)})
        return predictor_signature(cls).output.to_json()

    assert output_of(str) == {"type": "str"}
    assert output_of(Path) == {"type": "Path"}
    assert output_of(List[Path]) == {"type": "Path", "list": True}
    assert output_of(list[int]) == {"type": "int", "list": True}
    assert output_of(Iterator[Path]) == {"type": "Path", "iterator": True}
    assert output_of(ConcatenateIterator[str]) == {
        "type": "str",
        "iterator": True,
        "concatenate": True,
    }
    assert output_of(dict) == {"type": "any"}
    with pytest.raises(SignatureError, match=r"a prediction returns a value"):
        output_of(Optional[str])


def _method(annotation):
    def predict(self, x):
        return x

    predict.__annotations__ = {"x": str, "return": annotation}
    return predict


def test_every_problem_is_reported_with_where_it_is():
    source = textwrap.dedent(
        """
        from typing import Optional

        from cog import BasePredictor, Input, Path

        class Predictor(BasePredictor):
            def predict(
                self,
                a: int = Input(default="x"),
                b: str = Input(ge=1),
                c: float = Input(default=20.0, ge=0, le=10),
                d: Path = Input(default="file.png"),
                e: str = Input(choices=["x", 1]),
                f: str = Input(regex="("),
                g=3,
                h: dict = None,
                *rest,
            ) -> Optional[str]:
                pass
        """
    )
    with pytest.raises(SignatureError) as info:
        static_signature(source, "Predictor", "predict.py")
    problems = [p.split(": ", 2)[2] for p in info.value.problems]
    assert problems == [
        "*rest: inputs must be named parameters",
        "input 'a': default 'x' is not an integer",
        "input 'b': ge is only allowed for int and float inputs",
        "input 'c': default 20.0 is above the maximum 10.0",
        "input 'd': default 'file.png': a file input cannot have a default "
        "(default=None: optional)",
        "input 'e': choice 1 is not a string",
        "input 'f': regex '(' is not a regular expression: "
        "missing ), unterminated subpattern at position 0",
        "input 'g': has no type annotation",
        "input 'h': dict is not an input type (use str, int, float, bool, cog.Path, cog.File, "
        "cog.Secret, Optional[...] or list[...])",
        "output: Optional[str]: a prediction returns a value (Optional is for fields)",
    ]


def test_an_unknown_annotation_is_left_to_the_image():
    source = (
        "import numpy as np\nclass Predictor:\n    def predict(self, x: np.ndarray) -> str: ...\n"
    )
    assert static_signature(source, "Predictor") is None


def test_the_method_is_run_for_a_runner_and_predict_for_a_predictor():
    class Runner(BaseRunner):
        def run(self) -> str:
            return "x"

    class Predictor(BasePredictor):
        def predict(self) -> str:
            return "x"

    class Plain:  # Cog does not insist on the base class
        def run(self) -> str:
            return "x"

    assert [method_name(c) for c in (Runner, Predictor, Plain)] == ["run", "predict", "run"]
    assert predictor_signature(Plain).kind == "predictor"


def test_values_of_predictions_are_checked_as_cog_checks_them():
    signature = predictor_signature(load(FIXTURES / "kitchen" / "predict.py", "Predictor"))
    arguments = {a.name: a for a in signature.arguments}
    assert arguments["count"].validate(3) == 3
    assert arguments["count"].validate(3.0) == 3
    assert arguments["scale"].validate(2) == 2.0
    assert arguments["tags"].validate("one") == ["one"]
    assert arguments["image"].validate(None) is None
    assert arguments["image"].validate("data:,x") == "data:,x"
    for name, value, message in [
        ("count", True, "True is not an integer"),
        ("count", 9, "9 is above the maximum 5"),
        ("text", "", "'' is shorter than 1 characters"),
        ("flavour", "sweet", "'sweet' is not one of 'plain', 'spicy'"),
        ("code", "AB", r"'AB' does not match '[a-z]+\\Z'"),
        (
            "image",
            "/etc/passwd",
            "'/etc/passwd' is not a file URL (use a data: URI or an http(s) URL)",
        ),
        ("text", None, "none is not an allowed value"),
        ("loud", "yes", "'yes' is not a boolean"),
    ]:
        with pytest.raises(InputError) as info:
            arguments[name].validate(value)
        assert str(info.value) == message
    assert arguments["text"].default == "world"
    assert signature.argument("missing") is None
    assert NO_DEFAULT is not None


def test_the_types():
    token = Secret("hunter2")
    assert str(token) == "**********" and repr(token) == "Secret(**********)"
    assert token.get_secret_value() == "hunter2"

    class Out(BaseModel):
        text: str
        file: Path | None
        count: int = 3

    out = Out(text="a")
    assert out.dict() == {"text": "a", "file": None, "count": 3}
    assert out == Out(text="a", count=3)
    with pytest.raises(TypeError, match="missing the field 'text'"):
        Out()
    with pytest.raises(TypeError, match="has no field nope"):
        Out(text="a", nope=1)
    assert issubclass(cog.CancelationException, BaseException)
    assert not issubclass(cog.CancelationException, Exception)
    assert Input(default=3, ge=1).ge == 1


def test_the_model_side_is_pure_python_and_runs_on_python_38():
    """The model's environment gets these modules and nothing else: the standard library
    of Python 3.8 must do (no site-packages at all with -S)."""
    python38 = _python38()
    if python38 is None:
        pytest.skip("no Python 3.8 interpreter here")  # this project's machines have pyenv's
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(ROOT)!r})
        import importlib.util
        from cog.predictor import predictor_signature
        import cog.model, cog.types, cog.worker.main
        spec = importlib.util.spec_from_file_location(
            "predict", {str(FIXTURES / "kitchen" / "predict.py")!r})
        module = importlib.util.module_from_spec(spec)
        sys.modules["predict"] = module
        spec.loader.exec_module(module)
        third = sorted(m for m in sys.modules if m.split(".")[0] in ("attrs", "aiohttp", "yaml"))
        print(json.dumps([predictor_signature(module.Predictor).to_json(), third]))
        """
    )
    result = subprocess.run(
        [python38, "-I", "-S", "-c", code], capture_output=True, text=True, cwd="/"
    )
    assert result.returncode == 0, result.stderr
    signature, third = json.loads(result.stdout)
    assert third == []
    expected = predictor_signature(load(FIXTURES / "kitchen" / "predict.py", "Predictor"))
    assert signature == expected.to_json()
