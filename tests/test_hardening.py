"""The backend holds against hostile and careless clients (issue 13): each test is the attack, against a real
server on loopback, and what the server must do instead of what it did before."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from hediff.backend.app import QUEUE_POSITION_HEADER, create_app
from hediff.backend.auth import TokenStore
from hediff.backend.engine import Limits, step_bounds
from hediff.backend.guard import ConnectionLimits
from hediff.backend.serve import start_in_thread
from hediff.common import he, protocol
from tests.test_backend_errors import FRAME, _open, _open_frame, _settings, _step_frame

WAIT_S = 10.0  # upper bound on how long any single thing below may take on a loaded machine


def serve(server_model, tokens: TokenStore, connections: ConnectionLimits | None = None, **limits):
    app = create_app(server_model, tokens, Limits(**limits))
    return start_in_thread(app, connections=connections), app


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def raw_connect(url: str, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))  # any 127.x address is this machine: a second "client address" on loopback
    s.settimeout(WAIT_S)
    s.connect(("127.0.0.1", _port(url)))
    return s


def read_until_closed(s: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


# --- 1: slow clients -----------------------------------------------------------------------------------------


def test_slow_headers_are_cut_and_capped_per_address_while_others_are_served(server_model):
    tokens, token = TokenStore.ephemeral()
    conn = ConnectionLimits(header_timeout_s=1.0, max_connections_per_address=4, max_connections=64)
    running, _app = serve(server_model, tokens, conn)
    try:
        attackers = [raw_connect(running.url, "127.0.0.2") for _ in range(4)]
        for s in attackers:
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and never the rest
        over = raw_connect(running.url, "127.0.0.2")  # the fifth from that address: closed at once, unanswered
        over.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_until_closed(over) == b""
        # another address is served meanwhile
        assert httpx.get(running.url + "/v1/health", timeout=WAIT_S).status_code == 200
        # past the header timeout every slow connection got a 408 and was closed
        answers = [read_until_closed(s) for s in attackers]
        assert all(a.startswith(b"HTTP/1.1 408") and b"request_timeout" in a for a in answers), answers
        fresh = raw_connect(running.url, "127.0.0.2")  # their slots are free again
        fresh.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_until_closed(fresh).startswith(b"HTTP/1.1 200")
        for s in [*attackers, over, fresh]:
            s.close()
    finally:
        running.stop()


def test_slow_body_is_cut_and_total_connections_are_capped(server_model):
    tokens, token = TokenStore.ephemeral()
    conn = ConnectionLimits(header_timeout_s=5.0, body_idle_timeout_s=1.0, max_connections=3)
    running, app = serve(server_model, tokens, conn)
    try:
        slow = raw_connect(running.url)
        slow.sendall(
            b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: %s\r\n"
            b"Content-Length: 100000\r\n\r\nHEDF" % (token.encode(), protocol.FRAME_CONTENT_TYPE.encode())
        )
        idle = [raw_connect(running.url, "127.0.0.3") for _ in range(2)]  # with `slow`: the total of 3
        extra = raw_connect(running.url, "127.0.0.4")
        assert read_until_closed(extra) == b""  # over the total: closed unanswered
        t0 = time.monotonic()
        read_until_closed(slow)  # the body stopped arriving: the connection is closed
        assert time.monotonic() - t0 < WAIT_S
        while app.state.budget.used:  # what it had reserved is released once the server sees the close
            assert time.monotonic() - t0 < WAIT_S
            time.sleep(0.02)
        for s in idle:
            s.close()
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:  # the server notices the closes asynchronously
            try:
                if httpx.get(running.url + "/v1/health", timeout=WAIT_S).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail("the server did not accept a connection after the idle ones closed")
        slow.close()
        extra.close()
    finally:
        running.stop()


def test_repeated_log_lines_are_rate_limited():
    import logging

    from hediff.backend.guard import install_log_limits

    limiter = install_log_limits()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep()
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    try:
        for _ in range(10_000):  # what accept() failing with EMFILE in a loop produced
            logger.error("socket.accept() out of system resource")
        logger.error("a different message")
        assert len(records) == limiter.burst + 1
        limiter._seen.clear()  # the window passed: the next line says how many were dropped
        limiter._seen[("asyncio", "socket.accept() out of system resource")] = [time.monotonic() - 60, 10_000]
        logger.error("socket.accept() out of system resource")
        assert "9995 similar lines suppressed" in records[-1].getMessage()
    finally:
        logger.removeHandler(handler)


# --- 2: one heavy client cannot freeze the others -------------------------------------------------------------


def _two_tokens() -> tuple[TokenStore, str, str]:
    tokens = TokenStore()
    return tokens, tokens.create("heavy", persist=False), tokens.create("light", persist=False)


def test_health_and_session_control_never_wait_for_the_model(server_model):
    tokens, heavy, light = _two_tokens()
    running, app = serve(server_model, tokens)
    key = he.ClientKey("fast")
    try:
        with httpx.Client(base_url=running.url, headers=auth(heavy), timeout=60) as h:
            busy, other = _open(h, server_model, key), _open(h, server_model, key)
            answers = {}
            with server_model.lock:  # the model is busy (as with a 2048 px step)
                t = threading.Thread(
                    target=lambda: answers.update(
                        step=h.post(
                            f"/v1/sessions/{busy['session_id']}/steps",
                            content=_step_frame(busy, key).encode(),
                            headers=FRAME,
                        )
                    )
                )
                t.start()
                deadline = time.monotonic() + WAIT_S
                while app.state.scheduler.active() != 1 or app.state.scheduler.queued():  # the worker has it
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                with httpx.Client(base_url=running.url, headers=auth(light), timeout=WAIT_S) as c:
                    assert c.get("/v1/health").status_code == 200
                    assert c.get("/v1/capabilities").status_code == 200
                    opened = _open(c, server_model, key)  # opening parses an HE context: still not the model
                    assert c.delete(f"/v1/sessions/{opened['session_id']}").status_code == 204
                assert h.delete(f"/v1/sessions/{other['session_id']}").status_code == 204
                assert "step" not in answers  # the step really was waiting for the model all along
            t.join(60)
            assert answers["step"].status_code == 200
    finally:
        running.stop()


def test_steps_are_scheduled_fairly_across_tokens(server_model):
    tokens, heavy, light = _two_tokens()
    running, app = serve(server_model, tokens, max_steps_per_token=4)
    key = he.ClientKey("fast")
    finished: list[str] = []  # session ids in the order the server's worker finished their steps
    positions: dict[str, int] = {}
    engine = app.state.engine
    real_step = engine.step

    def recording_step(session, frame):  # observes the order on the server; the step itself is the real one
        data = real_step(session, frame)
        finished.append(session.id)
        return data

    engine.step = recording_step

    def step(client, opened, name):
        r = client.post(
            f"/v1/sessions/{opened['session_id']}/steps", content=_step_frame(opened, key).encode(), headers=FRAME
        )
        assert r.status_code == 200, r.text
        positions[name] = int(r.headers[QUEUE_POSITION_HEADER])

    try:
        with (
            httpx.Client(base_url=running.url, headers=auth(heavy), timeout=120) as h,
            httpx.Client(base_url=running.url, headers=auth(light), timeout=120) as lc,
        ):
            heavy_sessions = [_open(h, server_model, key) for _ in range(5)]
            small = _open(lc, server_model, key)
            threads = []
            with server_model.lock:  # hold the model so the queue builds up deterministically
                for i, opened in enumerate(heavy_sessions[:4]):
                    threads.append(threading.Thread(target=step, args=(h, opened, f"heavy{i}")))
                    threads[-1].start()
                    deadline = time.monotonic() + WAIT_S
                    while app.state.scheduler.active() != i + 1:  # heavy0 runs (blocked), the rest wait in line
                        assert time.monotonic() < deadline
                        time.sleep(0.02)
                # a fifth heavy step is over the token's share: refused at once, not queued
                r = h.post(
                    f"/v1/sessions/{heavy_sessions[4]['session_id']}/steps",
                    content=_step_frame(heavy_sessions[4], key).encode(),
                    headers=FRAME,
                )
                assert r.status_code == 429 and r.json()["error"] == "too_many_steps"
                threads.append(threading.Thread(target=step, args=(lc, small, "light")))
                threads[-1].start()
                while app.state.scheduler.active() != 5:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
            for t in threads:
                t.join(120)
        # the light token's step ran right after the step that was running, not after the heavy backlog
        names = {s["session_id"]: f"heavy{i}" for i, s in enumerate(heavy_sessions)} | {small["session_id"]: "light"}
        assert [names[sid] for sid in finished] == ["heavy0", "light", "heavy1", "heavy2", "heavy3"]
        assert positions == {"heavy0": 0, "heavy1": 0, "heavy2": 1, "heavy3": 2, "light": 0}
    finally:
        running.stop()


def test_a_session_too_large_to_step_is_refused_when_opened(server_model):
    def step_bytes(side: int) -> int:
        header = protocol.SessionSettings.from_meta(_settings(server_model, height=side, width=side))
        latent = server_model.latent_shape(side, side)
        return step_bounds(header, latent, server_model.activation_shapes("conv_in", latent))[1]

    # a request limit between the steps of the usual size and of the largest size the model accepts
    limit = (step_bytes(32) + step_bytes(64)) // 2
    tokens, token = TokenStore.ephemeral()
    running, _app = serve(server_model, tokens, max_request_bytes=limit, max_inflight_bytes=4 * limit)
    key = he.ClientKey("fast")
    try:
        with httpx.Client(base_url=running.url, headers=auth(token), timeout=60) as c:
            big = _open_frame(server_model, key, height=64, width=64)
            r = c.post("/v1/sessions", content=big.encode(), headers=FRAME)
            assert r.status_code == 413 and r.json()["error"] == "session_too_large", r.text
            assert "choose a smaller size" in r.json()["detail"] and "256 parts" in r.json()["detail"]
            opened = _open(c, server_model, key)  # the usual size still opens, and steps
            r = c.post(
                f"/v1/sessions/{opened['session_id']}/steps", content=_step_frame(opened, key).encode(), headers=FRAME
            )
            assert r.status_code == 200
    finally:
        running.stop()


# --- 3: live token revocation and creation --------------------------------------------------------------------


def test_revocation_and_new_tokens_apply_without_restart(server_model, tmp_path):
    path = tmp_path / "tokens.json"
    admin = TokenStore.load(path)  # what `hediff token create/revoke` does, in another process
    doomed = admin.create("doomed")
    kept = admin.create("kept")
    doomed_id = TokenStore.load(path).verify(doomed)
    running, app = serve(server_model, TokenStore.load(path, reload_interval_s=0.2))
    key = he.ClientKey("fast")
    store = app.state.engine.store
    try:
        with httpx.Client(base_url=running.url, timeout=60) as c:
            opened = _open(httpx.Client(base_url=running.url, headers=auth(doomed), timeout=60), server_model, key)
            assert store.count() == 1
            assert TokenStore.load(path).revoke(doomed_id)
            deadline = time.monotonic() + WAIT_S
            while store.count():  # closed by the server itself, with no request to notice the change
                assert time.monotonic() < deadline, "the revoked token's session stayed open"
                time.sleep(0.05)
            r = c.post(
                f"/v1/sessions/{opened['session_id']}/steps",
                content=_step_frame(opened, key).encode(),
                headers={**FRAME, **auth(doomed)},
            )
            assert r.status_code == 401 and r.json()["error"] == "unauthorized"
            assert c.get("/v1/capabilities", headers=auth(kept)).status_code == 200
            fresh = TokenStore.load(path).create("new")
            while c.get("/v1/capabilities", headers=auth(fresh)).status_code != 200:
                assert time.monotonic() < deadline + WAIT_S, "a new token was not accepted without a restart"
                time.sleep(0.05)
    finally:
        running.stop()


# --- 4: bounded upload memory ---------------------------------------------------------------------------------


def _post_head(token: str, path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: {protocol.FRAME_CONTENT_TYPE}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def _status(s: socket.socket) -> int:
    head = b""
    while b"\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    return int(head.split(b" ", 2)[1])


def test_uploads_are_bounded_before_they_are_read(server_model):
    tokens = TokenStore()
    a, b, c3 = (tokens.create(name, persist=False) for name in ("a", "b", "c"))
    mib = 1 << 20
    running, app = serve(server_model, tokens, max_request_bytes=mib, max_inflight_bytes=4 * mib)
    key = he.ClientKey("fast")
    try:
        first = raw_connect(running.url)
        first.sendall(_post_head(a, "/v1/sessions", mib) + b"\0" * 1000)  # holds 2 MiB: token a's half
        deadline = time.monotonic() + WAIT_S
        while app.state.budget.used == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        same_token = raw_connect(running.url)
        same_token.sendall(_post_head(a, "/v1/sessions", mib))  # headers only: refused before any body
        assert _status(same_token) == 429
        other = raw_connect(running.url)
        other.sendall(_post_head(b, "/v1/sessions", mib) + b"\0" * 1000)  # another token still fits: 4 MiB in all
        while app.state.budget.used < 4 * mib:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        third = raw_connect(running.url)
        third.sendall(_post_head(c3, "/v1/sessions", 1000))  # the whole budget is taken
        assert _status(third) == 429
        too_big = raw_connect(running.url)
        too_big.sendall(_post_head(c3, "/v1/sessions", mib + 1))
        assert _status(too_big) == 413
        first.close()
        other.close()
        while app.state.budget.used:  # released when the clients went away
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert app.state.budget.peak == 4 * mib
        with httpx.Client(base_url=running.url, headers=auth(a), timeout=60) as c:
            opened = _open(c, server_model, key)
            # a step body larger than this session can ever need: refused on its Content-Length alone
            step_path = f"/v1/sessions/{opened['session_id']}/steps"
            session = app.state.engine.store.get(opened["session_id"], tokens.verify(a))
            over = raw_connect(running.url)
            over.sendall(_post_head(a, step_path, session.max_step_bytes + 1))
            assert _status(over) == 413
            # fields the session does not use are refused, not carried along
            r = c.post(step_path, content=_step_frame(opened, key, zzz=b"x" * 100).encode(), headers=FRAME)
            assert r.status_code == 400 and "unexpected fields" in r.json()["detail"] and "zzz" in r.json()["detail"]
            r = c.post(step_path, content=_step_frame(opened, key).encode(), headers=FRAME)
            assert r.status_code == 200  # nothing changed: step 0 still works
        for s in (same_token, third, too_big, over):
            s.close()
    finally:
        running.stop()


def _peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc")


@pytest.mark.slow
def test_concurrent_uploads_keep_server_memory_within_the_budget(tiny_model_dir, tmp_path):
    from bench.served import serve_subprocess

    served = serve_subprocess(str(tiny_model_dir), tmp_path, "--max-request-mb", "8", "--max-inflight-mb", "32")
    try:
        before = _peak_rss_bytes(served.proc.pid)
        body = b"\0" * (8 << 20)
        statuses = []

        def upload():
            s = raw_connect(served.url)
            try:
                s.sendall(_post_head(served.token, "/v1/sessions", len(body)))
                s.sendall(body)
                statuses.append(_status(s))
            except OSError:  # refused early: the server answered 429 and closed while we were still sending
                statuses.append(429)
            finally:
                s.close()

        threads = [threading.Thread(target=upload) for _ in range(16)]  # 16 x 8 MiB = 128 MiB offered at once
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        growth = _peak_rss_bytes(served.proc.pid) - before
        assert statuses.count(429) >= 8 and set(statuses) <= {400, 429}, statuses
        assert growth < (32 << 20) + (32 << 20), growth  # the budget plus allocator slack, not 16 x 2 x 8 MiB
    finally:
        served.stop()


# --- 6: a frame whose shape product overflows int64 -------------------------------------------------------------


def test_a_token_that_keeps_sending_malformed_bodies_cools_down_unread_and_alone(server_model):
    tokens, flood = TokenStore.ephemeral()
    other = tokens.create("other", persist=False)
    running, app = serve(server_model, tokens, failures_before_cooldown=3, failure_cooldown_s=1.0)
    try:
        with httpx.Client(base_url=running.url, timeout=WAIT_S) as c:
            garbage = b"\0" * (1 << 20)
            codes = [c.post("/v1/sessions", content=garbage, headers={**auth(flood), **FRAME}) for _ in range(3)]
            assert [r.json()["error"] for r in codes] == ["bad_frame"] * 3
            # refused from its headers alone: the body is never sent, and the answer comes anyway
            s = raw_connect(running.url)
            s.sendall(
                b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                + FRAME["content-type"].encode()
                + b"\r\nAuthorization: Bearer "
                + flood.encode()
                + b"\r\nContent-Length: 1048576\r\n\r\n"
            )
            head = s.recv(65536).decode()
            s.close()
            assert head.startswith("HTTP/1.1 429") and "token_cooling_down" in head and "retry-after: 1" in head.lower()
            assert "malformed 3 times" in head
            # another token is not affected, and the first one is served again after the cool-down
            assert c.get("/v1/capabilities", headers=auth(other)).status_code == 200
            assert c.get("/v1/capabilities", headers=auth(flood)).status_code == 429
            time.sleep(1.1)
            assert c.get("/v1/capabilities", headers=auth(flood)).status_code == 200
    finally:
        running.stop()


def test_shape_overflowing_int64_is_a_clear_400(backend):
    header = json.dumps(
        {
            "meta": {},
            "blobs": [{"name": "cond", "kind": "tensor", "dtype": "float32", "shape": [2**31 - 1] * 6, "nbytes": 0}],
        }
    ).encode()
    frame = b"HEDF" + struct.pack("<BBI", protocol.PROTOCOL_VERSION, 0, len(header)) + header
    r = httpx.post(backend.url + "/v1/sessions", content=frame, headers={**FRAME, **auth(backend.token)}, timeout=60)
    assert r.status_code == 400 and r.json()["error"] == "bad_frame"
    assert "elements; at most" in r.json()["detail"]


# --- 7: the token file ------------------------------------------------------------------------------------------


def test_token_file_is_private_refuses_symlinks_and_survives_concurrent_edits(tmp_path):
    path = tmp_path / "tokens.json"
    TokenStore.load(path).create("first")
    assert (path.stat().st_mode & 0o777) == 0o600
    errors = []

    def create_many(n):
        try:
            for i in range(n):
                TokenStore.load(path).create(f"t{i}")  # separate stores, as separate `hediff token` commands
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=create_many, args=(5,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(TokenStore.load(path).records()) == 31  # no edit lost
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

    target = tmp_path / "elsewhere.json"
    target.write_text("precious")
    link = tmp_path / "linked.json"
    link.symlink_to(target)
    with pytest.raises(ValueError, match="symbolic link"):
        TokenStore(path=link).create("x")
    assert target.read_text() == "precious"


def test_token_ids_are_unique(tmp_path, monkeypatch):
    import hediff.backend.auth as auth_module

    draws = iter(["aaaaaaaa", "aaaaaaaa", "bbbbbbbb"])  # a 32-bit collision, forced
    real = auth_module.secrets.token_hex
    monkeypatch.setattr(auth_module.secrets, "token_hex", lambda n: next(draws) if n == 4 else real(n))
    store = TokenStore.load(tmp_path / "tokens.json")
    store.create("one")
    store.create("two")
    assert sorted(r.id for r in TokenStore.load(tmp_path / "tokens.json").records()) == ["aaaaaaaa", "bbbbbbbb"]


# --- 9: ciphertext scratch files --------------------------------------------------------------------------------


def _scratch_files(pid: int) -> list[str]:
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
    import tempfile

    folder = folder or tempfile.gettempdir()
    return [n for n in os.listdir(folder) if n.startswith(f"{he.SCRATCH_PREFIX}{pid}-")]


def test_no_ciphertext_scratch_file_outlives_its_use_and_stale_ones_are_removed(server_model, backend):
    key = he.ClientKey("fast")
    with httpx.Client(base_url=backend.url, headers=auth(backend.token), timeout=60) as c:
        opened = _open(c, server_model, key)
        r = c.post(
            f"/v1/sessions/{opened['session_id']}/steps", content=_step_frame(opened, key).encode(), headers=FRAME
        )
        assert r.status_code == 200
        c.delete(f"/v1/sessions/{opened['session_id']}")
    assert _scratch_files(os.getpid()) == []
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    folder = he._scratch_dir()
    crashed = Path(folder) / f"{he.SCRATCH_PREFIX}{dead_pid}-abc123"
    crashed.write_bytes(b"ciphertext of a crashed run")
    tokens, _token = TokenStore.ephemeral()
    running, _app = serve(server_model, tokens)  # starting a server cleans up
    running.stop()
    assert not crashed.exists()


# --- 10: smaller findings on the server ---------------------------------------------------------------------------


def test_health_names_no_model_and_api_docs_need_the_token(backend):
    health = httpx.get(backend.url + "/v1/health").json()
    assert health == {"status": "ok", "protocol_version": protocol.PROTOCOL_VERSION}
    assert "tiny-test" not in json.dumps(health)
    assert httpx.get(backend.url + "/openapi.json").status_code == 401
    assert httpx.get(backend.url + "/docs").status_code == 404
    assert httpx.get(backend.url + "/redoc").status_code == 404
    spec = httpx.get(backend.url + "/openapi.json", headers=auth(backend.token)).json()
    assert "/v1/sessions" in spec["paths"]


def test_every_error_code_is_snake_case(server_model):
    tokens, token = TokenStore.ephemeral()
    running, app = serve(server_model, tokens, session_ttl_s=60)
    now = [0.0]
    app.state.engine.store.clock = lambda: now[0]
    key = he.ClientKey("fast")
    codes = {}
    try:
        with httpx.Client(base_url=running.url, headers=auth(token), timeout=60) as c:
            opened = _open(c, server_model, key)
            sid = opened["session_id"]
            codes[409] = c.post(
                f"/v1/sessions/{sid}/steps", content=_step_frame(opened, key, step=1).encode(), headers=FRAME
            )
            codes[404] = c.delete("/v1/sessions/nope")
            codes[415] = c.post("/v1/sessions", content=b"{}", headers={"content-type": "application/json"})
            codes[400] = c.post("/v1/sessions", content=b"HEDF", headers=FRAME)
            now[0] += 61
            codes[410] = c.post(f"/v1/sessions/{sid}/steps", content=_step_frame(opened, key).encode(), headers=FRAME)
            codes[401] = httpx.get(running.url + "/v1/capabilities")
        seen = {status: r.json()["error"] for status, r in codes.items()}
        assert {s: r.status_code for s, r in codes.items()} == {s: s for s in codes}
        assert seen[409] == "step_out_of_order" and seen[404] == "session_not_found" and seen[410] == "session_expired"
        assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", code) for code in seen.values()), seen
        documented = Path(__file__).resolve().parents[1].joinpath("docs", "protocol.md").read_text()
        assert all(f"`{code}`" in documented for code in seen.values())
    finally:
        running.stop()
