"""Certificates for tests of TLS: a CA and what it signed, made by openssl."""

from __future__ import annotations

import subprocess
from pathlib import Path


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _key_and_csr(cwd: Path, name: str, subject: str) -> None:
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=cwd)
    openssl("req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr", cwd=cwd)


def _sign(cwd: Path, name: str, ext: str) -> None:
    (cwd / f"{name}.ext").write_text(ext)
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
        cwd=cwd,
    )  # fmt: skip


def make_certs(cwd: Path) -> Path:
    """In cwd: a CA (ca.pem), a server cert for 127.0.0.1 (server.pem/key) and a client
    cert (client.pem/key) it signed; a self-signed one (self.pem/key)."""
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=cwd)
    openssl(
        "req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=cog test CA", "-days", "2",
        "-out", "ca.pem", cwd=cwd,
    )  # fmt: skip
    _key_and_csr(cwd, "server", "/CN=buildkitd")
    _sign(cwd, "server", "subjectAltName=IP:127.0.0.1,DNS:buildkitd\nextendedKeyUsage=serverAuth")
    _key_and_csr(cwd, "client", "/CN=cog server")
    _sign(cwd, "client", "extendedKeyUsage=clientAuth")
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "self.key", "-out", "self.pem", "-subj", "/CN=impostor", "-days", "2",
        "-addext", "subjectAltName=IP:127.0.0.1", cwd=cwd,
    )  # fmt: skip
    return cwd
