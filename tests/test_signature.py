"""The input signature: declaration rules, conversions, JSON/OpenAPI, and the static reader."""

from __future__ import annotations

import json
import pathlib
import re
import textwrap

import pytest

import cog
from cog.model import signature_of
from cog.openapi import openapi_document
from cog.server.source import static_signature
from cog.signature import (
    NO_DEFAULT,
    Argument,
    InputError,
    Signature,
    SignatureError,
)

# --- Declaration errors: raised when the class is defined, naming the file and the input --


def declare(*decorators, params="x"):
    """Define a model whose run() takes ``params`` and carries ``decorators``."""
    namespace = {}
    source = textwrap.dedent(
        f"""
        def run(self, {params}):
            return None
        """
    )
    exec(compile(source, "model_file.py", "exec"), namespace)
    run = namespace["run"]
    for decorator in reversed(decorators):
        run = decorator(run)
    return type("Declared", (cog.Model,), {"run": run})


def problems_of(*decorators, params="x"):
    with pytest.raises(SignatureError) as caught:
        declare(*decorators, params=params)
    return caught.value.problems


@pytest.mark.parametrize(
    ("decorators", "params", "expected"),
    [
        ([cog.input("y", type=str)], "x", "input 'y': is not a parameter of run()"),
        ([cog.input("x", type=str)], "x, z", "parameter 'z' of run() has no @cog.input"),
        ([cog.input("x", type=int, default="3")], "x", "input 'x': default '3' is not an integer"),
        ([cog.input("x", type=int, default=True)], "x", "default True is not an integer"),
        ([cog.input("x", type=str, default=3)], "x", "default 3 is not a string"),
        ([cog.input("x", type=bool, default=0)], "x", "default 0 is not a boolean"),
        (
            [cog.input("x", type=float, default=9, max=4)],
            "x",
            "default 9.0 is above the maximum 4.0",
        ),
        ([cog.input("x", type=int, default=-1, min=0)], "x", "default -1 is below the minimum 0"),
        (
            [cog.input("x", type=str, default="c", options=["a", "b"])],
            "x",
            "default 'c' is not one of 'a', 'b'",
        ),
        ([cog.input("x", type=str, min=1)], "x", "min is only allowed for int and float inputs"),
        ([cog.input("x", type=bool, max=1)], "x", "max is only allowed for int and float inputs"),
        ([cog.input("x", type=int, min="1")], "x", "min must be a number, not '1'"),
        ([cog.input("x", type=int, min=5, max=1)], "x", "min 5 is above max 1"),
        (
            [cog.input("x", type=cog.Path, options=["a", "b"])],
            "x",
            "options are not allowed for file inputs",
        ),
        (
            [cog.input("x", type=cog.Path, default="a.png")],
            "x",
            "a file input cannot have a default",
        ),
        ([cog.input("x", type=str, options=["only"])], "x", "options must list two or more values"),
        ([cog.input("x", type=int, options=[1, "2"])], "x", "option '2' is not an integer"),
        ([cog.input("x", type=int, options=[1, 9], max=5)], "x", "option 9 is above the maximum 5"),
        ([cog.input("x", type=str, options=["a", "a"])], "x", "option 'a' is listed twice"),
        ([cog.input("x", type=str, options="ab")], "x", "options must be a list"),
        ([cog.input("x", type=list)], "x", "type must be str, int, float, bool or cog.Path"),
        ([cog.input("x", type=str, help=3)], "x", "help must be a string"),
        ([cog.input("x", type=str), cog.input("x", type=str)], "x", "declared more than once"),
        ([cog.input("x", type=float, default=float("nan"))], "x", "nan is not a finite number"),
    ],
)
def test_declaration_errors(decorators, params, expected):
    problems = problems_of(*decorators, params=params)
    assert any(expected in problem for problem in problems), problems
    # Every problem names the model file and a line; input problems name the input.
    assert all(problem.startswith("model_file.py:") for problem in problems)
    assert all("Declared.run" in problem for problem in problems)


