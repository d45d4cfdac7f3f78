"""CheckedBuilder: what any builder yields is held to the contract, and what it raises is
translated. The builders here break the contract on purpose, which no real builder does
on cue."""

from __future__ import annotations

from pathlib import Path

import pytest

from cog.builders import (
    Builder,
    BuildError,
    BuilderUnavailable,
    BuildLog,
    BuildRequest,
    BuiltImage,
    CheckedBuilder,
    ImageLoaded,
)
from cog.config import Config

DIGEST = "sha256:" + "a" * 64
REQUEST = BuildRequest(
    package_id="0" * 64,
    package_zip=Path("/nonexistent.zip"),
    config=Config(model="infer.py:Model"),
    target="cpu",
    image="registry:5000/m:000000000000",
)


class Scripted(Builder):
    """Yields the given events, then raises `fail` if given."""

    name = "scripted"

    def __init__(self, *events, fail: BaseException | None = None):
        self.events = events
        self.fail = fail
        self.closed = False

    @classmethod
    def from_settings(cls, settings):
        return cls()

    async def build(self, request):
        try:
            for event in self.events:
                yield event
            if self.fail is not None:
                raise self.fail
        finally:
            self.closed = True


async def run(builder: Builder) -> list:
    return [event async for event in CheckedBuilder(builder).build(REQUEST)]


async def test_a_builder_keeping_the_contract_passes_through():
    events = await run(Scripted(BuildLog("build", "one"), BuiltImage(REQUEST.image, DIGEST)))
    assert events == [BuildLog("build", "one"), BuiltImage(REQUEST.image, DIGEST)]


async def test_a_builder_may_say_its_image_is_loaded_before_the_push():
    script = (
        BuildLog("build", "one"),
        ImageLoaded(REQUEST.image),
        BuildLog("push", "pushed"),
        BuiltImage(REQUEST.image, DIGEST),
    )
    assert await run(Scripted(*script)) == list(script)


@pytest.mark.parametrize(
    ("events", "words"),
    [
        ((BuildLog("build", "done"),), "ended without reporting an image"),
        ((BuiltImage(REQUEST.image, DIGEST), BuiltImage(REQUEST.image, DIGEST)), "went on"),
        ((BuiltImage(REQUEST.image, DIGEST), BuildLog("build", "more")), "went on"),
        ((BuiltImage("registry:5000/other:1", DIGEST),), "registry:5000/m:000000000000 was"),
        ((BuiltImage(REQUEST.image, "latest"),), "no registry digest"),
        (("a string",), "no build event"),
        ((ImageLoaded("registry:5000/other:1"),), "registry:5000/m:000000000000 was"),
        ((ImageLoaded(REQUEST.image), ImageLoaded(REQUEST.image)), "loaded twice"),
        ((BuiltImage(REQUEST.image, DIGEST), ImageLoaded(REQUEST.image)), "went on"),
    ],
    ids=[
        "no image",
        "two images",
        "output after it",
        "another image",
        "no digest",
        "junk",
        "another image loaded",
        "loaded twice",
        "loaded after the push",
    ],
)
async def test_a_builder_breaking_the_contract_fails_the_build(events, words):
    builder = Scripted(*events)
    with pytest.raises(BuildError) as caught:
        await run(builder)
    assert not isinstance(caught.value, BuilderUnavailable)  # shown as a failed build
    assert words in str(caught.value) and "scripted" in str(caught.value)
    assert builder.closed


async def test_a_builders_own_exception_is_the_servers_problem():
    with pytest.raises(BuilderUnavailable) as caught:
        await run(Scripted(BuildLog("build", "x"), fail=KeyError("token")))
    assert str(caught.value) == "scripted failed while building: KeyError: 'token'"


async def test_build_errors_pass_unchanged():
    error = BuildError("apt-get failed", step="RUN apt-get", output=("E: no package",))
    with pytest.raises(BuildError) as caught:
        await run(Scripted(fail=error))
    assert caught.value is error


@pytest.mark.parametrize("cls", [BuildError, BuilderUnavailable])
async def test_a_step_that_says_why_in_cogs_words_fails_with_that_why(cls):
    """A step of cog's Dockerfile that fails printing `cog: <why>` (the check of the
    image's Python): its why is the build's error, kind, step and output kept. The engine's
    colour codes around it and its lines after it do not hide it."""
    output = (
        " ---> Running in 917906857d30",
        "\x1b[91mcog: python_version is 3.8, but ...\x1b[0m\x1b[91m",
        "\x1b[0mRemoving intermediate container 917906857d30",
    )
    step = """Step 3/9 : RUN python -c 'import sys; sys.exit(... "cog: python_version is ...")'"""
    error = cls("The command ... returned a non-zero code: 1", step=step, output=output)
    with pytest.raises(cls) as caught:
        await run(Scripted(fail=error))
    assert caught.value.message == "python_version is 3.8, but ..."
    assert caught.value.step == error.step and caught.value.output == output


@pytest.mark.parametrize(
    ("step", "output"),
    [
        ("RUN apt-get install x", ("cog: a package's step says it", "E: no package x")),
        ("RUN pip install x", ("cog: a package's step says it",)),
        ("RUN echo 'cog: no python'", ("cog: ",)),
        ("RUN echo 'cog: no python'", ("pip says cog: something",)),
        ("RUN echo 'cog: no python'", ()),
        (None, ("cog: no step",)),
    ],
)
async def test_only_cogs_own_steps_are_taken_at_their_word(step, output):
    error = BuildError("failed", step=step, output=output)
    with pytest.raises(BuildError) as caught:
        await run(Scripted(fail=error))
    assert caught.value is error


def test_a_long_step_is_shortened_in_the_message():
    step = "Step 3/9 : RUN " + "x" * 500
    message = str(BuildError("failed", step=step))
    assert message == f"failed (step: {step[:117]}...)"
    assert len(message) == len("failed (step: )") + 120
    assert str(BuildError("failed", step="Step 1/2 : FROM a")) == "failed (step: Step 1/2 : FROM a)"
