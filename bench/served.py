"""`hediff serve` in its own process, as users run it, for the benchmarks that need a real separate backend."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


@dataclass
class ServedBackend:
    proc: subprocess.Popen
    url: str
    token: str
    log_path: Path
    died_early: bool = False  # it had exited before stop() was called
    log_text: str = ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        elif not self.log_text:
            self.died_early = True
        if not self.log_text:
            self.log_text = self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_subprocess(model: str, workdir: Path, *extra: str, timeout: float = 180.0) -> ServedBackend:
    """`hediff serve` in its own process with a fresh token; its stdout and stderr go to ``workdir/serve.log``."""
    env = dict(os.environ, HEDIFF_CONFIG_DIR=str(workdir))
    hediff = [sys.executable, "-m", "hediff.desktop.cli"]
    token = subprocess.run(
        hediff + ["token", "create", "--label", "bench"], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    port = free_port()
    log_path = workdir / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            hediff + ["serve", "--model", model, "--port", str(port), "--device", "cpu", "--dtype", "float32", *extra],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the backend exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/v1/health", timeout=1).status_code == 200:
                return ServedBackend(proc, url, token, log_path)
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the backend did not come up")
