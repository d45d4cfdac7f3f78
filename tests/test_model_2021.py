"""Models as they were written for Cog in 2021: run() or predict(), cog.make_temp_path, and
a class with neither method, refused from its source before anything is built."""

from __future__ import annotations

import tempfile

import pytest

import cog
from cog.config import ConfigError
from cog.model import method_of, signature_of
from cog.package import PackageLimits
from cog.server.inspection import inspect_package
from cog.server.source import static_signature
from cog.signature import SignatureError
from tests.registry_helpers import package_bytes
from tests.test_inference_server import form, started_client


class Predicts(cog.Model):
    """A model of June 2021: predict() instead of run()."""

    def setup(self):
        self.prefix = "got"

    @cog.input("text", type=str)
    @cog.input("times", type=int, default=1, min=1, max=3)
    def predict(self, text, times):
        return " ".join([f"{self.prefix} {text}"] * times)


class Both(cog.Model):
    @cog.input("text", type=str)
    def run(self, text):
        return self.predict(text) + "!"

    def predict(self, text):  # a helper of run(), with no declared inputs
        return text.upper()


class Neither(cog.Model):
    def setup(self):
        pass


def test_predict_is_the_method_of_a_model_that_has_no_run():
    assert method_of(Predicts) == "predict"
    assert [a.name for a in signature_of(Predicts).arguments] == ["text", "times"]
    model = Predicts()
    model.setup()
    assert model.run(text="a", times=2) == "got a got a"  # what the runtime calls


def test_run_wins_when_a_model_has_both():
    assert method_of(Both) == "run"
    assert [a.name for a in signature_of(Both).arguments] == ["text"]
    assert Both().run(text="hi") == "HI!"


def test_a_model_with_neither_method_says_so_naming_both():
    assert method_of(Neither) is None
    with pytest.raises(SignatureError) as caught:
        signature_of(Neither)
    assert caught.value.problems == ("Neither defines neither run() nor predict()",)
    with pytest.raises(NotImplementedError, match=r"defines neither run\(\) nor predict\(\)"):
        Neither().run(text="x")


def test_declaration_messages_name_predict_for_a_predict_model():
    with pytest.raises(SignatureError) as caught:

        class Wrong(cog.Model):
            @cog.input("text", type=str)
            def predict(self, text, extra):
                return text

    (problem,) = caught.value.problems
    assert problem.endswith("Wrong.predict: parameter 'extra' of predict() has no @cog.input"), (
        problem
    )


async def test_a_predict_model_is_served(aiohttp_client):
    _, client = await started_client(aiohttp_client, Predicts)
    help_ = await (await client.get("/help")).json()
    assert list(help_["arguments"]) == ["text", "times"]
    response = await client.post("/infer", data=form(text="x", times="3"))
    assert response.status == 200, await response.text()
    assert await response.text() == "got x got x got x"


class TempPath(cog.Model):
    """Writes its output where Cog 2021's helper says."""

    @cog.input("text", type=str)
    def predict(self, text):
        out = cog.make_temp_path("output.txt")
        assert list(out.parent.iterdir()) == []  # a new, empty directory each time
        out.write_text(text * 2)
        return out


@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


async def test_make_temp_path_is_removed_once_answered(aiohttp_client, temp_root):
    _, client = await started_client(aiohttp_client, TempPath)
    for text in ("ab", "cd"):
        response = await client.post("/infer", data=form(text=text))
        assert response.status == 200, await response.text()
        assert response.headers["Content-Disposition"] == 'inline; filename="output.txt"'
        assert await response.read() == (text * 2).encode()
        assert list(temp_root.iterdir()) == []


def test_make_temp_path_outside_the_server_and_bad_names(temp_root):
    first, second = cog.make_temp_path("a.png"), cog.make_temp_path("a.png")
    assert first.name == second.name == "a.png"
    assert first.parent != second.parent and first.parent.is_dir()
    assert isinstance(first, cog.Path)
    assert temp_root in first.parents  # nobody removes it outside the server
    for bad in ("", ".", "/etc/passwd", "../x.png", "a/../../x"):
        with pytest.raises(ValueError, match="make_temp_path"):
            cog.make_temp_path(bad)


# --- read from the source, at upload ------------------------------------------------------

PREDICT_SOURCE = """
import cog

class Model(cog.Model):
    @cog.input("text", type=str, help="What to say")
    def predict(self, text):
        return text
"""


def test_the_source_reader_reads_predict():
    signature = static_signature(PREDICT_SOURCE, "Model", "infer.py")
    assert signature is not None
    assert signature.to_json() == {"arguments": {"text": {"type": "str", "help": "What to say"}}}


@pytest.mark.parametrize(
    "source",
    [
        "import cog\nclass Model(cog.Model):\n    def setup(self):\n        pass\n",
        "from cog import Model as M\nclass Model(M):\n    pass\n",
        # through a base class of the same file that has neither either
        "import cog\nclass Base(cog.Model):\n    pass\nclass Model(Base):\n    pass\n",
    ],
)
def test_a_class_that_surely_has_neither_method_is_refused(source):
    with pytest.raises(SignatureError) as caught:
        static_signature(source, "Model", "infer.py")
    (problem,) = caught.value.problems
    assert problem.startswith("infer.py:")
    assert problem.endswith(
        "class Model defines neither run() nor predict(); define one of them, with its "
        "inputs declared by @cog.input"
    )


@pytest.mark.parametrize(
    "source",
    [
        # a base class from elsewhere may define run()
        "from base import Base\nclass Model(Base):\n    pass\n",
        # so may a decorator, a metaclass, or an assignment after the class
        "import cog\n@register\nclass Model(cog.Model):\n    pass\n",
        "import cog\nclass Model(cog.Model, metaclass=Meta):\n    pass\n",
        "import cog\nclass Model(cog.Model):\n    pass\nModel.run = lambda self: 1\n",
        "import cog\nclass Model(cog.Model):\n    pass\nsetattr(Model, 'run', f)\n",
        # a base of this file whose run() is inherited: the image tells its inputs
        "import cog\nclass Base(cog.Model):\n    def run(self):\n        pass\n"
        "class Model(Base):\n    pass\n",
        # predict() beside a base's run(): run() is served, which the reader cannot see
        "import cog\nfrom base import Base\nclass Model(Base):\n    def predict(self):\n"
        "        pass\n",
    ],
)
def test_what_the_source_cannot_tell_is_left_to_the_image(source):
    assert static_signature(source, "Model", "infer.py") is None


def test_a_package_with_neither_method_is_refused_at_upload(tmp_path):
    root = tmp_path / "model"
    root.mkdir()
    (root / "cog.yaml").write_text('model: "infer.py:Model"\n')
    (root / "infer.py").write_text(
        "import cog\n\nclass Model(cog.Model):\n    def infer(self, x):\n        return x\n"
    )
    data, _ = package_bytes(root)
    (tmp_path / "p.zip").write_bytes(data)
    with pytest.raises(ConfigError) as caught:
        inspect_package(tmp_path / "p.zip", PackageLimits())
    assert caught.value.problems == (
        "infer.py:3: class Model defines neither run() nor predict(); define one of them, "
        "with its inputs declared by @cog.input",
    )
