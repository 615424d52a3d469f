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
        (["--torch-threads", "0"], "--torch-threads must be positive, got 0"),
        (["--ray", "--session-replicas", "0"], "--session-replicas must be at least 1, got 0"),
        (["--ray", "--max-batch-size", "0"], "--max-batch-size must be at least 1, got 0"),
        (["--ray", "--batch-wait-ms", "-1"], "--batch-wait-ms and --unet-gpus cannot be negative"),
        (["--ray", "--confidential"], "--confidential runs one attested process; it cannot be combined with --ray"),
        (["--ray", "--redis", "redis://127.0.0.1:1/0"], "--redis redis://127.0.0.1:1/0 does not answer"),
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


def test_ray_config_file_is_a_valid_serve_deploy_config(config_dir, tmp_path, tiny_model_dir, capsys):
    import json

    from ray.serve.schema import ServeDeploySchema

    from hediff.backend.ray_serve import app_builder

    out = tmp_path / "hediff-serve.yaml"
    rc = main(
        [
            "serve",
            "--model",
            str(tiny_model_dir),
            "--ray-config",
            str(out),
            "--session-replicas",
            "3",
            "--max-batch-size",
            "16",
            "--device",
            "cuda",
            "--max-sessions",
            "40",
        ]
    )
    assert rc == 0 and f"serve deploy {out}" in capsys.readouterr().err
    data = json.loads(out.read_text())
    schema = ServeDeploySchema(**data)  # Serve's own validation of what `serve deploy` reads
    (app,) = schema.applications
    assert app.import_path == "hediff.backend.ray_serve:app_builder" and app.route_prefix == "/"
    args = app.args
    assert args["model_path"] == str(tiny_model_dir) and args["session_replicas"] == 3
    assert args["max_batch_size"] == 16 and args["unet_gpus"] == 1.0 and args["limits"]["max_sessions"] == 40
    assert args["tokens_path"] == str((config_dir / "tokens.json").resolve())
    graph = app_builder(args)  # what Serve calls: builds the three deployments without a cluster
    assert type(graph).__name__ == "Application"
