"""Bad input gets a specific 4xx, changes nothing, and the server keeps serving; client-side errors are clear."""

import socket
import threading

import httpx
import numpy as np
import pytest

from hediff.common import he, protocol
from hediff.common.latent import encrypt_latent
from hediff.common.schedulers import build_plan
from hediff.desktop.core.backend_client import (
    BackendClient,
    BackendProtocolError,
    BackendRejected,
    BackendTimeout,
    BackendUnreachable,
)
from tests.test_he import context_with_secret_key

FRAME = {"content-type": protocol.FRAME_CONTENT_TYPE}


@pytest.fixture(scope="module")
def http(backend):
    with httpx.Client(base_url=backend.url, headers={"Authorization": f"Bearer {backend.token}"}, timeout=60) as c:
        yield c


def _settings(server_model, **kw):
    s = dict(
        scheduler="ddim",
        steps=3,
        guidance=7.5,
        height=32,
        width=32,
        split="conv_in",
        encryption="full",
        he_preset="fast",
        activation_dtype="float32",
    )
    s.update(kw)
    try:
        s["plan_digest"] = build_plan(s["scheduler"], server_model.scheduler_config, s["steps"]).digest()
    except ValueError:  # the request under test is invalid anyway; the server must say why
        s["plan_digest"] = "0" * 64
    s["weights_digest"] = server_model.weights_digest
    return s


def _open_frame(server_model, key: he.ClientKey | None = None, **kw) -> protocol.Frame:
    dim = server_model.cross_attention_dim
    rng = np.random.default_rng(0)
    f = protocol.Frame(
        meta=_settings(server_model, **kw),
        tensors={
            "cond": rng.standard_normal((1, 77, dim)).astype(np.float32),
            "uncond": rng.standard_normal((1, 77, dim)).astype(np.float32),
        },
    )
    if key is not None:
        f.blobs["context"] = key.evaluation_context()
    return f


def _open(http, server_model, key):
    r = http.post("/v1/sessions", content=_open_frame(server_model, key).encode(), headers=FRAME)
    assert r.status_code == 201, r.text
    return r.json()


def _step_frame(opened, key, step=0, **overrides) -> protocol.Frame:
    rng = np.random.default_rng(step)
    shape = tuple(opened["latent_shape"])
    h_shape = tuple(opened["activation_shapes"]["h"])
    f = protocol.Frame(meta={"step": step}, tensors={"h": rng.standard_normal(h_shape).astype(np.float32)})
    for i, ct in enumerate(encrypt_latent(rng.standard_normal(shape), None, key).ciphertexts):
        f.blobs[f"ct{i}"] = ct.serialize()
    for k, v in overrides.items():
        if v is None:
            f.tensors.pop(k, None)
            f.blobs.pop(k, None)
        elif isinstance(v, bytes):
            f.blobs[k] = v
        else:
            f.tensors[k] = v
    return f


def _post_step(http, sid, frame):
    return http.post(f"/v1/sessions/{sid}/steps", content=frame.encode(), headers=FRAME)


def test_health_and_capabilities(http, backend):
    assert httpx.get(backend.url + "/v1/health").json()["status"] == "ok"
    caps = http.get("/v1/capabilities").json()
    assert caps["schedulers"] == ["ddim", "plms", "euler", "dpmpp-2m", "euler-a", "dpmpp-2m-sde", "unipc", "heun"] + [
        "lcm",
        "ddpm",
    ]
    assert "fast" in caps["he_presets"] and "paper" in caps["he_presets"]
    spec = http.get("/openapi.json").json()
    assert "/v1/sessions/{session_id}/steps" in spec["paths"]


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic abc", "Bearer"])
def test_missing_or_wrong_token_is_401(backend, auth):
    headers = {"Authorization": auth} if auth else {}
    r = httpx.get(backend.url + "/v1/capabilities", headers=headers)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"


