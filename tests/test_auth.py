"""Who may do what: tokens and scopes through the real app (store-only, real local
storage), the tokens file, an embedder's own authenticator, and the CLI's token, login
and logout as users run them against a real `cog server` process."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from cog.server.app import ServerSettings, make_app
from cog.server.auth import (
    AUTHENTICATOR,
    ROUTE_ACCESS,
    Authenticator,
    Identity,
    Routes,
    Scope,
    TokenEntry,
    TokensFile,
    TokensFileError,
    Unauthenticated,
    new_token,
    parse_scopes,
    parse_tokens,
    token_digest,
)
from tests.registry_helpers import form, make_model_dir, package_bytes
from tests.test_cli import COG, cog, cog_server, free_port, wait_for

TOKENS = {
    "reader": ("read", new_token()),
    "builder": ("read,write", new_token()),
    "ops": ("admin", new_token()),
}


def tokens_file(path: Path, tokens=TOKENS) -> Path:
    lines = ["# name scopes sha256", ""]
    for name, (scopes, token) in tokens.items():
        lines.append(TokenEntry(name, parse_scopes(scopes), token_digest(token)).line())
    path.write_text("\n".join(lines) + "\n")
    return path


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name][1]}"}


def settings_for(tmp_path: Path, **changes) -> ServerSettings:
    return ServerSettings(
        storage_url=f"file://{tmp_path / 'store'}",
        builder=None,
        tmp_dir=tmp_path / "spool",
        cache_ttl=0.2,
        **changes,
    )


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    return tokens_file(tmp_path / "tokens")


@pytest.fixture
async def client(aiohttp_client, tmp_path, tokens):
    return await aiohttp_client(make_app(settings_for(tmp_path, tokens_file=tokens)))


@pytest.fixture
def hello(tmp_path: Path) -> tuple[bytes, str]:
    return package_bytes(make_model_dir(tmp_path / "hello"))


async def stored(client, data: bytes) -> str:
    response = await client.post("/v1/packages/upload", data=form(data), headers=bearer("builder"))
    assert response.status == 200, await response.text()
    return (await response.json())["ID"]


def routes(package_id: str) -> list[tuple[str, str]]:
    return [
        ("GET", "/v1/packages/"),
        ("GET", f"/v1/packages/{package_id}"),
        ("HEAD", f"/v1/packages/{package_id}.zip"),
        ("GET", f"/v1/packages/{package_id}.zip"),
        ("GET", f"/v1/packages/{package_id}/log"),
        ("POST", f"/v1/packages/{package_id}/build"),
        ("DELETE", f"/v1/packages/{package_id}"),
        ("POST", "/v1/packages/upload"),
    ]


async def test_without_a_token_only_ping_answers(client, hello):
    package_id = await stored(client, hello[0])
    assert (await client.get("/ping")).status == 200
    for method, path in routes(package_id):
        for headers in (
            {},
            {"Authorization": f"Bearer {new_token()}"},
            {"Authorization": "Basic x"},
        ):
            response = await client.request(method, path, headers=headers)
            assert response.status == 401, (method, path, headers)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            if method != "HEAD":
                assert (await response.json())["error"]
    # Nothing was changed by any of them.
    assert (await client.get(f"/v1/packages/{package_id}", headers=bearer("reader"))).status == 200


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("reader", {"list", "show", "download", "log"}),
        ("builder", {"list", "show", "download", "log", "upload", "rebuild"}),
        ("ops", {"delete"}),
    ],
)
async def test_each_scope_allows_its_routes_and_names_the_one_missing(client, hello, name, allowed):
    package_id = await stored(client, hello[0])
    calls = {
        "list": ("GET", "/v1/packages/", None, "read"),
        "show": ("GET", f"/v1/packages/{package_id[:9]}", None, "read"),
        "download": ("GET", f"/v1/packages/{package_id}.zip", None, "read"),
        "log": ("GET", f"/v1/packages/{package_id}/log", None, "read"),
        "upload": ("POST", "/v1/packages/upload", form(hello[0]), "write"),
        "rebuild": ("POST", f"/v1/packages/{package_id}/build", None, "write"),
        "delete": ("DELETE", f"/v1/packages/{package_id}", None, "admin"),
    }
    for what, (method, path, data, scope) in calls.items():
        response = await client.request(method, path, data=data, headers=bearer(name))
        if what in allowed:
            # Through to the handler: a store-only server has no log (404) and no builder
            # (409) to rebuild with; everything else succeeds.
            assert response.status in (200, 404, 409), (what, await response.text())
            assert response.status != 409 or what == "rebuild"
            assert response.status != 404 or what == "log"
        else:
            assert response.status == 403, what
            body = await response.json()
            assert body["scope"] == scope
            assert f"needs the '{scope}' scope" in body["error"]
            assert repr(name) in body["error"]


async def test_public_read_lets_anonymous_callers_read_only(
    aiohttp_client, tmp_path, tokens, hello
):
    settings = settings_for(tmp_path, tokens_file=tokens, public_read=True)
    client = await aiohttp_client(make_app(settings))
    package_id = await stored(client, hello[0])
    assert (await client.get("/v1/packages/")).status == 200
    assert await (await client.get(f"/v1/packages/{package_id}.zip")).read() == hello[0]
    response = await client.post("/v1/packages/upload", data=form(hello[0]))
    assert response.status == 401
    assert "'write' scope" in (await response.json())["error"]
    # A wrong token is refused even where no token is needed: the caller meant one.
    response = await client.get("/v1/packages/", headers={"Authorization": "Bearer nope"})
    assert response.status == 401


async def test_the_record_and_the_log_name_the_token_never_the_secret(client, hello):
    with capture_logs() as logs:
        package_id = await stored(client, hello[0])
        response = await client.delete(f"/v1/packages/{package_id}", headers=bearer("ops"))
        assert response.status == 200
    requests = [entry for entry in logs if entry["event"] == "request"]
    assert [(r["method"], r["who"]) for r in requests] == [("POST", "builder"), ("DELETE", "ops")]
    deleted = [entry for entry in logs if entry["event"] == "package deleted"]
    assert deleted == [
        {
            "event": "package deleted",
            "log_level": "info",
            "package_id": package_id,
            "name": "test/hello",
            "by": "ops",
        }
    ]
    secrets = [token for _, token in TOKENS.values()]
    assert not any(secret in repr(logs) for secret in secrets)


async def test_uploaded_by_is_kept_in_the_record(client, hello):
    package_id = await stored(client, hello[0])
    document = await (
        await client.get(f"/v1/packages/{package_id}", headers=bearer("reader"))
    ).json()
    assert document["UploadedBy"] == "builder"
    listing = await (await client.get("/v1/packages/", headers=bearer("reader"))).json()
    assert listing[0]["UploadedBy"] == "builder"


async def test_whoami_says_who_and_what(client):
    response = await client.get("/v1/whoami", headers=bearer("builder"))
    assert await response.json() == {
        "Name": "builder",
        "Scopes": ["read", "write"],
        "Anonymous": False,
    }
    response = await client.get("/v1/whoami")
    assert await response.json() == {"Name": "anonymous", "Scopes": [], "Anonymous": True}
    assert (await client.get("/v1/whoami", headers={"Authorization": "Bearer x"})).status == 401


async def test_an_open_server_lets_everyone_do_everything(aiohttp_client, tmp_path, hello):
    client = await aiohttp_client(make_app(settings_for(tmp_path)))
    response = await client.post("/v1/packages/upload", data=form(hello[0]))
    assert response.status == 200
    assert (await response.json())["UploadedBy"] == "anonymous"
    assert (await client.delete(f"/v1/packages/{hello[1]}")).status == 200


async def test_tokens_are_added_and_revoked_without_a_restart(aiohttp_client, tmp_path, tokens):
    app = make_app(settings_for(tmp_path, tokens_file=tokens))
    client = await aiohttp_client(app)
    authenticator = app[AUTHENTICATOR]
    authenticator.recheck = 0
    newcomer = new_token()
    headers = {"Authorization": f"Bearer {newcomer}"}
    assert (await client.get("/v1/packages/", headers=headers)).status == 401
    tokens_file(tokens, {**TOKENS, "newcomer": ("read", newcomer)})
    assert (await client.get("/v1/packages/", headers=headers)).status == 200
    # A broken edit keeps the tokens in force, and says why in the log.
    with capture_logs() as logs:
        tokens.write_text(tokens.read_text() + "broken line\n")
        assert (await client.get("/v1/packages/", headers=headers)).status == 200
    assert logs[0]["event"] == "tokens file not reloaded; the previous tokens stay"
    tokens_file(tokens)  # the newcomer's line removed: revoked
    assert (await client.get("/v1/packages/", headers=headers)).status == 401


def test_a_bad_tokens_file_names_every_bad_line(tmp_path):
    path = tmp_path / "tokens"
    digest = token_digest("x").hex()
    path.write_text(
        f"ok read {digest}\n"
        "two fields\n"
        f"bad/name read {'1' * 64}\n"
        f"scopes read,fly {'2' * 64}\n"
        f"short read {'ab' * 8}\n"
        f"ok write {'3' * 64}\n"
        f"again read {digest}\n"
    )
    with pytest.raises(TokensFileError) as caught:
        TokensFile(path)
    message = str(caught.value)
    for words in (
        "line 2: expected NAME SCOPES SHA256, got 2 fields",
        "line 3: 'bad/name' is not a usable token name",
        "line 4: unknown scope 'fly' (use read, write, admin, run)",
        "line 5: the third field must be the token's SHA-256",
        "line 6: the name 'ok' is given twice",
        "line 7: the same token is given twice",
    ):
        assert words in message
    with pytest.raises(TokensFileError, match="cannot read the tokens file"):
        TokensFile(tmp_path / "missing")
    assert parse_tokens("# nothing\n\n", "t") == ()


def test_every_route_declares_what_it_needs(tmp_path):
    app = make_app(settings_for(tmp_path))
    access = app[ROUTE_ACCESS]
    undeclared = [
        f"{route.method} {route.resource.canonical}"
        for route in app.router.routes()
        if route not in access
    ]
    assert undeclared == []


async def test_an_undeclared_route_needs_admin(aiohttp_client, tmp_path, tokens):
    app = make_app(settings_for(tmp_path, tokens_file=tokens))

    async def added_elsewhere(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app.router.add_get("/v1/elsewhere", added_elsewhere)
    Routes(app).get("/v1/declared", added_elsewhere, Scope.READ)
    client = await aiohttp_client(app)
    response = await client.get("/v1/elsewhere", headers=bearer("builder"))
    assert response.status == 403 and (await response.json())["scope"] == "admin"
    assert (await client.get("/v1/elsewhere", headers=bearer("ops"))).status == 200
    assert (await client.get("/v1/declared", headers=bearer("reader"))).status == 200
    # A route that does not exist is a 404, token or not: nothing there to protect.
    assert (await client.get("/v1/nowhere")).status == 404


class HeaderAuthenticator(Authenticator):
    """An embedder's own: trusts a header its proxy sets, as services behind SSO do."""

    async def authenticate(self, request: web.Request) -> Identity:
        user = request.headers.get("X-Forwarded-User")
        if user is None:
            raise Unauthenticated("sign in through the portal")
        scopes = {Scope.READ, Scope.WRITE} | ({Scope.ADMIN} if user == "root" else set())
        return Identity(user, frozenset(scopes))


