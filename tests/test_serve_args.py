"""`hediff serve` refuses bad arguments with exit status 2 and one line, before it loads any model.

The model given is a folder that does not exist: had serve resolved it first, the error would name the model.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hediff.backend.auth import TokenStore
from hediff.desktop.cli import main


@pytest.fixture
def config_dir(tmp_path, monkeypatch) -> Path:
    """A config folder with one valid token, so that only the argument under test is wrong."""
    monkeypatch.setenv("HEDIFF_CONFIG_DIR", str(tmp_path / "config"))
    TokenStore.load(tmp_path / "config" / "tokens.json").create("test")
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    return tmp_path / "config"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--port", "0"], "--port must be an integer in [1, 65535], got 0"),
        (["--port", "70000"], "--port must be an integer in [1, 65535], got 70000"),
        (["--tls-cert", "cert.pem"], "--tls-cert was given without --tls-key"),
        (["--tls-key", "key.pem"], "--tls-key was given without --tls-cert"),
        (
            ["--tls-cert", "{tmp}/cert.pem", "--tls-key", "{tmp}/missing.pem"],
            "--tls-key {tmp}/missing.pem cannot be read",
        ),
        (
            ["--tls-cert", "{tmp}/cert.pem", "--tls-key", "{tmp}/cert.pem"],
            "--tls-cert {tmp}/cert.pem and --tls-key {tmp}/cert.pem do not form a usable certificate and key",
        ),
        (["--max-sessions", "0"], "--max-sessions must be positive, got 0"),
        (["--max-sessions-per-token", "-1"], "--max-sessions-per-token must be positive, got -1"),
        (["--session-ttl", "0"], "--session-ttl must be positive, got 0.0"),
        (["--max-request-mb", "-2"], "--max-request-mb must be positive, got -2.0"),
        (["--tokens-file", "{tmp}"], "token file {tmp} is unreadable"),
        (["--tokens-file", "{tmp}/none.json"], "no API tokens in {tmp}/none.json"),
    ],
)
def test_serve_refuses_bad_arguments_before_loading_the_model(config_dir, tmp_path, capsys, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    rc = main(["serve", "--model", str(tmp_path / "no-model-here"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("hediff: error: " + message.replace("{tmp}", str(tmp_path))), err
    assert "no-model-here" not in err[0]


def test_serve_process_exits_2_with_one_line(config_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "hediff", "serve", "--model", str(tmp_path / "no-model-here"), "--port", "99999"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["hediff: error: --port must be an integer in [1, 65535], got 99999"]
