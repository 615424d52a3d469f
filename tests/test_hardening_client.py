"""Client-side hardening (issue 13): bounded answers, retries of a lost step, no token over plain http to another
machine, private output files, and stored keys whose count cannot be reset or whose unlock cannot be made slow."""

from __future__ import annotations

import base64
import json
import socket
import stat
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from hediff.common import he, protocol
from hediff.desktop.core.backend_client import (
    STEP_ATTEMPTS,
    BackendClient,
    BackendInsecure,
    BackendProtocolError,
    BackendRejected,
)
from hediff.desktop.core.engine import GenerationParams, GenerationResult
from hediff.desktop.core.gallery import Gallery, save_png_private
from hediff.desktop.core.keystore import CorruptKeyFile, DeviceKeys, MemoryKeyring, SecretStore
from tests.test_backend_errors import _open_frame, _RawServer, _step_frame

PROMPT = "a private prompt about a patient"


# --- 8: answers are bounded by what the protocol allows ----------------------------------------------------------


def test_client_stops_reading_oversized_answers():
    announced = _RawServer(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5000000\r\n\r\n{")
    with BackendClient(announced.url, "t") as c, pytest.raises(BackendProtocolError, match="at most 1048576"):
        c.health()
    announced.close()

    chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"  # chunked, no length announced: 64 KiB chunks, 4 MiB in all
    endless = _RawServer(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/x-hediff-frame\r\ntransfer-encoding: chunked\r\n\r\n"
        + chunk * 64
        + b"0\r\n\r\n"
    )
    with BackendClient(endless.url, "t") as c, pytest.raises(BackendProtocolError, match="stopped reading"):
        c.step("s", protocol.Frame(meta={"step": 0}))  # a 40-byte request: its answer may not be megabytes
    endless.close()


# --- a lost answer is retried, and the server replays it ----------------------------------------------------


class DropFirstStepAnswer:
    """A TCP proxy to the backend that closes the connection instead of forwarding the first step's answer
    (after the server has done the step), as a dropped network connection would."""

    def __init__(self, upstream_url: str):
        self.upstream = int(upstream_url.rsplit(":", 1)[1])
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn,), daemon=True).start()

    def _relay(self, conn: socket.socket):
        up = socket.create_connection(("127.0.0.1", self.upstream))
        sent = bytearray()

        def forward():
            try:
                while data := conn.recv(65536):
                    sent.extend(data)
                    up.sendall(data)
            except OSError:
                pass

        threading.Thread(target=forward, daemon=True).start()
        try:
            while data := up.recv(65536):
                if not self.dropped and b"/steps" in sent:
                    self.dropped += 1
                    break
                conn.sendall(data)
        except OSError:
            pass
        for s in (conn, up):  # shutdown, not just close: the forwarding thread still blocks in recv()
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.sock.close()


def test_a_step_whose_answer_is_lost_is_retried_and_replayed(backend, server_model):
    key = he.ClientKey("fast")
    proxy = DropFirstStepAnswer(backend.url)
    try:
        with BackendClient(proxy.url, backend.token) as c:
            opened = c.open_session(_open_frame(server_model, key))
            first = _step_frame(opened, key, step=0)
            before = len(backend.recorded)
            answer = c.step(opened["session_id"], first)
            assert proxy.dropped == 1 and answer.frame.meta["step"] == 0
            bodies = [body for path, body in backend.recorded[before:] if path.endswith("/steps")]
            assert bodies == [first.encode(), first.encode()]  # the server saw the step twice ...
            second = c.step(opened["session_id"], _step_frame(opened, key, step=1))
            assert second.frame.meta["step"] == 1  # ... and advanced once: step 1 is next, not 2
            c.close_session(opened["session_id"])
    finally:
        proxy.close()


def _refusing_server(status: bytes, body: bytes) -> _RawServer:
    return _RawServer(
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\nretry-after: 0\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )


def test_a_busy_server_is_asked_a_bounded_number_of_times_then_the_error_is_shown():
    busy = _refusing_server(
        b"503 Service Unavailable", b'{"error":"server_busy","detail":"the server has 256 steps queued"}'
    )
    with BackendClient(busy.url, "t") as c, pytest.raises(BackendRejected) as e:
        c.step("s", protocol.Frame(meta={"step": 0}))
    assert e.value.status == 503 and e.value.code == "server_busy" and e.value.retry_after_s == 0
    assert len(busy.conns) == STEP_ATTEMPTS  # retried, but not forever
    busy.close()


def test_a_full_step_queue_is_waited_out_but_a_refused_session_is_not():
    queue = _refusing_server(b"429 Too Many Requests", b'{"error":"too_many_steps","detail":"4 steps queued"}')
    with BackendClient(queue.url, "t") as c, pytest.raises(BackendRejected):
        c.step("s", protocol.Frame(meta={"step": 0}))
    assert len(queue.conns) == STEP_ATTEMPTS
    queue.close()
    gone = _refusing_server(b"404 Not Found", b'{"error":"session_not_found","detail":"no session s"}')
    with BackendClient(gone.url, "t") as c, pytest.raises(BackendRejected) as e:
        c.step("s", protocol.Frame(meta={"step": 0}))
    assert e.value.code == "session_not_found" and len(gone.conns) == 1
    gone.close()


