"""Nothing secret reaches a log: a real generation with a known prompt, token and secret key, plus requests that
fail (wrong token, garbage, unknown session), with every logger at DEBUG and uvicorn's access log on; then the
token, the prompts, their words and the key bytes (raw, hex, base64) must appear nowhere in what was captured."""

import base64
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from hediff.backend.app import create_app
from hediff.backend.auth import TokenStore
from hediff.backend.serve import start_in_thread
from hediff.common import he, protocol
from hediff.desktop.core.backend_client import BackendClient, BackendRejected
from hediff.desktop.core.engine import GenerationParams, Generator

REPO = Path(__file__).resolve().parents[1]
PROMPT = "quokka marzipan lighthouse beneath violet aurora"
NEGATIVE = "smudged gargoyle"


def secret_forms(token: str, key_blob: bytes | None) -> dict[str, str]:
    """Every string that must not be logged, by what it is."""
    forms = {"token": token, "token body": token.removeprefix("hdt_"), "prompt": PROMPT, "negative": NEGATIVE}
    for word in (PROMPT + " " + NEGATIVE).split():
        forms[f"word {word}"] = word
    if key_blob is not None:
        # a stretch from the middle of the key material: its start is a header shared with every context
        middle = key_blob[len(key_blob) // 2 : len(key_blob) // 2 + 24]
        forms["key hex"] = middle.hex()
        forms["key HEX"] = middle.hex().upper()
        forms["key base64"] = base64.b64encode(key_blob).decode()[len(key_blob) // 2 : len(key_blob) // 2 + 32]
        forms["key raw"] = middle.decode("latin-1")
    return forms


def assert_nothing_leaked(text: str, forms: dict[str, str]) -> None:
    leaked = [what for what, value in forms.items() if value and value.lower() in text.lower()]
    assert not leaked, f"found in the logs: {leaked}"


def _hostile_requests(url: str, token: str) -> None:
    frame = {"content-type": protocol.FRAME_CONTENT_TYPE}
    httpx.get(url + "/v1/capabilities", headers={"Authorization": f"Bearer {token}x"})
    httpx.post(url + "/v1/sessions", content=b"HEDF\x01\x00junk", headers=frame | {"Authorization": f"Bearer {token}"})
    httpx.post(url + "/v1/sessions/nope/steps", content=b"x", headers=frame | {"Authorization": f"Bearer {token}"})


def test_backend_and_client_logs_hold_no_token_prompt_or_key(server_model, client_model, caplog, capfd):
    tokens, token = TokenStore.ephemeral()
    key = he.ClientKey("fast", exportable=True)
    with caplog.at_level(logging.DEBUG):
        running = start_in_thread(create_app(server_model, tokens), log_level="debug", access_log=True)
        try:
            with BackendClient(running.url, token) as client:
                result = Generator(client_model, client).generate(
                    GenerationParams(
                        prompt=PROMPT, negative_prompt=NEGATIVE, steps=2, width=32, height=32, scheduler="ddim"
                    ),
                    key=key,
                )
            _hostile_requests(running.url, token)
            with BackendClient(running.url, token + "x") as client, pytest.raises(BackendRejected):
                client.capabilities()
        finally:
            running.stop()
    printed = capfd.readouterr()
    captured = caplog.text + printed.out + printed.err
    assert len(result.step_timings) == 2
    # the capture is real: uvicorn's access log and the client's HTTP log lines are in it
    assert "POST /v1/sessions" in captured and "401" in captured
    assert_nothing_leaked(captured, secret_forms(token, key.export_secret()))


@pytest.mark.slow
def test_served_process_and_cli_generation_log_nothing_secret(tiny_model_dir, tmp_path):
    from bench.served import serve_subprocess

    served = serve_subprocess(str(tiny_model_dir), tmp_path, "--session-ttl", "60")
    try:
        env = dict(os.environ, HEDIFF_TOKEN=served.token)
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "hediff.desktop.cli",
                "generate",
                "--accept-not-private",
                "--server",
                served.url,
                "--model",
                str(tiny_model_dir),
            ]
            + ["--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--steps", "2", "--width", "32", "--height", "32"]
            + ["--out", str(tmp_path / "out.png"), "--quiet"],
            env=env,
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
        )
        _hostile_requests(served.url, served.token)
    finally:
        served.stop()
    assert cli.returncode == 0, cli.stderr[-2000:]
    server_log = served.log_text
    assert "POST /v1/sessions" in server_log  # the access log is on in `hediff serve`
    assert_nothing_leaked(server_log + cli.stdout + cli.stderr, secret_forms(served.token, None))
