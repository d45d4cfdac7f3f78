"""`cog infer`/`cog predict` on a predictor: inputs from the command line to a prediction's
JSON, and outputs written as Cog writes them."""

from __future__ import annotations

import base64
import functools
import http.server
import json
import threading
from pathlib import Path

import pytest

from cog.cli.infer import parse_inputs, resolve_names
from cog.cli.main import build_parser
from cog.cli.predict import PredictionInputError, prediction_input, write_output
from cog.signature import OutputType, Signature

SIGNATURE = Signature.from_json(
    {
        "kind": "predictor",
        "arguments": {
            "prompt": {"type": "str"},
            "steps": {"type": "int", "default": 4, "min": 1, "max": 10},
            "scale": {"type": "float", "default": 1.0},
            "loud": {"type": "bool", "default": False},
            "image": {"type": "Path", "default": None},
            "pages": {"type": "Path", "list": True, "default": None},
            "tags": {"type": "str", "list": True, "default": []},
            "token": {"type": "Secret", "default": None},
        },
        "output": {"type": "any"},
    }
)


def uri(data: bytes, content_type="text/plain") -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode()}"


def resolved(*values):
    arguments = SIGNATURE.to_json()["arguments"]
    return resolve_names(parse_inputs(list(values)), arguments)


@pytest.fixture
def web_files(tmp_path):
    """A real HTTP server of tmp_path/web's files; its URL."""
    root = tmp_path / "web"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_values_are_converted_to_the_inputs_types_and_repeated_names_build_lists(
    tmp_path, web_files
):
    (tmp_path / "a.png").write_bytes(b"\x89PNG")
    (tmp_path / "b.txt").write_text("bee")
    root, url = web_files
    (root / "c.txt").write_text("sea")
    values = prediction_input(
        SIGNATURE,
        resolved(
            "prompt=hi", "steps=3", "scale=2", "loud=true", f"image=@{tmp_path / 'a.png'}",
            f"pages=@{tmp_path / 'b.txt'}", f"pages={url}/c.txt", "tags=x", "token=s3cret",
        ),
    )  # fmt: skip
    assert values == {
        "prompt": "hi",
        "steps": 3,
        "scale": 2.0,
        "loud": True,
        "image": uri(b"\x89PNG", "image/png"),
        # The URL is fetched by cog: the model runs with no network.
        "pages": [uri(b"bee"), uri(b"sea")],
        "tags": ["x"],
        "token": "s3cret",
    }
    # A bare value goes to the only required input.
    assert prediction_input(SIGNATURE, resolved("hello")) == {"prompt": "hello"}
    with pytest.raises(PredictionInputError) as caught:
        prediction_input(SIGNATURE, resolved("prompt=x", f"image={url}/gone.png"))
    assert str(caught.value) == (
        f"input image: cannot download {url}/gone.png: HTTP 404 File not found"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("steps=many", "input steps: 'many' is not an integer"),
        ("steps=99", "input steps: 99 is above the maximum 10"),
        ("loud=maybe", "input loud: 'maybe' is not a boolean (use true or false)"),
        ("image=@/nonexistent.png", "input image: no such file: /nonexistent.png"),
    ],
)
def test_bad_values_are_one_line(value, message):
    with pytest.raises(PredictionInputError) as info:
        prediction_input(SIGNATURE, resolved("prompt=x", value))
    assert str(info.value) == message


def test_a_single_input_named_twice_is_refused():
    with pytest.raises(PredictionInputError, match="input prompt takes one value, not a list"):
        prediction_input(SIGNATURE, resolved("prompt=a", "prompt=b"))


def test_outputs_are_written_as_cog_writes_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text, written = write_output(uri(b"\x89PNG", "image/png"), OutputType("Path"), None)
    assert text is None and written == [tmp_path / "output.png"]
    assert (tmp_path / "output.png").read_bytes() == b"\x89PNG"

    text, written = write_output([uri(b"a"), uri(b"b")], OutputType("Path", is_list=True), None)
    assert [p.name for p in written] == ["output.0.txt", "output.1.txt"]

    target = tmp_path / "out" / "result.bin"
    target.parent.mkdir()
    text, written = write_output([uri(b"a"), uri(b"b")], None, target)
    assert [p.name for p in written] == ["result.0.bin", "result.1.bin"]

    text, written = write_output(
        {"caption": "a cat", "mask": uri(b"m", "image/png"), "n": 2}, OutputType("object"), None
    )
    assert json.loads(text) == {"caption": "a cat", "mask": "output.mask.png", "n": 2}
    assert (tmp_path / "output.mask.png").read_bytes() == b"m"

    concatenated = OutputType("str", iterator=True, concatenate=True)
    assert write_output(["The", " cat"], concatenated, None) == ("The cat", [])
    assert write_output("plain", OutputType("str"), None) == ("plain", [])
    assert write_output([1, 2], OutputType("int", is_list=True), None)[0] == "[\n  1,\n  2\n]"
    assert not list(Path(tmp_path).glob(".*cog-tmp"))


def test_predict_is_infer_under_cogs_name():
    parser = build_parser()
    infer = parser.parse_args(["infer", "abc1234", "-i", "x=1"])
    predict = parser.parse_args(["predict", "abc1234", "-i", "x=1", "-i", "x=2"])
    assert predict.input == ["x=1", "x=2"]
    assert infer.id == predict.id == "abc1234"