def test_every_problem_is_reported_at_once():
    problems = problems_of(
        cog.input("a", type=int, default="x"),
        cog.input("b", type=cog.Path, default="f"),
        params="a, b, c",
    )
    assert len(problems) == 3
    joined = "\n".join(problems)
    assert "input 'a'" in joined
    assert "input 'b'" in joined
    assert "parameter 'c'" in joined


def test_problem_points_at_the_decorator_line():
    source = textwrap.dedent(
        """
        import cog

        class Broken(cog.Model):
            @cog.input("ok", type=str)
            @cog.input("bad", type=int, default="x")
            def run(self, ok, bad):
                pass
        """
    )
    with pytest.raises(SignatureError) as caught:
        exec(compile(source, "broken.py", "exec"), {})
    assert caught.value.problems == (
        "broken.py:6: Broken.run: input 'bad': default 'x' is not an integer",
    )


def test_falsy_defaults_are_real_defaults():
    model = declare(
        cog.input("a", type=int, default=0),
        cog.input("b", type=str, default=""),
        cog.input("c", type=bool, default=False),
        cog.input("d", type=float, default=0.0),
        cog.input("e", type=str, default=None),
        cog.input("f", type=int),
        params="a, b, c, d, e, f",
    )
    arguments = {a.name: a for a in signature_of(model).arguments}
    assert [arguments[n].default for n in "abcde"] == [0, "", False, 0.0, None]
    assert not any(arguments[n].required for n in "abcde")
    assert arguments["f"].required
    assert arguments["f"].default is NO_DEFAULT


def test_kwargs_accepts_any_declared_input_and_order_follows_run():
    model = declare(
        cog.input("extra", type=str),
        cog.input("second", type=int),
        cog.input("first", type=int),
        params="first, second, **kwargs",
    )
    assert [a.name for a in signature_of(model).arguments] == ["first", "second", "extra"]


def test_a_model_without_run_is_refused_when_loaded():
    class NoRun(cog.Model):
        pass

    with pytest.raises(SignatureError, match=r"defines neither run\(\) nor predict\(\)"):
        signature_of(NoRun)


def test_async_run_is_refused():
    with pytest.raises(SignatureError, match="not async"):

        class Async(cog.Model):
            @cog.input("x", type=str)
            async def run(self, x):
                return x


def test_pathlib_path_counts_as_a_file_type():
    model = declare(cog.input("x", type=pathlib.Path))
    assert signature_of(model).arguments[0].type == "Path"


# --- Conversions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "raw", "value"),
    [
        (Argument("a", "str"), " as is ", " as is "),
        (Argument("a", "int"), "42", 42),
        (Argument("a", "int"), "-7", -7),
        (Argument("a", "int"), " 3 ", 3),
        (Argument("a", "float"), "2.5", 2.5),
        (Argument("a", "float"), "3", 3.0),
        (Argument("a", "float"), "1e3", 1000.0),
        (Argument("a", "float"), " -0.5\n", -0.5),
        (Argument("a", "int"), "9" * 4300, int("9" * 4300)),
        (Argument("a", "bool"), "true", True),
        (Argument("a", "bool"), "TRUE", True),
        (Argument("a", "bool"), "1", True),
        (Argument("a", "bool"), "false", False),
        (Argument("a", "bool"), "0", False),
        (Argument("a", "int", min=0, max=10), "10", 10),
        (Argument("a", "str", options=("x", "y")), "y", "y"),
        (Argument("a", "float", options=(0.5, 1.0)), "1", 1.0),
    ],
)
def test_conversions(argument, raw, value):
    converted = argument.convert(raw)
    assert converted == value
    assert type(converted) is type(value)