# --- 10: no bearer token over plain http to another machine -------------------------------------------------------


def test_plain_http_to_another_host_is_refused_unless_insecure():
    for url in ("http://192.0.2.10:8470", "http://backend.example.org"):
        with pytest.raises(BackendInsecure, match="--insecure"):
            BackendClient(url, "hdt_secret")
        BackendClient(url, "hdt_secret", insecure=True).close()
    for url in ("http://127.0.0.1:8470", "http://localhost:1", "http://[::1]:8470", "https://backend.example.org"):
        BackendClient(url, "hdt_secret").close()


def test_cli_refuses_plain_http_before_loading_anything(tiny_model_dir, capsys):
    from hediff.desktop.cli import main

    argv = ["generate", "--server", "http://192.0.2.10:8470", "--accept-not-private", "--token", "t", "--model"]
    rc = main([*argv, "nowhere", "--prompt", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and "refusing to send the API token over plain http" in err and "Traceback" not in err


# --- 10: private output files ----------------------------------------------------------------------------------------


def _result(prompt: str = PROMPT) -> GenerationResult:
    image = Image.fromarray(np.full((16, 16, 3), 200, np.uint8))
    return GenerationResult(
        params=GenerationParams(prompt=prompt, negative_prompt="blurry"), image=image, latent=np.zeros(0)
    )


def test_pngs_are_private_and_the_sidecar_forgets_the_prompt_by_default(tmp_path):
    out = save_png_private(_result(), tmp_path / "cli" / "out.png", include_prompt=False)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and PROMPT.encode() not in out.read_bytes()

    g = Gallery(tmp_path / "gallery")
    forgotten = g.add(_result(), include_prompt_in_png=False)  # "remember prompt" is off by default
    sidecar = (tmp_path / "gallery" / f"{forgotten.id}.json").read_bytes()
    assert PROMPT.encode() not in sidecar and b"blurry" not in sidecar
    assert g.get(forgotten.id).params.prompt == ""
    remembered = g.add(_result(), include_prompt_in_png=False, remember_prompt=True)
    assert g.get(remembered.id).params.prompt == PROMPT
    exported = g.export(remembered.id, tmp_path / "export.png", include_prompt=False)
    for path in (forgotten.image_path, remembered.image_path, exported):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_cli_output_png_is_private(tiny_model_dir, tmp_path, capsys):
    from hediff.desktop.cli import main

    out = tmp_path / "out.png"
    args = ["generate", "--local-backend", "--model", str(tiny_model_dir), "--prompt", "a red circle"]
    rc = main(
        [*args, "--steps", "2", "--width", "32", "--height", "32", "--scheduler", "ddim", "--quiet", "--out", str(out)]
    )
    assert rc == 0, capsys.readouterr().err
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    with Image.open(out) as im:
        assert im.size == (32, 32)


# --- 10: scrypt parameters of a crafted key file -----------------------------------------------------------------


def test_crafted_scrypt_parameters_are_refused_before_any_derivation(tmp_path):
    secrets = SecretStore(MemoryKeyring())
    DeviceKeys(tmp_path, secrets, passphrase="pw", scrypt_n=2**12).get_or_create("fast")
    path = tmp_path / "keys" / "fast.hdkey"
    header = json.loads(path.read_text())
    for n, r, p in ((2**20, 8, 1), (2**17, 8, 16), (2**17, 32, 2)):  # minutes of work, or GiBs, each
        path.write_text(json.dumps({**header, "kdf": {**header["kdf"], "n": n, "r": r, "p": p}}))
        with pytest.raises(CorruptKeyFile, match="out of range"):
            DeviceKeys(tmp_path, secrets, passphrase="pw").load("fast")
    assert base64.b64decode(header["kdf"]["salt"])  # the file was real until edited
    # the default parameters themselves are inside the bounds
    DeviceKeys(tmp_path / "default", secrets, passphrase="pw").get_or_create("fast")
    assert DeviceKeys(tmp_path / "default", secrets, passphrase="pw").load("fast") is not None


def test_capped_reader_returns_normal_answers_whole(backend):
    # the JSON routes go through the capped reader too: an ordinary answer arrives whole and parses
    with BackendClient(backend.url, backend.token) as c:
        caps = c.capabilities()
    assert (
        caps["limits"]["max_request_bytes"]
        == httpx.get(backend.url + "/v1/capabilities", headers={"Authorization": f"Bearer {backend.token}"}).json()[
            "limits"
        ]["max_request_bytes"]
    )
