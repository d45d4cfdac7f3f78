"""Base images for more Pythons: those contrib/setup-machine.sh builds from Debian's suites
(3.9, 3.11, 3.13), and the test stand-ins for Pythons no suite ships (3.8 and 3.10, from
pyenv's builds; tests/services/standins.py). A model builds and answers on each, and a
Python that has no base image is a clear error naming it and the image."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cog.builders import BuilderSettings, BuilderUnavailable, CheckedBuilder
from cog.builders.docker import DockerBuilder
from cog.server.check import check_image
from tests.builder_helpers import ROOT, collect, copy_example, package_request
from tests.services.docker import image_exists

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: What setup-machine.sh makes: the tag's Python is the one Debian's suite ships.
DEBIAN_BASES = {"python:3.9-slim": "3.9", "python:3.11-slim": "3.11", "python:3.13-slim": "3.13"}


@pytest.fixture(scope="module")
def debian_bases(base_images) -> dict[str, str]:
    missing = [tag for tag in DEBIAN_BASES if not image_exists(tag)]
    if missing:
        setup = ROOT / "contrib" / "setup-machine.sh"
        subprocess.run(["bash", str(setup)], check=True, capture_output=True)
    return DEBIAN_BASES


@pytest.mark.parametrize("tag", list(DEBIAN_BASES))
def test_each_debian_base_runs_the_python_its_tag_names_and_has_pip(debian_bases, tag):
    code = 'import sys, ensurepip, venv, ssl; print("%d.%d" % sys.version_info[:2])'
    ran = subprocess.run(
        ["docker", "run", "--rm", tag, "sh", "-c", f"python -c '{code}' && python -m pip -V"],
        capture_output=True,
        text=True,
    )
    assert ran.returncode == 0, ran.stderr
    version, pip = ran.stdout.splitlines()
    assert version == debian_bases[tag]
    assert pip.startswith("pip ") and pip.endswith(f"(python {version})")


def hello_on(root: Path, version: str) -> Path:
    cog_yaml = root / "cog.yaml"
    cog_yaml.write_text(cog_yaml.read_text().replace('"3.11"', f'"{version}"'))
    return root


@pytest.mark.parametrize(
    ("version", "template"),
    [
        ("3.9", "python:{python_version}-slim"),  # Debian bullseye's
        ("3.10", "standin"),  # pyenv's, on bookworm
        ("3.13", "python:{python_version}-slim"),  # Debian trixie's
    ],
)
async def test_a_model_builds_and_answers_on_each_python(
    debian_bases, standin_bases, registry, tmp_path, version, template, no_leaked_containers
):
    template = standin_bases if template == "standin" else template
    root = hello_on(copy_example("hello", tmp_path), version)
    request = package_request(root, tmp_path / "p.zip", registry)
    settings = BuilderSettings(registry=registry, base_images={"cpu": template})
    builder = CheckedBuilder(DockerBuilder.from_settings(settings))
    try:
        _, built = await collect(builder.build(request))
    finally:
        await builder.close()
    assert [b.image for b in built] == [request.image]
    check = [
        e.line async for e in check_image(request.image, request.package_zip, request.config, None)
    ]
    assert "Example 3: ok" in " ".join(check), check
    ran = subprocess.run(
        ["docker", "run", "--rm", request.image, "python", "-c",
         "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert ran.stdout.strip() == version


async def test_a_python_without_a_base_image_fails_naming_it_and_the_image(
    debian_bases, registry, tmp_path, no_leaked_containers
):
    root = hello_on(copy_example("hello", tmp_path), "3.12")  # no Debian suite ships 3.12
    request = package_request(root, tmp_path / "p.zip", registry)
    builder = CheckedBuilder(DockerBuilder.from_settings(BuilderSettings(registry=registry)))
    try:
        with pytest.raises(BuilderUnavailable) as caught:
            await collect(builder.build(request))
    finally:
        await builder.close()
    message = str(caught.value)
    assert message.startswith(
        "no base image for Python 3.12: python:3.12-slim is not on the Docker Engine "
        "(pulling it failed: "
    ), message
    assert message.endswith(
        "build it (contrib/setup-machine.sh builds python:3.9-slim, python:3.11-slim and "
        "python:3.13-slim) or give the server one with --base-image cpu=IMAGE "
        "(step: base image)"
    ), message