@pytest.mark.parametrize(
    ("argument", "raw", "message"),
    [
        (Argument("a", "int"), "1.5", "'1.5' is not an integer"),
        (Argument("a", "int"), "ten", "'ten' is not an integer"),
        (Argument("a", "float"), "abc", "'abc' is not a number"),
        # int and float take the same spellings: ASCII digits, no underscores
        (Argument("a", "int"), "1_000", "'1_000' is not an integer"),
        (Argument("a", "float"), "1_000", "'1_000' is not a number"),
        (Argument("a", "int"), "\u0663", "'\u0663' is not an integer"),
        (Argument("a", "float"), "\u0663", "'\u0663' is not a number"),
        (Argument("a", "int"), "\u00a07", "is not an integer"),
        (Argument("a", "float"), "\u00a07", "is not a number"),
        (Argument("a", "int"), "9" * 5000, "is an integer of 5000 digits; at most 4300 are"),
        (Argument("a", "int"), "x" * 1000, r"'x{40}'\.\.\. \(1000 characters\)"),
        (Argument("a", "int", max=5), "9" * 100, r"9{40}\.\.\. \(100 digits\) is above"),
        (Argument("a", "float"), "nan", "is not a finite number"),
        (Argument("a", "float"), "inf", "is not a finite number"),
        (Argument("a", "bool"), "yes", "is not a boolean"),
        (Argument("a", "int", min=1), "0", "below the minimum 1"),
        (Argument("a", "float", max=1.0), "1.01", "above the maximum 1.0"),
        (Argument("a", "str", options=("x", "y")), "z", "'z' is not one of 'x', 'y'"),
        (Argument("a", "Path"), "name.png", "must be a file upload"),
    ],
)
def test_conversion_errors(argument, raw, message):
    with pytest.raises(InputError, match=message):
        argument.convert(raw)


# --- JSON and OpenAPI -------------------------------------------------------------------


class Documented(cog.Model):
    """Documented model."""

    @cog.input("image", type=cog.Path, help="Input image")
    @cog.input("scale", type=float, default=1.5, min=1.0, max=4.0, help="Scale")
    @cog.input("mode", type=str, default="fast", options=["fast", "best"])
    @cog.input("seed", type=int, default=None)
    def run(self, image, scale, mode, seed):
        return None


def test_to_json_omits_unset_keys():
    assert signature_of(Documented).to_json() == {
        "arguments": {
            "image": {"type": "Path", "help": "Input image"},
            "scale": {"type": "float", "help": "Scale", "default": 1.5, "min": 1.0, "max": 4.0},
            "mode": {"type": "str", "default": "fast", "options": ["fast", "best"]},
            "seed": {"type": "int", "default": None},
        }
    }


def test_json_round_trip():
    signature = signature_of(Documented)
    data = json.loads(json.dumps(signature.to_json()))
    assert Signature.from_json(data) == signature
    assert list(data["arguments"]) == ["image", "scale", "mode", "seed"]


def test_openapi_document():
    document = openapi_document(signature_of(Documented), title="Documented")
    assert document["openapi"].startswith("3.")
    schema = document["components"]["schemas"]["InferForm"]  # the 2021 route's form
    assert schema["required"] == ["image"]
    assert schema["properties"]["image"] == {
        "type": "string",
        "format": "binary",
        "description": "Input image",
    }
    assert schema["properties"]["scale"]["minimum"] == 1.0
    assert schema["properties"]["scale"]["maximum"] == 4.0
    assert schema["properties"]["mode"]["enum"] == ["fast", "best"]
    assert schema["properties"]["seed"]["nullable"] is True
    infer = document["paths"]["/infer"]["post"]
    assert "multipart/form-data" in infer["requestBody"]["content"]
    assert set(infer["responses"]) >= {"200", "400", "500", "503"}
    json.dumps(document)  # serialisable


# --- The static reader: same answer as importing, without importing ---------------------

