"""Shared pytest fixtures.

Keep this file to fixtures that several test modules use; module-specific fixtures live in their module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

# Qt tests run without a display; this must happen before any QApplication exists
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD 1.x diffusers folder (common.models.build_tiny_model, seed 0), built once per session.

    Treat it as read-only: copy it (e.g. ``shutil.copytree``) before modifying anything.
    """
    from hediff.common.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD 2.x-style folder (common.models.build_tiny_sd2_model, seed 0: v-prediction, linear
    projections, upcast attention, a 48-wide gelu text encoder), built once per session. Read-only."""
    from hediff.common.models import build_tiny_sd2_model

    return build_tiny_sd2_model(tmp_path_factory.mktemp("tiny-sd2-model") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SDXL folder (common.models.build_tiny_sdxl_model, seed 0: two text encoders, pooled text
    embeddings and time ids as added conditioning), built once per session. Read-only."""
    from hediff.common.models import build_tiny_sdxl_model

    return build_tiny_sdxl_model(tmp_path_factory.mktemp("tiny-sdxl-model") / "model", seed=0)


# --- a real backend on loopback ------------------------------------------------------------------


class _RecordingASGI:
    """Keeps the raw bodies the server received, so tests can assert on what actually crossed the wire."""

    def __init__(self, app, recorded: list):
        self.app, self.recorded = app, recorded

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        chunks = []

        async def recording_receive():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    self.recorded.append((scope["path"], b"".join(chunks)))
            return message

        return await self.app(scope, recording_receive, send)


@dataclass
class Backend:
    url: str
    token: str
    app: object
    recorded: list


def start_backend(server_model, **limits_kw):
    from hediff.backend.app import create_app
    from hediff.backend.auth import TokenStore
    from hediff.backend.engine import Limits
    from hediff.backend.serve import start_in_thread

    tokens, token = TokenStore.ephemeral("tests")
    # many tests send deliberately malformed requests with this one token: the malformed-request cool-down (tested
    # on its own in tests/test_hardening.py) would otherwise refuse later tests' valid requests
    limits_kw.setdefault("failures_before_cooldown", 1_000_000)
    app = create_app(server_model, tokens, Limits(**limits_kw))
    recorded: list = []
    running = start_in_thread(_RecordingASGI(app, recorded))
    return running, Backend(url=running.url, token=token, app=app, recorded=recorded)


@pytest.fixture(scope="session")
def server_model(tiny_model_dir):
    from hediff.backend.engine import ServerModel

    return ServerModel(tiny_model_dir, "tiny-test", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def backend(server_model):
    running, info = start_backend(server_model)
    yield info
    running.stop()


@pytest.fixture(scope="session")
def client_model(tiny_model_dir):
    from hediff.desktop.core.client_model import ClientModel

    return ClientModel(tiny_model_dir, "conv_in")


@pytest.fixture
def generator(client_model, backend):
    from hediff.desktop.core.backend_client import BackendClient
    from hediff.desktop.core.engine import Generator

    with BackendClient(backend.url, backend.token) as client:
        yield Generator(client_model, client)


# --- a real redis-server (the Ray Serve backend's session store) ----------------------------------------------


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A redis-server of its own on a free loopback port, without persistence, for the whole test session."""
    import shutil
    import socket
    import subprocess
    import time

    import redis

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        cwd=tmp_path_factory.mktemp("redis"),
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)
