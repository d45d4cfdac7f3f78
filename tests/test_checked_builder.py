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


@pytest.mark.parametrize(
    ("events", "words"),
    [
        ((BuildLog("build", "done"),), "ended without reporting an image"),
        ((BuiltImage(REQUEST.image, DIGEST), BuiltImage(REQUEST.image, DIGEST)), "went on"),
        ((BuiltImage(REQUEST.image, DIGEST), BuildLog("build", "more")), "went on"),
        ((BuiltImage("registry:5000/other:1", DIGEST),), "registry:5000/m:000000000000 was"),
        ((BuiltImage(REQUEST.image, "latest"),), "no registry digest"),
        (("a string",), "no build event"),
    ],
    ids=["no image", "two images", "output after it", "another image", "no digest", "junk"],
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
