"""Pushing to a registry that wants a login: credentials from Docker's config or
--registry-auth, against a real docker-registry with htpasswd auth on the real engine."""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import uuid
from pathlib import Path

import pytest

from cog.builders import BuilderSettings
from cog.engine import Engine, Pushed, RegistryAuth, RegistryAuthError, RegistryLoginRefused
from cog.engine.auth import ANONYMOUS, DOCKER_HUB, registry_of
from cog.events import NDJSON
from cog.server.app import ServerSettings, make_app
from cog.server.settings import IngestOptions
from tests.registry_helpers import form, make_model_dir, package_bytes
from tests.services.docker import CPU_BASE


def decoded(header: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(header))


# -- reading credentials --------------------------------------------------------------


def test_credentials_are_read_as_docker_writes_them(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "auths": {
                    "https://registry.example.com/v1/": {
                        "auth": base64.b64encode(b"ann:pw:with:colons").decode()
                    },
                    "127.0.0.1:5001": {"username": "bob", "password": "hunter2"},
                    "ghcr.io": {"identitytoken": "tok"},
                    DOCKER_HUB: {"auth": base64.b64encode(b"hub:pw").decode()},
                },
                "credsStore": "desktop",
            }
        )
    )
    auth = RegistryAuth(path)
    assert decoded(auth.header("registry.example.com/a/b:1")) == {
        "username": "ann",
        "password": "pw:with:colons",
        "serveraddress": "registry.example.com",
    }
    assert decoded(auth.header("127.0.0.1:5001/m:tag"))["username"] == "bob"
    assert decoded(auth.header("ghcr.io/o/m:1")) == {
        "identitytoken": "tok",
        "serveraddress": "ghcr.io",
    }
    assert decoded(auth.header("python:3.11-slim"))["username"] == "hub"
    assert auth.header("other.example.org/m:1") == ANONYMOUS
    assert registry_of("localhost/m") == "localhost" and registry_of("a/b") == DOCKER_HUB


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{", "is not JSON"),
        ('{"auths": []}', "auths is not an object"),
        ('{"auths": {"r": {"auth": "%%%"}}}', "auths['r'].auth is not base64 of user:password"),
        ('{"auths": {"r": {}}}', "auths['r'] has no auth, username/password or identitytoken"),
    ],
)
def test_a_credentials_file_that_cannot_be_used_says_why(tmp_path, content, words):
    path = tmp_path / "auth.json"
    path.write_text(content)
    with pytest.raises(RegistryAuthError, match=words.replace("[", r"\[").replace("]", r"\]")):
        RegistryAuth(path).check()
    with pytest.raises(RegistryAuthError, match="does not exist"):
        RegistryAuth(tmp_path / "missing.json").check()


def test_without_a_docker_config_pushes_are_anonymous(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "nothing-here"))
    assert RegistryAuth().header("127.0.0.1:5000/m:1") == ANONYMOUS


def test_cog_server_refuses_a_missing_registry_auth_file(tmp_path):
    from tests.test_cli import COG

    result = subprocess.run(
        [COG, "server", "--registry-auth", str(tmp_path / "none.json"), "--storage",
         f"file://{tmp_path / 'store'}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert (
        result.stderr
        == f"cog: error: registry credentials file {tmp_path / 'none.json'} does not exist\n"
    )


# -- against the real registry --------------------------------------------------------

integration = pytest.mark.integration


@contextlib.contextmanager
def tagged(auth_registry) -> str:
    """The base image tagged for the login registry (removed from the engine after)."""
    image = f"{auth_registry.address}/cog-test/base:{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "tag", CPU_BASE, image], check=True)
    try:
        yield image
    finally:
        subprocess.run(["docker", "rmi", image], capture_output=True)


async def push(engine: Engine, image: str) -> list:
    return [item async for item in engine.push(image)]


@integration
async def test_pushes_carry_the_login_from_docker_config(
    auth_registry, base_images, tmp_path, monkeypatch
):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    with tagged(auth_registry) as image:
        async with Engine() as engine:
            with pytest.raises(RegistryLoginRefused) as refused:
                await push(engine, image)
            assert str(refused.value) == (
                f"the registry {auth_registry.address} refused the login (no basic auth "
                f"credentials) pushing {image}: cog sent no credentials for it from "
                f"{tmp_path / 'docker' / 'config.json'}"
            )

            auth_registry.write_config(tmp_path / "docker" / "config.json", password="wrong")
            with pytest.raises(
                RegistryLoginRefused, match=r"refused the login.*cog sent the credentials"
            ):
                await push(engine, image)

            # A `docker login` done meanwhile counts at once: the file is read at each push.
            auth_registry.write_config(tmp_path / "docker" / "config.json")
            items = await push(engine, image)
            assert isinstance(items[-1], Pushed) and items[-1].digest.startswith("sha256:")


def server_settings(tmp_path: Path, registry: str, auth: Path) -> ServerSettings:
    return ServerSettings(
        storage_url=f"file://{tmp_path / 'store'}",
        builder="docker",
        builder_settings=BuilderSettings(registry=registry, registry_auth=auth),
        ingest=IngestOptions(check_images=False),
        tmp_dir=tmp_path / "spool",
    )


@integration
@pytest.mark.slow
async def test_a_build_pushes_with_registry_auth_and_fails_as_the_servers_without(
    aiohttp_client, auth_registry, base_images, tmp_path, no_leaked_containers
):
    auth = auth_registry.write_config(tmp_path / "auth.json", password="wrong")
    client = await aiohttp_client(make_app(server_settings(tmp_path, auth_registry.address, auth)))
    data, package_id = package_bytes(make_model_dir(tmp_path / "model", name="cog-test/login"))

    response = await client.post("/v1/packages/upload", data=form(data), headers={"Accept": NDJSON})
    events = [json.loads(line) async for line in response.content if line.strip()]
    final = events[-1]
    image = f"{auth_registry.address}/cog-test/login:{package_id[:12]}"
    assert final["type"] == "error" and final["status"] == 503, final
    assert final["message"] == (
        f"the registry {auth_registry.address} refused the login (unauthorized: authentication "
        f"required) pushing {image}: cog sent the credentials for it from {auth} (step: push)"
    )
    assert "\n" not in final["message"]
    assert final["package"]["Status"] == "failed"

    auth_registry.write_config(auth)  # the right password now: a rebuild pushes
    response = await client.post(f"/v1/packages/{package_id}/build", headers={"Accept": NDJSON})
    events = [json.loads(line) async for line in response.content if line.strip()]
    assert events[-1]["type"] == "package", events[-1]
    artifact = events[-1]["package"]["Artifacts"][0]
    assert artifact["URI"] == image and artifact["Digest"].startswith("sha256:")
    subprocess.run(["docker", "rmi", image], capture_output=True)
