"""The web page at /: its files, the listing it reads, the example files it shows, and the
page itself in Debian's headless Chromium (list, a package's page, honest states, the
token prompt), on a server without a builder. Builds followed live, failed builds and
"Try it" are in test_web_builds.py."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import re

import attrs
import pytest

from cog.server.app import ServerSettings, make_app
from cog.server.auth import Scope, TokenEntry, new_token, token_digest
from cog.server.records import SUMMARY_KEYS
from tests.registry_helpers import EXAMPLES, form, package_bytes
from tests.services.browser import PHONE, Pages


def settings(tmp_path) -> ServerSettings:
    return ServerSettings(
        storage_url=f"file://{tmp_path / 'store'}", builder=None, tmp_dir=tmp_path / "spool"
    )


@pytest.fixture
async def client(aiohttp_client, tmp_path):
    return await aiohttp_client(make_app(settings(tmp_path)))


async def upload(client, example: str) -> str:
    data, package_id = package_bytes(EXAMPLES / example)
    response = await client.post("/v1/packages/upload", data=form(data))
    assert response.status == 200, await response.text()
    return package_id


# -- the page's files ---------------------------------------------------------------------


async def test_page_and_its_files_are_served_from_memory_named_by_content(client):
    response = await client.get("/", headers={"Accept-Encoding": "identity"})
    assert response.status == 200
    assert response.content_type == "text/html"
    assert response.headers["Cache-Control"] == "no-cache"
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    html = await response.text()
    assets = re.findall(r'/static/([\w.]+)\?v=(\w+)"', html)
    assert {name for name, _ in assets} == {"style.css", "app.js", "favicon.svg"}

    for name, version in assets:
        url = f"/static/{name}?v={version}"
        zipped = await client.get(url, headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
        assert zipped.status == 200
        assert zipped.headers["Content-Encoding"] == "gzip"
        assert zipped.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        plain = await client.get(f"/static/{name}", headers={"Accept-Encoding": "identity"})
        assert gzip.decompress(await zipped.read()) == await plain.read()
        assert plain.headers["Cache-Control"] == "no-cache"  # an unversioned URL
        again = await client.get(
            f"/static/{name}?v={version}", headers={"If-None-Match": zipped.headers["ETag"]}
        )
        assert again.status == 304

    # Every page URL is the same document; the script draws the page.
    package = await client.get("/packages/1d7a5caeb49e", headers={"Accept-Encoding": "identity"})
    assert await package.text() == html
    missing = await client.get("/static/nope.js")
    assert missing.status == 404
    assert (await missing.json())["error"] == "no such file: /static/nope.js"


async def test_ping_says_whether_the_server_builds(client):
    assert (await (await client.get("/ping")).json())["builder"] is None


# -- the listing the page reads ---------------------------------------------------------


async def test_listing_pages_of_summaries_filtered_by_name(client):
    hello = await upload(client, "hello")
    thumbnail = await upload(client, "thumbnail")  # newer
    response = await client.get("/v1/packages/?limit=1")
    assert response.headers["X-Total-Count"] == "2"
    assert [p["ID"] for p in await response.json()] == [thumbnail]
    response = await client.get("/v1/packages/?limit=1&offset=1")
    (summary,) = await response.json()
    assert set(summary) == set(SUMMARY_KEYS) | {"UploadedBy"}
    assert "Config" not in summary and "Signature" not in summary
    assert (summary["ID"], summary["Name"], summary["Status"]) == (hello, "examples/hello", "ready")

    response = await client.get("/v1/packages/?name=THUMB")
    assert response.headers["X-Total-Count"] == "1"
    assert [p["Name"] for p in await response.json()] == ["examples/thumbnail"]
    response = await client.get("/v1/packages/?name=nothing-like-it")
    assert (response.headers["X-Total-Count"], await response.json()) == ("0", [])
    # Without paging, every package's summary (the whole document: GET /v1/packages/<id>).
    every = await (await client.get("/v1/packages/")).json()
    assert [p["ID"] for p in every] == [thumbnail, hello] and "Config" not in every[0]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("limit=0", "limit must be a whole number from 1 to 1000"),
        ("limit=1001", "limit must be a whole number from 1 to 1000"),
        ("limit=ten", "limit must be a whole number from 1 to 1000"),
        ("offset=-1", "offset must be a whole number from 0 or more"),
    ],
)
async def test_listing_refuses_bad_paging(client, query, message):
    response = await client.get(f"/v1/packages/?{query}")
    assert response.status == 400
    assert (await response.json())["error"] == message


# -- the files examples name ------------------------------------------------------------


async def test_example_files_are_served_and_nothing_else(client):
    package_id = await upload(client, "thumbnail")
    picture = (EXAMPLES / "thumbnail" / "input.png").read_bytes()
    # Two at once: one extraction, the same bytes for both.
    first, second = await asyncio.gather(
        client.get(f"/v1/packages/{package_id[:12]}/files/input.png"),
        client.get(f"/v1/packages/{package_id[:12]}/files/expected-gray.png"),
    )
    assert first.status == second.status == 200
    assert await first.read() == picture
    assert await second.read() == (EXAMPLES / "thumbnail" / "expected-gray.png").read_bytes()
    assert first.content_type == "image/png"
    assert first.headers["Content-Security-Policy"] == "default-src 'none'; sandbox"

    for name in ("infer.py", "cog.yaml", "input.png/x", "sub/../cog.yaml"):
        response = await client.get(f"/v1/packages/{package_id}/files/{name}")
        assert response.status == 404, name
        assert "is not a file named by an example" in (await response.json())["error"]


async def test_example_files_are_kept_once_taken_out(client, tmp_path):
    package_id = await upload(client, "thumbnail")
    assert (await client.get(f"/v1/packages/{package_id}/files/input.png")).status == 200
    # The zip is gone from storage: the file shown before is still shown (the package is
    # content-addressed, so what was taken out cannot have changed).
    (tmp_path / "store" / "packages" / f"{package_id}.zip").unlink()
    again = await client.get(f"/v1/packages/{package_id}/files/input.png")
    assert again.status == 200
    assert await again.read() == (EXAMPLES / "thumbnail" / "input.png").read_bytes()


# -- the page in a browser --------------------------------------------------------------

browser_test = pytest.mark.integration


@browser_test
async def test_empty_registry_without_builder(browser, aiohttp_server, tmp_path):
    server = await aiohttp_server(make_app(settings(tmp_path)))
    pages = Pages(browser, str(server.make_url("")), "empty")
    for size, viewport in (("laptop", None), ("phone", PHONE)):
        page = await (pages.new(viewport) if viewport else pages.new())
        await page.goto("/")
        await page.get_by_text("No packages yet").wait_for()
        assert "cog remote set http://127.0.0.1:" in await page.locator(".empty pre").inner_text()
        assert await page.get_by_text("This server has no builder.").is_visible()
        assert await page.locator("input[type=search]").is_disabled()
        await pages.shot(page, size)
    assert pages.errors == []


@browser_test
async def test_list_and_package_pages_without_builder(browser, aiohttp_server, tmp_path):
    server = await aiohttp_server(make_app(settings(tmp_path)))
    base = str(server.make_url(""))
    for example in ("hello", "thumbnail"):
        data, _ = package_bytes(EXAMPLES / example)
        async with server_session() as session:
            response = await session.post(f"{base}/v1/packages/upload", data=form(data))
            assert response.status == 200
    _, thumbnail = package_bytes(EXAMPLES / "thumbnail")
    pages = Pages(browser, base, "stored")

    page = await pages.new()
    await page.goto("/")
    rows = page.locator("table.packages tbody tr")
    await rows.nth(1).wait_for()
    assert await rows.count() == 2
    assert await rows.nth(0).locator("td.name").inner_text() == "examples/thumbnail"
    assert await rows.nth(0).locator("td.id").inner_text() == thumbnail[:12]
    assert await rows.nth(0).locator(".badge").inner_text() == "ready"
    assert await rows.nth(0).locator("td.created").inner_text() == "just now"
    # Hovering gives the local date and time, from the record's own UTC time.
    created = rows.nth(0).locator("td.created time")
    iso, title = await created.get_attribute("datetime"), await created.get_attribute("title")
    assert title == await page.evaluate(
        "iso => new Date(iso).toLocaleString("
        "undefined, {dateStyle: 'medium', timeStyle: 'medium'})",
        iso,
    )
    assert str(datetime.datetime.now().year) in title
    assert await rows.nth(0).locator("td.size").inner_text() == "8.7 KiB"
    await pages.shot(page, "list-laptop")

    # Filtering by name, kept in the URL.
    await page.locator("input[type=search]").fill("hell")
    await page.wait_for_url("**/?name=hell")
    await page.locator("tbody tr", has_text="examples/thumbnail").wait_for(state="detached")
    assert await rows.count() == 1
    await page.locator("input[type=search]").fill("zebra")
    await page.get_by_text("No package name contains “zebra”.").wait_for()
    await page.locator("input[type=search]").fill("")
    await rows.nth(1).wait_for()

    # A package's page, at its stable URL.
    await page.get_by_role("link", name="examples/thumbnail").click()
    await page.wait_for_url(f"**/packages/{thumbnail}")
    await page.locator("h1", has_text="examples/thumbnail").wait_for()
    assert await page.locator("#package-id").inner_text() == thumbnail
    inputs = page.locator("table.inputs tbody tr")
    assert await inputs.count() == 5
    assert await inputs.nth(0).locator("td").all_inner_texts() == [
        "image",
        "file",
        "required",
        "",
        "The image (any format Pillow reads)",
    ]
    assert (await inputs.nth(1).locator("td").all_inner_texts())[:4] == [
        "width",
        "int",
        "64",
        "min 8, max 1024",
    ]
    assert "nearest" in await inputs.nth(3).locator(".pills").inner_text()
    # The examples' pictures, shown.
    pictures = page.locator(".example img")
    await page.wait_for_function(
        "() => { const all = [...document.querySelectorAll('.example img')];"
        " return all.length === 4 && all.every(i => i.complete && i.naturalWidth > 0); }"
    )
    assert await pictures.count() == 4
    assert (
        "cog infer " + thumbnail[:12] + " -i image=@input.png"
        in await page.locator(".cmd pre").first.inner_text()
    )
    assert await page.get_by_text("This server has no builder, so it cannot run models.").count()
    assert await page.get_by_text("No build log: this package was stored without a build.").count()
    zip_link = page.get_by_role("link", name="Download zip")
    assert await zip_link.get_attribute("href") == f"/v1/packages/{thumbnail}.zip"
    await pages.shot(page, "package-laptop")

    phone = await pages.new(PHONE)
    await phone.goto(f"/packages/{thumbnail[:12]}")  # a prefix: the page moves to the full ID
    await phone.wait_for_url(f"**/packages/{thumbnail}")
    await phone.locator("h1", has_text="examples/thumbnail").wait_for()
    await pages.shot(phone, "package-phone")
    await phone.goto("/")
    await phone.locator("table.packages tbody tr").nth(1).wait_for()
    width = await phone.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], "the list is wider than a phone"
    await pages.shot(phone, "list-phone")

    await phone.goto("/packages/0123456789abcdef")
    await phone.get_by_text("no package matches '0123456789abcdef'").wait_for()
    assert pages.errors == []


def server_session():
    import aiohttp

    return aiohttp.ClientSession()


@browser_test
async def test_the_page_asks_for_a_token_and_keeps_it_in_session_storage(
    browser, aiohttp_server, tmp_path
):
    # A server with tokens: the API answers 401 (WWW-Authenticate: Bearer) without one.
    token = new_token()
    tokens = tmp_path / "tokens"
    tokens.write_text(TokenEntry("browser", frozenset({Scope.READ}), token_digest(token)).line())
    app = make_app(attrs.evolve(settings(tmp_path), tokens_file=tokens))
    server = await aiohttp_server(app)
    pages = Pages(browser, str(server.make_url("")), "token")
    page = await pages.new()
    await page.goto("/")
    dialog = page.locator("#token-dialog")
    await dialog.get_by_text("This server asks for a token").wait_for()
    await page.locator("#token-input").fill("wrong")
    await page.get_by_role("button", name="Use this token").click()
    await dialog.get_by_text("That token was refused").wait_for()
    await pages.shot(page, "prompt")
    await page.locator("#token-input").fill(token)
    await page.get_by_role("button", name="Use this token").click()
    await page.get_by_text("No packages yet").wait_for()
    assert await page.evaluate("sessionStorage.getItem('cog-token')") == token
    assert await page.evaluate("localStorage.length") == 0
    # Forgetting it asks again.
    await page.get_by_role("button", name="Forget token").click()
    await dialog.get_by_text("This server asks for a token").wait_for()
    assert await page.evaluate("sessionStorage.getItem('cog-token')") is None
    assert pages.errors == []
