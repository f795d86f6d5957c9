"""TLS on the edge: served with a certificate, TLS 1.2+ only; production refuses plaintext."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.live import serve


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_tls_edge(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    with serve(
        tmp_path,
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
        env={"UNIHEALTH_DATABASE_URL": ""},
        scheme="https",
        verify=str(cert),
    ) as base:
        assert base.startswith("https://")
        r = httpx.get(f"{base}/fhir/r5/metadata", verify=str(cert))
        assert r.status_code == 200 and r.json()["resourceType"] == "CapabilityStatement"
        host, port = base.removeprefix("https://").split(":")
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            try:
                with old.wrap_socket(sock):
                    raise AssertionError("a TLS 1.1 handshake must fail")
            except ssl.SSLError:
                pass


def test_production_refuses_plaintext(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "UNIHEALTH_PROFILE": "production",
        "UNIHEALTH_DATABASE_URL": "postgresql+asyncpg://x@127.0.0.1:1/x",
        "UNIHEALTH_SECRET_KEY": "s" * 40,
        "UNIHEALTH_JWKS": str(tmp_path / "jwks.json"),
    }
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "TLS only" in out.stderr