def test_bad_requests_get_specific_errors_and_change_nothing(http, backend, server_model):
    key = he.ClientKey("fast")
    opened = _open(http, server_model, key)
    sid = opened["session_id"]
    shape = tuple(opened["activation_shapes"]["h"])
    good = _step_frame(opened, key)
    nan = good.tensors["h"].copy()
    nan[0, 0, 0, 0] = np.nan
    cases = [
        (
            http.post(f"/v1/sessions/{sid}/steps", content=b"junk", headers={"content-type": "application/json"}),
            415,
            "application/x-hediff-frame",
        ),
        (http.post(f"/v1/sessions/{sid}/steps", content=good.encode()[:-7], headers=FRAME), 400, "truncated"),
        (http.post(f"/v1/sessions/{sid}/steps", content=b"HEDF" + b"\x01", headers=FRAME), 400, "truncated"),
        (_post_step(http, sid, _step_frame(opened, key, h=np.zeros((1, 3, 3, 3), np.float32))), 400, "shape"),
        (_post_step(http, sid, _step_frame(opened, key, h=np.zeros(shape, np.float64))), 400, "dtype"),
        (_post_step(http, sid, _step_frame(opened, key, h=nan)), 400, "NaN"),
        (_post_step(http, sid, _step_frame(opened, key, ct0=None)), 400, "missing ct0"),
        (_post_step(http, sid, _step_frame(opened, key, ct0=b"not a ciphertext")), 400, "not a ciphertext"),
        (_post_step(http, sid, _step_frame(opened, key, step=2)), 409, "expected step 0"),
        (_post_step(http, sid, _step_frame(opened, key, step=99)), 400, "'step'"),
        (_post_step(http, "no-such-session", good), 404, "no session"),
    ]
    for r, status, text in cases:
        assert r.status_code == status, (status, r.status_code, r.text)
        assert text in r.json()["detail"], r.json()
    # nothing changed: step 0 is still the next step and works
    r = _post_step(http, sid, good)
    assert r.status_code == 200
    answer = protocol.decode_frame(r.content)
    assert answer.meta["step"] == 0 and "ct0" in answer.blobs
    # a retry of the same step gets the same answer instead of corrupting the history
    assert _post_step(http, sid, good).content == r.content
    assert http.delete(f"/v1/sessions/{sid}").status_code == 204
    assert http.delete(f"/v1/sessions/{sid}").status_code == 404


def test_bad_session_requests(http, server_model):
    key = he.ClientKey("fast")
    leaky = _open_frame(server_model, key)
    leaky.blobs["context"] = context_with_secret_key(key.preset)
    bad_digest = _open_frame(server_model, key)
    bad_digest.meta["plan_digest"] = "0" * 64
    cases = [
        (leaky, "secret key"),
        (bad_digest, "step plan differs"),
        (_open_frame(server_model, key, scheduler="lms"), "'scheduler'"),
        (_open_frame(server_model, key, height=30), "multiples"),
        (_open_frame(server_model, key, steps=0), "'steps'"),
        (_open_frame(server_model, None), "'context'"),
        (_open_frame(server_model, he.ClientKey("paper")), "do not match preset 'fast'"),
    ]
    before = http.get("/v1/capabilities").status_code
    for frame, text in cases:
        r = http.post("/v1/sessions", content=frame.encode(), headers=FRAME)
        assert r.status_code == 400 and text in r.json()["detail"], (text, r.status_code, r.text)
    assert before == 200 and http.get("/v1/health").status_code == 200


def test_oversized_payload_is_413(server_model):
    from tests.conftest import start_backend

    running, small = start_backend(server_model, max_request_bytes=64 << 10)
    try:
        with httpx.Client(base_url=small.url, headers={"Authorization": f"Bearer {small.token}"}) as c:
            r = c.post("/v1/sessions", content=b"\0" * (128 << 10), headers=FRAME)
            assert r.status_code == 413 and "exceeds" in r.json()["detail"]

            def chunked():  # no Content-Length: the limit must hold while streaming too
                for _ in range(8):
                    yield b"\0" * (16 << 10)

            r = c.post("/v1/sessions", content=chunked(), headers=FRAME)
            assert r.status_code == 413
            assert c.get("/v1/health").status_code == 200
    finally:
        running.stop()


