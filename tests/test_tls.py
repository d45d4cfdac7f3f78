"""cog.tls: aiohttp imported with its certificate loads put off, and loaded before TLS.

Each case runs in a Python of its own (this one imported aiohttp long ago), against a real
TLS listener whose certificate a test CA signed; SSL_CERT_FILE makes that CA the system's,
so "loaded" and "not loaded" differ by whether a connection verifies.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest

from tests.tls_helpers import make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"))


PROBE = textwrap.dedent(
    """
    import asyncio, json, ssl, sys
    from cog.tls import certificates_put_off, import_aiohttp, load_certificates

    import_aiohttp()
    import aiohttp
    from aiohttp import web
    from cog.cli.client import RegistryClient

    async def main(cert, key):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        app = web.Application()
        app.router.add_get("/ping", lambda request: web.json_response({"status": "ok"}))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        url = "https://127.0.0.1:%d" % runner.addresses[0][1]
        seen = {"put_off": certificates_put_off()}
        # A context made after the import is whole: only aiohttp's own were put off.
        seen["new_context_cas"] = ssl.create_default_context().cert_store_stats()["x509_ca"]
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(url + "/ping") as response:
                    seen["before"] = response.status
        except aiohttp.ClientConnectorCertificateError:
            seen["before"] = "certificate refused"
        async with RegistryClient(url) as client:  # an https:// server: it loads them
            seen["client"] = await client.ping()
        seen["put_off_after"] = certificates_put_off()
        await runner.cleanup()
        print(json.dumps(seen))

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


def test_aiohttp_verifies_nothing_until_the_certificates_are_loaded_then_everything(certs):
    env = {**os.environ, "SSL_CERT_FILE": str(certs / "ca.pem")}
    env.pop("SSL_CERT_DIR", None)
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(certs / "server.pem"), str(certs / "server.key")],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["put_off"] >= 1
    assert seen["new_context_cas"] == 1  # the test CA, from SSL_CERT_FILE
    # Before the loads, aiohttp's default context trusts nothing: it fails closed.
    assert seen["before"] == "certificate refused"
    assert seen["client"] == {"status": "ok"}
    assert seen["put_off_after"] == 0


def test_the_clis_verbs_put_the_loads_off_and_the_server_does_not(tmp_path):
    """`cog list` against a plain-HTTP server that is not there: aiohttp was imported with
    its loads put off. `cog server` (here refusing its storage) leaves them alone: the
    server may reach S3 over TLS through aiohttp's defaults."""
    probe = textwrap.dedent(
        """
        import sys
        from cog.cli.main import main
        from cog.tls import certificates_put_off
        try:
            main(sys.argv[1:])
        except SystemExit:
            pass
        print("put off:", certificates_put_off(), "aiohttp:", "aiohttp" in sys.modules)
        """
    )
    env = {**os.environ, "HOME": str(tmp_path)}
    listed = subprocess.run(
        [sys.executable, "-c", probe, "--remote", "http://127.0.0.1:1", "list"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert "cannot reach the cog server" in listed.stderr
    assert listed.stdout.split()[2] != "0" and listed.stdout.split()[-1] == "True"
    served = subprocess.run(
        [sys.executable, "-c", probe, "server", "--storage", "nosuch://x", "--port", "1"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert "no storage backend for scheme 'nosuch'" in served.stderr
    assert served.stdout.splitlines()[-1].split() == ["put", "off:", "0", "aiohttp:", "True"]


SIZE_OF_FILE = """
from cog import BasePredictor, Path

class Predictor(BasePredictor):
    def predict(self, data: Path) -> int:
        return len(data.read_bytes())
"""


async def test_the_inference_server_fetches_https_inputs_with_the_certificates_it_put_off(
    certs, tmp_path
):
    """`python -m cog.runtime` imports aiohttp with its certificate loads put off and
    makes them once it listens: an https:// input from a server the (test) system CA
    signed is fetched; one from a self-signed server is refused (verification stays on)."""
    from aiohttp import web

    from tests.test_cli import free_port, wait_for
    from tests.test_runtime_predictions import model_dir

    body = b"x" * 1234

    async def data(request: web.Request) -> web.Response:
        return web.Response(body=body)

    app = web.Application()
    app.router.add_get("/data.bin", data)
    runner = web.AppRunner(app)
    await runner.setup()
    sites = {}
    for name in ("server", "self"):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certs / f"{name}.pem", certs / f"{name}.key")
        sites[name] = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await sites[name].start()
    port = free_port()
    env = {**os.environ, "SSL_CERT_FILE": str(certs / "ca.pem")}
    env.pop("SSL_CERT_DIR", None)
    model = subprocess.Popen(
        [sys.executable, "-m", "cog.runtime", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "debug"],
        cwd=model_dir(tmp_path, SIZE_OF_FILE), env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        await asyncio.to_thread(wait_for, f"http://127.0.0.1:{port}/health-check")
        async with aiohttp.ClientSession() as session:
            answers = {}
            for name, site in sites.items():
                url = f"https://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/data.bin"
                async with session.post(
                    f"http://127.0.0.1:{port}/predictions", json={"input": {"data": url}}
                ) as response:
                    answers[name] = (response.status, await response.json())
    finally:
        model.terminate()
        _, log = model.communicate(timeout=30)
        await runner.cleanup()
    put_off = re.search(rb"\((\d+) certificate loads of aiohttp's put off\)", log)
    assert put_off and int(put_off[1]) >= 1, log.decode()[-2000:]
    status, trusted = answers["server"]
    assert (status, trusted["status"], trusted["output"]) == (200, "succeeded", len(body)), trusted
    status, impostor = answers["self"]
    assert impostor["status"] == "failed" or status == 422, impostor
    assert "certificate" in json.dumps(impostor).lower(), impostor


def test_the_inference_server_ends_cleanly_while_it_loads_the_certificates(certs, tmp_path):
    """SIGTERM while the certificates load (a bundle large enough to take a while): the
    server waits for the load and exits 0. Loaded by a daemon thread, the interpreter tore
    OpenSSL down under it, and the process died of SIGSEGV (6 times in 10)."""
    from tests.test_runtime_predictions import model_dir

    bundle = tmp_path / "bundle.pem"
    bundle.write_text((certs / "ca.pem").read_text() * 3000)
    env = {**os.environ, "SSL_CERT_FILE": str(bundle)}
    env.pop("SSL_CERT_DIR", None)
    directory = model_dir(tmp_path, SIZE_OF_FILE)
    for _ in range(2):
        server = subprocess.Popen(
            [sys.executable, "-m", "cog.runtime", "--host", "127.0.0.1", "--port", "0",
             "--log-level", "debug"],
            cwd=directory, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert server.stderr is not None
        for line in server.stderr:
            if "listening on" in line:
                break
        server.send_signal(signal.SIGTERM)
        with server.stderr:
            log = server.stderr.read()
        assert server.wait(timeout=120) == 0, log[-2000:]
        # The signal came while the certificates loaded: the server stopped after them.
        assert log.index("shutting down") < log.index("aiohttp's certificates loaded"), log
