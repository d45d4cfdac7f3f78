"""What a new user tripped on, each seen when trying the tool: terminal codes in piped
output, a traceback printed twice, a screen-long LABEL line, every package called
cog-model, a file output written without a word, a warning cut mid-sentence, a file input
given without @, and a server chosen silently. The builds that show the engine's side of
these are in tests/test_cog2021.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cog import events
from cog.builders.docker import _shortened
from cog.cli.infer import InferenceError, parse_inputs, resolve_names
from cog.cli.main import default_name, not_ready, print_event, shown_path
from cog.server.build_run import BuildPosition
from tests.registry_helpers import make_model_dir, package_bytes, post_package
from tests.test_cli import cog, env, free_port, server  # noqa: F401  (fixtures)

# --- terminal codes ----------------------------------------------------------------------


def test_log_lines_are_plain_text_on_the_wire():
    """The classic builder wraps a step's stderr in red (`^[[91mdebconf: ...`): the event
    carries the words only, as does a model's own colouring or a hostile title change."""
    line = "\x1b[91mdebconf: delaying package configuration\x1b[0m\r"
    assert events.log("build", line)["line"] == "debconf: delaying package configuration"
    assert events.log("test", "model: \x1b]0;owned\x07ok \x1b[1mbold\x1b[0m")["line"] == (
        "model: ok bold"
    )
    assert events.log("build", "tab\tkept, unicode ✓ kept")["line"] == "tab\tkept, unicode ✓ kept"


def test_the_cli_prints_no_terminal_codes_a_server_sent(capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    print_event({"type": "log", "stage": "build", "target": "cpu", "line": "\x1b[91mred\x1b[0m"})
    print_event({"type": "status", "message": "\x1b[2Jcleared"})
    assert capsys.readouterr().out == "[cpu/build] red\n--> cleared\n"


# --- a failure's output, once -----------------------------------------------------------


@pytest.mark.parametrize(
    ("shown", "output", "again"),
    [
        # a RUN step's lines, streamed live as they came, with the engine's colours
        (["Step 4/9 : RUN pip install x", "\x1b[91mERROR: No matching distribution\x1b[0m"],
         ("ERROR: No matching distribution",), False),
        # the model's setup traceback, streamed by the check as "model: ..." lines
        (["model: Traceback (most recent call last):", "model: ValueError: no weights"],
         ("Traceback (most recent call last):", "ValueError: no weights"), False),
        # BuildKit's lines carry their step's number
        (["#7 0.412 ERROR: no such package"], ("ERROR: no such package",), False),
        # an example's answer: the model's lines were not shown before
        (["model: ready"], ("Traceback (most recent call last):", "KeyError: 'x'"), True),
        (["model: ValueError: no weights"], ("ValueError: no weights", "one more"), True),
    ],
)  # fmt: skip
async def test_a_failures_last_lines_are_printed_only_when_not_shown_already(shown, output, again):
    position = BuildPosition()
    for line in shown:
        position.saw(line)
    assert position.shown(output) is not again


# --- the LABEL step ---------------------------------------------------------------------


def test_the_label_step_is_shown_short():
    config = json.dumps(json.dumps({"Model": "infer.py:Model", "Environment": {"x": "y" * 900}}))
    line = (
        f'Step 13/13 : LABEL org.cog-models.package-id="{"f" * 64}" '
        f'org.cog-models.target="cpu" org.cog-models.config={config} '
        'org.cog-models.cog-version="0.1.0"'
    )
    shown = _shortened(line)
    assert len(line) > 1000 and len(shown) < 200
    assert shown == (
        'Step 13/13 : LABEL org.cog-models.package-id="fffffffffffffffffffff..." '
        'org.cog-models.target="cpu" org.cog-models.config="{\\"Model\\": \\"infer.p..." '
        'org.cog-models.cog-version="0.1.0"'
    )
    assert _shortened("Step 3/13 : RUN " + "x" * 500) == "Step 3/13 : RUN " + "x" * 500


# --- names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("directory", "name"),
    [
        ("hello", "hello"),
        ("My Model_v2", "my-model-v2"),
        ("inst-colorization", "inst-colorization"),
        ("--weird..dir--", "weird-dir"),
        ("___", None),
    ],
)
def test_a_package_without_a_name_is_named_after_its_directory(directory, name):
    assert default_name(Path("/models") / directory) == name