def test_expired_session_is_410_and_limits_per_token(server_model):
    from hediff.backend.sessions import SessionStore
    from tests.conftest import start_backend

    running, b = start_backend(server_model, max_sessions_per_token=2, session_ttl_s=60)
    now = [0.0]
    store: SessionStore = b.app.state.engine.store
    store.clock = lambda: now[0]
    try:
        with httpx.Client(base_url=b.url, headers={"Authorization": f"Bearer {b.token}"}) as c:
            key = he.ClientKey("fast")
            first = _open(c, server_model, key)
            _open(c, server_model, key)
            r = c.post("/v1/sessions", content=_open_frame(server_model, key).encode(), headers=FRAME)
            assert r.status_code == 429 and "open sessions" in r.json()["detail"]
            assert r.headers["retry-after"] == "60"  # the first of the two sessions expires 60 s from now
            now[0] += 30
            r = c.post("/v1/sessions", content=_open_frame(server_model, key).encode(), headers=FRAME)
            assert r.status_code == 429 and r.headers["retry-after"] == "30"
            now[0] += 31
            r = _post_step(c, first["session_id"], _step_frame(first, key))
            assert r.status_code == 410 and "expired" in r.json()["detail"]
            _open(c, server_model, key)  # expiry freed the slots
    finally:
        running.stop()


def test_other_sessions_keep_working_while_one_gets_garbage(http, server_model):
    key = he.ClientKey("fast")
    a, b = _open(http, server_model, key), _open(http, server_model, key)
    errors = []

    def spam():
        for _ in range(20):
            r = http.post(f"/v1/sessions/{a['session_id']}/steps", content=b"HEDF\x01\x00garbage", headers=FRAME)
            if r.status_code != 400:
                errors.append(r.status_code)

    t = threading.Thread(target=spam)
    t.start()
    for i in range(3):
        r = _post_step(http, b["session_id"], _step_frame(b, key, step=i))
        assert r.status_code == 200, r.text
    t.join()
    assert errors == []
    for s in (a, b):
        http.delete(f"/v1/sessions/{s['session_id']}")


# --- client side ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _RawServer:
    """A loopback TCP server that answers every connection with fixed bytes (or never answers)."""

    def __init__(self, answer: bytes | None):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.answer = answer
        self.conns = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.answer is not None:
                conn.settimeout(0.3)
                try:
                    while conn.recv(65536):  # the whole request first: closing on unread bytes resets the answer
                        pass
                except TimeoutError:
                    pass
                try:
                    conn.sendall(self.answer)
                    conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # a client that stopped reading (an answer over its cap) and went away
                conn.close()

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def test_client_errors_name_the_server_and_say_what_happened():
    url = f"http://127.0.0.1:{_free_port()}"
    with BackendClient(url, "t") as c, pytest.raises(BackendUnreachable, match=f"cannot reach the backend at {url}"):
        c.health()

    silent = _RawServer(None)
    with BackendClient(silent.url, "t", timeout_s=0.5) as c, pytest.raises(BackendTimeout, match=silent.url):
        c.health()
    silent.close()

    body = b'{"error":"boom","detail":"x"}'
    crash = _RawServer(
        b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
        % (len(body), body)
    )
    with BackendClient(crash.url, "t") as c, pytest.raises(BackendRejected, match="failed with HTTP 500"):
        c.capabilities()
    crash.close()

    garbage = _RawServer(b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 5\r\n\r\n<html")
    with BackendClient(garbage.url, "t") as c, pytest.raises(BackendProtocolError, match="did not answer JSON"):
        c.health()
    garbage.close()

    notframe = _RawServer(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/x-hediff-frame\r\ncontent-length: 4\r\n\r\nHEDF"
    )
    with BackendClient(notframe.url, "t") as c, pytest.raises(BackendProtocolError, match="malformed step answer"):
        c.step("s", protocol.Frame(meta={"step": 0}))
    notframe.close()


def test_wrong_token_message(backend):
    with BackendClient(backend.url, "hdt_wrong") as c, pytest.raises(BackendRejected, match="refused the API token"):
        c.capabilities()


def test_cli_reports_unreachable_server_without_traceback(tiny_model_dir, capsys):
    from hediff.desktop.cli import main

    url = f"http://127.0.0.1:{_free_port()}"
    rc = main(
        [
            "generate",
            "--accept-not-private",
            "--server",
            url,
            "--token",
            "x",
            "--model",
            str(tiny_model_dir),
            "--prompt",
            "a red circle",
            "--steps",
            "2",
            "--width",
            "32",
            "--height",
            "32",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 4 and "cannot reach the backend" in err  # EXIT_UNREACHABLE and url in err and "Traceback" not in err