async def test_an_embedder_passes_its_own_authenticator(aiohttp_client, tmp_path, hello):
    app = make_app(settings_for(tmp_path), authenticator=HeaderAuthenticator())
    client = await aiohttp_client(app)
    refused = await client.get("/v1/packages/")
    assert refused.status == 401 and (await refused.json()) == {
        "error": "sign in through the portal"
    }
    as_ann = {"X-Forwarded-User": "ann"}
    response = await client.post("/v1/packages/upload", data=form(hello[0]), headers=as_ann)
    assert (await response.json())["UploadedBy"] == "ann"
    assert (await client.delete(f"/v1/packages/{hello[1]}", headers=as_ann)).status == 403
    as_root = {"X-Forwarded-User": "root"}
    assert (await client.delete(f"/v1/packages/{hello[1]}", headers=as_root)).status == 200


# -- the CLI, as users run it ---------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("COG_REMOTE", "COG_TOKEN")}
    return {**environment, "XDG_CONFIG_HOME": str(tmp_path / "config"), "NO_COLOR": "1"}


def test_tokens_login_and_logout_as_a_user(tmp_path, env):
    made = cog("token", "new", "ci", "--scopes", "read,write", env=env).stdout.splitlines()
    token, line = made[1], made[3]
    assert token.startswith("cog_") and line.split()[:2] == ["ci", "read,write"]
    assert line.split()[2] == token_digest(token).hex()
    bad = cog("token", "new", "ci", "--scopes", "read,fly", env=env, check=False)
    assert (
        bad.returncode == 1
        and bad.stderr == "cog: error: unknown scope 'fly' (use read, write, admin, run)\n"
    )

    tokens = tmp_path / "tokens"
    tokens.write_text(line + "\n")
    with cog_server(tmp_path, env, "--builder", "none", "--tokens", str(tokens)) as url:
        cog("remote", "set", url, env=env)
        refused = cog("list", env=env, check=False)
        assert refused.returncode == 1
        assert refused.stderr.startswith("cog: error: this server needs a token")
        assert "log in with `cog login` or set COG_TOKEN" in refused.stderr
        assert cog("list", env={**env, "COG_TOKEN": token}).returncode == 0

        wrong = subprocess.run(
            [COG, "login", "--token-stdin"],
            input="cog_wrong\n",
            capture_output=True,
            text=True,
            env=env,
        )
        assert wrong.returncode == 1 and "not known to the server" in wrong.stderr
        config = Path(env["XDG_CONFIG_HOME"]) / "cog" / "config.json"
        assert "tokens" not in json.loads(config.read_text())

        logged_in = subprocess.run(
            [COG, "login"], input=token + "\n", capture_output=True, text=True, env=env
        )
        assert logged_in.stdout == f"Logged in to {url} as ci (read, write)\n", logged_in.stderr
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert json.loads(config.read_text())["tokens"] == {url: token}
        assert cog("whoami", env=env).stdout == f"ci at {url} (scopes: read, write)\n"
        model = make_model_dir(tmp_path / "hello")
        assert (
            cog("build", env=env, cwd=model)
            .stdout.strip()
            .splitlines()[-1]
            .startswith("--> Built ")
        )
        package_id = json.loads(cog("list", "--json", env=env).stdout)[0]["ID"]
        denied = cog("delete", package_id, env=env, check=False)
        assert denied.returncode == 1
        assert denied.stderr.startswith(
            "cog: error: 'ci' may not do this: it needs the 'admin' scope"
        )

        assert cog("logout", env=env).stdout == f"Logged out of {url}\n"
        assert cog("list", env=env, check=False).returncode == 1
        assert cog("logout", env=env).stdout == f"No token was saved for {url}\n"
    log = (tmp_path / "server.log").read_text()
    assert token not in log and '"who": "ci"' in log


def other_address() -> str:
    """An address of this machine that is not loopback."""
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    found = [line.split()[3].split("/")[0] for line in out.splitlines()]
    found = [address for address in found if not address.startswith("127.")]
    assert found, out  # docker0 at least, on a machine with a running dockerd
    return found[0]


def test_the_server_binds_loopback_and_says_so_without_tokens(tmp_path, env):
    port = free_port()
    args = [COG, "server", "--port", str(port), "--builder", "none"]
    with open(tmp_path / "server.log", "w") as log:
        process = subprocess.Popen(
            [*args, "--storage", f"file://{tmp_path / 'store'}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            wait_for(f"http://127.0.0.1:{port}/ping")
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((other_address(), port), timeout=5).close()
        finally:
            process.terminate()
            process.wait(timeout=30)
    lines = (tmp_path / "server.log").read_text().splitlines()
    assert lines[0] == (
        f"cog server: no --tokens: anyone who can reach 127.0.0.1:{port} may upload, rebuild "
        "and delete packages"
    )
    result = cog("server", "--public-read", env=env, check=False)
    assert result.returncode == 1 and "--public-read needs --tokens" in result.stderr
