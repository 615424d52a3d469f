"""Running the backend: in the foreground (``hediff serve``) or on loopback in a background thread."""

from __future__ import annotations

import logging
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from hediff.backend.guard import ConnectionGuard, ConnectionLimits, guarded_protocol, install_log_limits
from hediff.common import he
from hediff.common.net import is_loopback

log = logging.getLogger("hediff.backend")


@dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path


def check_tls_files(cert: str | Path | None, key: str | Path | None) -> TLSFiles | None:
    """Both files or neither; each readable; together a certificate chain with its key. ValueError names the file."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        given, missing = ("--tls-cert", "--tls-key") if cert is not None else ("--tls-key", "--tls-cert")
        raise ValueError(f"{given} was given without {missing}: TLS needs both the certificate and its private key")
    files = TLSFiles(Path(cert), Path(key))
    for flag, path in (("--tls-cert", files.cert), ("--tls-key", files.key)):
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise ValueError(f"{flag} {path} cannot be read ({e.strerror or e})") from None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(files.cert, files.key)
    except ssl.SSLError as e:
        raise ValueError(
            f"--tls-cert {files.cert} and --tls-key {files.key} do not form a usable certificate and key ({e.reason}); "
            "check that both are PEM and that the key belongs to the certificate"
        ) from None
    return files


def plaintext_warning(host: str) -> str:
    bar = "!" * 78
    return "\n".join(
        [
            bar,
            f"!! WARNING: serving on {host}, which is not a loopback address, WITHOUT TLS.",
            "!! Bearer tokens, prompt embeddings, head activations and ciphertexts will cross the network",
            "!! in the clear: anyone on the path can read them and reuse the token.",
            "!! Serve with --tls-cert CERT.pem --tls-key KEY.pem, put a TLS proxy in front,",
            "!! or bind to 127.0.0.1.",
            bar,
        ]
    )


def _uvicorn_tls(tls: TLSFiles | None) -> dict:
    return {} if tls is None else {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}


def _uvicorn_limits(connections: ConnectionLimits) -> dict:
    """uvicorn settings that bound what one client can hold: our guarded h11 protocol, keep-alive, backlog."""
    return {
        "http": guarded_protocol(ConnectionGuard(connections)),
        "timeout_keep_alive": connections.keep_alive_s,
        "backlog": min(2048, connections.max_connections),
        "h11_max_incomplete_event_size": 64 << 10,  # request line + headers; ours are a few hundred bytes
    }


_serving_lock = threading.Lock()


def _app_shutdown(app) -> Callable[[], None] | None:
    """The app's own shutdown hook (model workers, token watcher), looking through ASGI wrappers, to be called when
    the last server serving that app stops: tests serve one app through several wrappers, and stopping one of them
    must not stop the model workers the others still use."""
    for _ in range(4):
        state = getattr(app, "state", None)
        if getattr(state, "shutdown", None) is not None:
            return _counted_release(state)
        app = getattr(app, "app", None)
    return None


def _counted_release(state) -> Callable[[], None]:
    with _serving_lock:
        state.servers = getattr(state, "servers", 0) + 1

    def release() -> None:
        with _serving_lock:
            state.servers -= 1
            last = state.servers == 0
        if last:
            state.shutdown()

    return release


def prepare_process() -> None:
    """Once per server process: quiet repeated log lines and remove ciphertext scratch files of dead processes."""
    install_log_limits()
    removed = he.remove_stale_scratch_files()
    if removed:
        log.warning("removed %d ciphertext scratch file(s) left by a stopped backend", removed)


@dataclass
class RunningServer:
    server: uvicorn.Server
    thread: threading.Thread
    url: str
    on_stop: Callable[[], None] | None = None  # the app's shutdown (model workers, token watcher)

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.on_stop is not None:
            self.on_stop()


def start_in_thread(
    app,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = 30.0,
    tls: TLSFiles | None = None,
    log_level: str = "warning",
    access_log: bool = False,
    connections: ConnectionLimits | None = None,
) -> RunningServer:
    """Serve ``app`` from a daemon thread; returns once it accepts connections (port 0 picks a free port)."""
    prepare_process()
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        lifespan="off",
        **_uvicorn_tls(tls),
        **_uvicorn_limits(connections or ConnectionLimits()),
    )
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
    scheme = "http" if tls is None else "https"
    return RunningServer(server=server, thread=thread, url=f"{scheme}://{host}:{bound}", on_stop=_app_shutdown(app))


def warn_if_exposed(host: str, tls: TLSFiles | None) -> bool:
    """Print (and log) a loud warning when a non-loopback address is served without TLS; True if it did."""
    if tls is not None or is_loopback(host):
        return False
    print(plaintext_warning(host), file=sys.stderr, flush=True)
    log.warning("serving on %s, which is not a loopback address, WITHOUT TLS", host)
    return True


def serve_forever(
    app, host: str, port: int, tls: TLSFiles | None = None, connections: ConnectionLimits | None = None
) -> None:
    warn_if_exposed(host, tls)
    prepare_process()
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info",
        **_uvicorn_tls(tls),
        **_uvicorn_limits(connections or ConnectionLimits()),
    )
    he.remove_stale_scratch_files(include_own=True)
