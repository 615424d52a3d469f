"""Running the backend: in the foreground (``hediff serve``) or on loopback in a background thread."""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from dataclasses import dataclass

import uvicorn

log = logging.getLogger("hediff.backend")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class RunningServer:
    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> RunningServer:
    """Serve ``app`` from a daemon thread; returns once it accepts connections (port 0 picks a free port)."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="hediff-backend", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the backend could not start on {host}:{port}")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the backend did not start on {host}:{port} within {timeout:.0f} s")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(server=server, thread=thread, url=f"http://{host}:{bound}")


def serve_forever(app, host: str, port: int) -> None:
    if not is_loopback(host):
        log.warning(
            "serving on %s, which is not a loopback address, WITHOUT TLS: bearer tokens and ciphertexts cross the "
            "network in the clear; put a TLS proxy in front or bind to 127.0.0.1",
            host,
        )
    uvicorn.run(app, host=host, port=port, log_level="info")