def test_packages_without_names_can_be_told_apart(server, env, tmp_path):  # noqa: F811
    env = {**env, "COG_REMOTE": server}
    for directory in ("blur", "Colorizer 2"):
        model = make_model_dir(tmp_path / directory)
        (model / "cog.yaml").write_text("model: infer.py:Model\n")
        (model / "infer.py").write_text(
            (model / "infer.py").read_text().replace("hello", directory)
        )
        cog("build", str(model), env=env)
    names = sorted(p["Name"] for p in json.loads(cog("list", "--json", env=env).stdout))
    assert names == ["blur", "colorizer-2"]

    # Uploaded by other means without a name: the server's default, as the README says.
    model = make_model_dir(tmp_path / "curl")
    (model / "cog.yaml").write_text("model: infer.py:Model\n")
    status, document = post_package(server, package_bytes(model)[0])
    assert status == 200 and document["Name"] == "cog-model"


def test_a_name_that_cannot_name_an_image_is_refused(server, tmp_path):  # noqa: F811
    data, _ = package_bytes(make_model_dir(tmp_path / "m"))
    status, document = post_package(f"{server}", data, query="?name=Not%20A%20Name")
    assert status == 400
    assert document == {
        "error": "name: 'Not A Name' is not a valid image name (lowercase letters, digits, "
        "'.', '_', '-' and '/' between parts, e.g. 'acme/colorizer')"
    }


# --- cog infer --------------------------------------------------------------------------


def test_a_file_input_without_at_says_how_to_write_it():
    arguments = {"image": {"type": "Path"}, "sigma": {"type": "float", "default": 2.0}}
    with pytest.raises(InferenceError) as caught:
        resolve_names(parse_inputs(["image=examples/lena.png"]), arguments)
    assert str(caught.value) == (
        "input image is a file: write -i image=@examples/lena.png (a value without @ is sent "
        "as text)"
    )
    with pytest.raises(InferenceError, match=r"write -i @lena\.png "):
        resolve_names(parse_inputs(["lena.png"]), arguments)
    assert resolve_names(parse_inputs(["@lena.png", "sigma=3"]), arguments) == [
        ("image", "@lena.png"),
        ("sigma", "3"),
    ]


def test_where_a_file_output_went_is_said_as_the_user_would_write_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shown_path(tmp_path / "output.png") == "output.png"
    assert shown_path(tmp_path / "out" / "x.png") == os.path.join("out", "x.png")
    assert shown_path(Path("/etc/x.png")) == "/etc/x.png"


@pytest.mark.parametrize(
    ("package", "said"),
    [
        (
            {"ID": "7e09e581d43e" + "0" * 52, "Status": "failed",
             "Error": "the model's setup failed: the model's inputs are declared wrongly:\n"
                      "infer.py:5: Model.run: input 'x': default 9 is above max 4"},
            "package 7e09e581d43e failed: the model's setup failed: the model's inputs are "
            "declared wrongly; infer.py:5: Model.run: input 'x': default 9 is above max 4",
        ),
        ({"ID": "a" * 64, "Status": "failed", "Error": "x" * 1000}, f"package {'a' * 12} failed: "
                                                                     + "x" * 297 + "..."),
        ({"ID": "b" * 64, "Status": "building", "Error": ""}, f"package {'b' * 12} is building"),
    ],
)  # fmt: skip
def test_the_warning_for_a_package_not_ready_is_one_whole_line(package, said):
    assert not_ready(package) == said
    assert "\n" not in said


# --- which server -----------------------------------------------------------------------


def test_without_a_remote_the_cli_says_which_server_it_talks_to(env, tmp_path):  # noqa: F811
    result = cog("list", env=env, check=False)
    first = result.stderr.splitlines()[0]
    assert first == (
        "cog: using the cog server at http://localhost:8080 (no remote is set; choose one "
        "with `cog remote set URL`)"
    )
    cog("remote", "set", f"http://127.0.0.1:{free_port()}", env=env)
    result = cog("list", env=env, check=False)
    assert "no remote is set" not in result.stderr
    assert result.stderr.startswith("cog: error: cannot reach the cog server at http://127.0")
