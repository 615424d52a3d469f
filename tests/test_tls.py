"""TLS: the backend serves HTTPS from a certificate and key, the client verifies it (system CAs or --tls-ca), and
anything wrong gets a clear error naming the file or the server. Serving a non-loopback address in the clear is
loud. Certificates are made here, self-signed, for 127.0.0.1."""

import datetime
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hediff.backend.app import create_app
from hediff.backend.auth import TokenStore
from hediff.backend.serve import check_tls_files, start_in_thread, warn_if_exposed
from hediff.desktop.core.backend_client import BackendClient, BackendTLSError
from hediff.desktop.core.engine import GenerationParams, Generator

REPO = Path(__file__).resolve().parents[1]


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    return {"server": self_signed(d, "server"), "stranger": self_signed(d, "stranger"), "dir": d}


@pytest.fixture(scope="module")
def tls_backend(server_model, certs):
    tokens, token = TokenStore.ephemeral()
    running = start_in_thread(create_app(server_model, tokens), tls=check_tls_files(*certs["server"]))
    yield running.url, token
    running.stop()


def test_https_generation_with_the_servers_certificate_as_ca(tls_backend, certs, client_model):
    url, token = tls_backend
    assert url.startswith("https://127.0.0.1:")
    with BackendClient(url, token, tls_ca=certs["server"][0]) as client:
        assert client.health()["status"] == "ok"
        result = Generator(client_model, client).generate(
            GenerationParams(prompt="a red circle", steps=2, width=32, height=32, scheduler="ddim")
        )
    f = client_model.vae_scale_factor
    assert result.latent.shape == (client_model.latent_channels, 32 // f, 32 // f)
    assert len(result.step_timings) == 2


@pytest.mark.parametrize("ca", [None, "stranger"], ids=["system-cas", "another-ca"])
def test_a_certificate_that_does_not_verify_is_a_clear_error(tls_backend, certs, ca):
    url, token = tls_backend
    tls_ca = certs[ca][0] if ca else None
    with BackendClient(url, token, tls_ca=tls_ca) as client, pytest.raises(BackendTLSError) as err:
        client.health()
    message = str(err.value)
    assert url in message and "does not verify" in message and "--tls-ca" in message


def test_client_tls_options_are_checked(certs, tmp_path):
    with pytest.raises(ValueError, match="not an https:// URL"):
        BackendClient("http://127.0.0.1:1", "t", tls_ca=certs["server"][0])
    missing = tmp_path / "nope.pem"
    with pytest.raises(ValueError, match=f"{missing}.*does not exist"):
        BackendClient("https://127.0.0.1:1", "t", tls_ca=missing)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ValueError, match=f"{junk}.*cannot be used"):
        BackendClient("https://127.0.0.1:1", "t", tls_ca=junk)


def test_server_tls_files_are_checked(certs, tmp_path):
    cert, key = certs["server"]
    _, other_key = certs["stranger"]
    assert check_tls_files(None, None) is None
    with pytest.raises(ValueError, match="--tls-cert was given without --tls-key"):
        check_tls_files(cert, None)
    with pytest.raises(ValueError, match="--tls-key was given without --tls-cert"):
        check_tls_files(None, key)
    with pytest.raises(ValueError, match=f"--tls-key {tmp_path / 'missing.pem'} cannot be read"):
        check_tls_files(cert, tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="do not form a usable certificate and key"):
        check_tls_files(cert, other_key)
    assert check_tls_files(cert, key).cert == cert


def test_cli_serve_refuses_half_a_tls_setup_before_loading_anything(certs, capsys):
    from hediff.desktop.cli import main

    rc = main(["serve", "--model", "/nonexistent-model", "--tls-cert", str(certs["server"][0])])
    err = capsys.readouterr().err
    assert rc == 2 and "--tls-cert was given without --tls-key" in err and "Traceback" not in err


def test_serving_a_public_address_without_tls_is_loud(certs, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="hediff.backend"):
        assert warn_if_exposed("0.0.0.0", None)
        assert not warn_if_exposed("127.0.0.1", None) and not warn_if_exposed("::1", None)
        assert not warn_if_exposed("0.0.0.0", check_tls_files(*certs["server"]))
    err = capsys.readouterr().err
    assert err.count("WITHOUT TLS") == 1 and err.count("\n") >= 5 and "--tls-cert" in err
    assert "0.0.0.0" in caplog.text and "WITHOUT TLS" in caplog.text


def _served(args: list[str], env: dict, until: str, timeout: float = 120.0) -> str:
    proc = subprocess.Popen(
        [sys.executable, "-m", "hediff.desktop.cli", "serve", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        text=True,
    )
    seen = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if until in line:
                break
    finally:
        proc.terminate()
        proc.wait(30)
    return "".join(seen)


@pytest.mark.slow
def test_hediff_serve_over_tls_and_in_the_clear(tiny_model_dir, certs, tmp_path):
    from bench.served import free_port

    env = dict(os.environ, HEDIFF_CONFIG_DIR=str(tmp_path))
    token = subprocess.run(
        [sys.executable, "-m", "hediff.desktop.cli", "token", "create"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    cert, key = certs["server"]
    port = free_port()
    base = ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32", "--port", str(port)]
    out = _served([*base, "--tls-cert", str(cert), "--tls-key", str(key)], env, until="Uvicorn running")
    assert f"https://127.0.0.1:{port}" in out and "WITHOUT TLS" not in out and token not in out
    out = _served([*base, "--host", "0.0.0.0"], env, until="Uvicorn running")
    assert "!! WARNING: serving on 0.0.0.0" in out and "WITHOUT TLS" in out
