"""The web page in Debian's headless Chromium with real builds: "Try it" on the built
examples (hello: text in and out; thumbnail: a picture in and out), a build followed live
while its check waits, and a failed build with its failing step highlighted."""

from __future__ import annotations

import asyncio
import json
import subprocess

import aiohttp
import pytest

from cog.builders import BuilderSettings
from cog.events import NDJSON
from cog.server.app import ServerSettings, make_app
from cog.server.settings import IngestOptions
from tests.registry_helpers import EXAMPLES, form, package_bytes
from tests.services.browser import PHONE, Pages

pytestmark = [pytest.mark.integration, pytest.mark.slow]

THUMBNAIL = EXAMPLES / "thumbnail"


async def test_try_it_on_the_built_examples(browser, aiohttp_server, built_examples, tmp_path):
    server = await aiohttp_server(make_app(built_examples.settings(tmp_path)))
    pages = Pages(browser, str(server.make_url("")), "try")
    page = await pages.new()
    await page.goto(f"/packages/{built_examples.hello}")
    form = page.locator("form.try")
    await form.wait_for()
    assert await page.locator("#input-name").input_value() == "world"
    assert await page.locator("#input-times").get_attribute("max") == "5"
    await page.locator("#input-name").fill("web")
    await page.locator("#input-punctuation").select_option("!")
    await page.locator("#input-times").fill("2")
    await page.locator("#input-shout").check()
    await form.get_by_role("button", name="Run").click()
    output = page.locator("#output-value")
    await output.wait_for()
    assert await output.inner_text() == "HELLO, WEB! HELLO, WEB!"
    await form.get_by_text("Done in").wait_for()
    await pages.shot(page, "hello-laptop")

    phone = await pages.new(PHONE)
    await phone.goto(f"/packages/{built_examples.thumbnail}")
    await phone.locator("form.try").wait_for()
    await phone.locator("#input-image").set_input_files(str(THUMBNAIL / "input.png"))
    await phone.locator("#input-width").fill("40")
    await phone.locator("#input-contrast").fill("1.8")
    await phone.locator("#input-resample").select_option("nearest")
    await phone.locator("#input-grayscale").check()
    await phone.locator("form.try").get_by_role("button", name="Run").click()
    picture = phone.locator("#output-image")
    await picture.wait_for()
    await phone.wait_for_function(
        "() => { const i = document.querySelector('#output-image');"
        " return i && i.complete && i.naturalWidth === 40; }"
    )
    link = phone.get_by_role("link", name="Download input-thumbnail.png")
    async with phone.expect_download() as saving:
        await link.click()
    saved = await (await saving.value).path()
    assert saved.read_bytes() == (THUMBNAIL / "expected-gray.png").read_bytes()
    await picture.scroll_into_view_if_needed()
    await pages.shot(phone, "thumbnail-phone")
    assert pages.errors == []


LIVE_MODEL = """\
import os
import time

import cog


class Model(cog.Model):
    def setup(self):
        print("waiting for /tmp/go", flush=True)
        while not os.path.exists("/tmp/go"):
            time.sleep(0.05)
        print("going", flush=True)

    @cog.input("text", type=str, default="x")
    def run(self, text):
        return text
"""


def model_dir(root, name: str, extra: str = ""):
    root.mkdir(parents=True)
    (root / "cog.yaml").write_text(
        f"name: {name}\nmodel: infer.py:Model\nenvironment:\n  python_version: '3.11'\n{extra}"
    )
    (root / "infer.py").write_text(LIVE_MODEL)
    return root


async def test_a_build_followed_live_and_a_failed_one(
    browser, aiohttp_server, registry, base_images, tmp_path
):
    settings = ServerSettings(
        storage_url=f"file://{tmp_path / 'store'}",
        builder="docker",
        builder_settings=BuilderSettings(registry=registry),
        ingest=IngestOptions(check_timeout=120),
        tmp_dir=tmp_path / "spool",
    )
    server = await aiohttp_server(make_app(settings))
    base = str(server.make_url(""))
    pages = Pages(browser, base, "build")
    data, package_id = package_bytes(model_dir(tmp_path / "live", "test/live"))

    async def upload(data: bytes) -> list[dict]:
        async with aiohttp.ClientSession() as session:
            response = await session.post(
                f"{base}/v1/packages/upload", data=form(data), headers={"Accept": NDJSON}
            )
            return [json.loads(line) async for line in response.content if line.strip()]

    building = asyncio.ensure_future(upload(data))
    page = await pages.new()
    # The record exists once the upload is stored: the page opens while it builds.
    while (await page.goto(f"/v1/packages/{package_id}")).status == 404:
        await asyncio.sleep(0.1)
    await page.goto(f"/packages/{package_id}")
    await page.locator(".badge.building").first.wait_for()
    log = page.locator(".log")
    await log.get_by_text("stdout: waiting for /tmp/go").wait_for(timeout=120_000)
    assert await page.get_by_text("following live…").is_visible()
    await pages.shot(page, "live-building")
    # Let the model's setup() go on: the build ends, the page follows it to "ready".
    image = f"{registry}/test/live:{package_id[:12]}"
    checking = subprocess.run(
        ["docker", "ps", "-q", "--filter", "label=org.cog-models.role=check",
         "--filter", f"ancestor={image}"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert len(checking) == 1
    subprocess.run(["docker", "exec", checking[0], "touch", "/tmp/go"], check=True)
    await log.locator(".end").wait_for(timeout=60_000)
    await page.locator("h1 + .badge.ready").wait_for()
    assert await log.get_by_text("stdout: going").count() == 1
    assert (await building)[-1]["type"] == "package"
    await pages.shot(page, "live-ready")

    # A build that fails: its failing step is highlighted, and the error is said.
    broken = model_dir(
        tmp_path / "broken",
        "test/broken",
        "  python_packages: ['cog-test-no-such-package==0.0.1']\n",
    )
    data, broken_id = package_bytes(broken)
    events = await upload(data)
    assert events[-1]["type"] == "error" and events[-1]["step"].startswith("Step ")
    page = await pages.new()
    await page.goto(f"/packages/{broken_id}")
    await page.locator("h1 + .badge.failed").wait_for()
    assert await page.get_by_text("The build failed.").is_visible()
    first = page.locator(".log .failing.first")
    await first.wait_for()
    assert "RUN" in await first.inner_text() and "pip install" in await first.inner_text()
    assert await page.locator(".log .failing").count() > 2
    assert await page.get_by_role("link", name="Jump to the failing step").is_visible()
    # Neither "Try it" nor the Run button for a failed package.
    assert await page.locator("form.try").count() == 0
    await pages.shot(page, "failed")
    assert pages.errors == []