STATIC_MODEL = textwrap.dedent(
    '''
    import cog
    from cog import Path

    class Helper:
        def run(self, other):
            pass

    class Model(cog.Model):
        """A model."""

        def setup(self):
            import this_module_does_not_exist  # never imported by the static reader

        @cog.input("image", type=Path, help="Input image")
        @cog.input("scale", type=float, default=2, min=1, max=4.0, help="Scale")
        @cog.input("mode", type=str, default="fast", options=["fast", "best"])
        @cog.input("steps", cog.Path)
        @cog.input("flag", type=bool, default=False)
        @cog.input("count", type=int, default=-1, min=-5)
        @cog.input("note", type=str, default=None)
        def run(self, image, scale, mode, steps, flag, count, note):
            return 1
    '''
)


def test_static_signature_equals_the_imported_one():
    namespace = {}
    exec(compile(STATIC_MODEL, "infer.py", "exec"), namespace)
    imported = signature_of(namespace["Model"])
    static = static_signature(STATIC_MODEL, "Model", "infer.py")
    assert static == imported
    assert static.to_json() == imported.to_json()


@pytest.mark.parametrize(
    "source",
    [
        # run inherited from elsewhere
        "import cog\nfrom base import Base\nclass Model(Base):\n    pass\n",
        # a non-literal argument
        "import cog\nS = 2\nclass Model(cog.Model):\n"
        "    @cog.input('x', type=int, default=S)\n    def run(self, x): pass\n",
        # a decorator that is not @cog.input
        "import cog, torch\nclass Model(cog.Model):\n"
        "    @torch.no_grad()\n    @cog.input('x', type=int)\n    def run(self, x): pass\n",
        # a type the reader cannot resolve
        "import cog\nfrom mytypes import Text\nclass Model(cog.Model):\n"
        "    @cog.input('x', type=Text)\n    def run(self, x): pass\n",
        # splatted options
        "import cog\nO = {}\nclass Model(cog.Model):\n"
        "    @cog.input('x', type=int, **O)\n    def run(self, x): pass\n",
    ],
)
def test_static_signature_is_none_when_undeterminable(source):
    assert static_signature(source, "Model") is None


def test_static_signature_of_a_missing_class_is_none():
    assert static_signature(STATIC_MODEL, "Nope") is None


def test_static_signature_follows_import_aliases():
    source = textwrap.dedent(
        """
        import cog as c
        from cog import input as inp
        import pathlib

        class Model(c.Model):
            @inp("a", type=pathlib.Path)
            @c.input("b", type=c.Path)
            def run(self, a, b):
                pass
        """
    )
    signature = static_signature(source, "Model")
    assert [(a.name, a.type) for a in signature.arguments] == [("a", "Path"), ("b", "Path")]


def test_static_signature_raises_the_same_problems_as_import():
    source = textwrap.dedent(
        """
        import cog

        class Model(cog.Model):
            @cog.input("x", type=int, default="3", max=2)
            @cog.input("y", type=cog.Path, options=["a", "b"])
            def run(self, x, z):
                pass
        """
    )
    with pytest.raises(SignatureError) as static_error:
        static_signature(source, "Model", "infer.py")
    with pytest.raises(SignatureError) as import_error:
        exec(compile(source, "infer.py", "exec"), {})
    assert static_error.value.problems == import_error.value.problems
    assert len(static_error.value.problems) == 4


def test_static_signature_reports_unknown_options_and_syntax_errors():
    source = "import cog\nclass Model(cog.Model):\n    @cog.input('x', type=int, dflt=1)\n"
    source += "    def run(self, x): pass\n"
    with pytest.raises(
        SignatureError, match=re.escape("infer.py:3: input 'x': @cog.input has no option")
    ):
        static_signature(source, "Model", "infer.py")
    with pytest.raises(SignatureError, match=re.escape("infer.py:1:")):
        static_signature("class Model(:\n", "Model", "infer.py")
