"""Debian's headless Chromium, driven through Playwright, for the tests of the web page.

The browser is the system's (/usr/bin/chromium, installed by contrib/setup-machine.sh):
Playwright's own browser downloads are never used. Screenshots go to
``test-output/web/`` at the top of the repository (kept after the run, to be looked at).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.services.docker import _skip_or_setup

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("COG_TEST_CHROMIUM", "/usr/bin/chromium")
SHOTS = ROOT / "test-output" / "web"
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


@pytest.fixture
async def browser() -> AsyncIterator:
    if not Path(CHROMIUM).exists():
        _skip_or_setup("chromium")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield chromium
        finally:
            await chromium.close()


class Pages:
    """New pages at a size, each failing the test on a script error in the page."""

    def __init__(self, browser, base_url: str, name: str):
        self.browser = browser
        self.base_url = base_url
        self.name = name
        self.errors: list[str] = []

    async def new(self, viewport: dict[str, int] = LAPTOP):
        context = await self.browser.new_context(
            viewport=viewport, base_url=self.base_url, accept_downloads=True
        )
        page = await context.new_page()
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.set_default_timeout(30_000)
        return page

    async def shot(self, page, what: str) -> Path:
        """A full-page screenshot, test-output/web/<test>-<what>.png."""
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{self.name}-{what}.png"
        await page.screenshot(path=str(path), full_page=True)
        return path
