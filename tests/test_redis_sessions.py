"""Sessions written through to a real Redis: two servers sharing one store behave as one server.

This is what lets the Ray Serve backend lose or add a session replica mid-generation; here the two "replicas" are
two single-process servers on loopback with the same Redis, so the tests need no Ray cluster.
"""

from __future__ import annotations

import secrets
import time

import httpx
import numpy as np
import pytest
import redis

from bench.replay import RecordingASGI, step_answers
from hediff.backend.app import create_app
from hediff.backend.auth import TokenStore
from hediff.backend.engine import Limits
from hediff.backend.redis_sessions import RedisSessionStore, StepConflict
from hediff.backend.serve import start_in_thread
from hediff.common import protocol
from hediff.desktop.core.backend_client import BackendClient
from hediff.desktop.core.client_model import ClientModel
from hediff.desktop.core.engine import GenerationParams, Generator


def _store(redis_url, server_model, prefix, limits: Limits) -> RedisSessionStore:
    return RedisSessionStore(
        redis.Redis.from_url(redis_url),
        server_model,
        limits.session_ttl_s,
        limits.max_sessions,
        limits.max_sessions_per_token,
        prefix=prefix,
    )


@pytest.fixture
def two_servers(redis_url, server_model):
    """Two servers, one Redis (a fresh key prefix per test), one token file; yields (urls, token, stores)."""

    def start(**limits_kw):
        prefix = "t" + secrets.token_hex(4)
        limits = Limits(**limits_kw)
        tokens, token = TokenStore.ephemeral("tests")
        stores = [_store(redis_url, server_model, prefix, limits) for _ in range(2)]
        servers = [start_in_thread(create_app(server_model, tokens, limits, store)) for store in stores]
        started.extend(servers)
        return [s.url for s in servers], token, stores

    started: list = []
    yield start
    for s in started:
        s.stop()


def _record(server_model, tiny_model_dir, **kw):
    """A real generation at a single-process server (in-memory sessions), with every exchange recorded."""
    tokens, token = TokenStore.ephemeral("tests")
    recorder = RecordingASGI(create_app(server_model, tokens))
    running = start_in_thread(recorder)
    try:
        params = GenerationParams(
            prompt="a red circle", negative_prompt="blurry", steps=5, guidance=7.5, seed=3, width=32, height=32, **kw
        )
        with BackendClient(running.url, token) as client:
            Generator(ClientModel(tiny_model_dir, "conv_in"), client).generate(params)
    finally:
        running.stop()
    return list(recorder.exchanges)


@pytest.mark.parametrize(
    "kw",
    [
        dict(scheduler="plms", encryption="full"),
        dict(scheduler="dpmpp-2m", encryption="min-distortion", tau=0.1),
        dict(scheduler="euler-a", encryption="none", count=2),
    ],
    ids=["plms-full", "dpmpp-min-distortion", "euler-a-two-images"],
)
def test_steps_alternating_between_two_servers_answer_bit_identically(two_servers, server_model, tiny_model_dir, kw):
    recorded = _record(server_model, tiny_model_dir, **kw)
    (a, b), token, _ = two_servers()
    headers = {"Authorization": f"Bearer {token}", "content-type": protocol.FRAME_CONTENT_TYPE}
    answers = []
    with httpx.Client(headers=headers, timeout=60) as http:
        opened = http.post(f"{a}/v1/sessions", content=recorded[0].request)
        assert opened.status_code == 201
        sid = opened.json()["session_id"]
        steps = [e for e in recorded if e.path.endswith("/steps")]
        for i, e in enumerate(steps):  # PLMS and DPM++ steps use earlier noise predictions: the history moves too
            r = http.post(f"{(a, b)[i % 2]}/v1/sessions/{sid}/steps", content=e.request)
            assert r.status_code == 200, r.text
            answers.append(r.content)
        # a retry of the last step at the other server gets the stored answer, not a second update
        again = http.post(f"{(a, b)[len(steps) % 2]}/v1/sessions/{sid}/steps", content=steps[-1].request)
        assert again.content == answers[-1]
        assert http.delete(f"{b}/v1/sessions/{sid}").status_code == 204
        gone = http.post(f"{a}/v1/sessions/{sid}/steps", content=steps[0].request)
        assert gone.status_code == 404 and gone.json()["error"] == "session_not_found"
    for got, want in zip(answers, step_answers(recorded)):
        g, w = protocol.decode_frame(got), protocol.decode_frame(want)
        g.meta.pop("timings"), w.meta.pop("timings")
        assert g.meta == w.meta and g.blobs == w.blobs
        assert all(np.array_equal(g.tensors[k], w.tensors[k]) for k in w.tensors)


def test_session_limits_are_counted_in_the_store_not_per_server(two_servers, server_model, tiny_model_dir):
    recorded = _record(server_model, tiny_model_dir, scheduler="ddim", encryption="none")
    (a, b), token, stores = two_servers(max_sessions_per_token=2, max_sessions=3)
    headers = {"Authorization": f"Bearer {token}", "content-type": protocol.FRAME_CONTENT_TYPE}
    with httpx.Client(headers=headers, timeout=60) as http:
        assert http.post(f"{a}/v1/sessions", content=recorded[0].request).status_code == 201
        assert http.post(f"{b}/v1/sessions", content=recorded[0].request).status_code == 201
        third = http.post(f"{a}/v1/sessions", content=recorded[0].request)
        assert third.status_code == 429 and third.json()["error"] == "too_many_sessions"
        assert "2 open sessions" in third.json()["detail"] and int(third.headers["retry-after"]) >= 1
    assert stores[0].count() == stores[1].count() == 2


def test_an_idle_session_expires_for_every_server(two_servers, server_model, tiny_model_dir):
    recorded = _record(server_model, tiny_model_dir, scheduler="ddim", encryption="none")
    (a, b), token, _ = two_servers(session_ttl_s=0.5)
    headers = {"Authorization": f"Bearer {token}", "content-type": protocol.FRAME_CONTENT_TYPE}
    step = next(e for e in recorded if e.path.endswith("/steps"))
    with httpx.Client(headers=headers, timeout=60) as http:
        sid = http.post(f"{a}/v1/sessions", content=recorded[0].request).json()["session_id"]
        assert http.post(f"{b}/v1/sessions/{sid}/steps", content=step.request).status_code == 200
        time.sleep(0.8)
        late = http.post(f"{a}/v1/sessions/{sid}/steps", content=step.request)
    assert late.status_code == 410 and late.json()["error"] == "session_expired"


def test_two_replicas_committing_the_same_step_conflict_and_a_revoked_token_closes_everywhere(
    two_servers, server_model, tiny_model_dir
):
    recorded = _record(server_model, tiny_model_dir, scheduler="ddim", encryption="none")
    (a, _b), token, (first, second) = two_servers()
    headers = {"Authorization": f"Bearer {token}", "content-type": protocol.FRAME_CONTENT_TYPE}
    with httpx.Client(headers=headers, timeout=60) as http:
        sid = http.post(f"{a}/v1/sessions", content=recorded[0].request).json()["session_id"]
    token_id = _token_id(first, sid)
    one, other = first.get(sid, token_id), second.get(sid, token_id)
    assert one is not other and one.next_step == other.next_step == 0
    one.next_step = other.next_step = 1
    first.commit(one)
    with pytest.raises(StepConflict, match="moved on"):
        second.commit(other)
    assert second.get(sid, token_id).next_step == 1  # the loser reloads what the winner wrote
    assert second.close_token(token_id) == 1
    with pytest.raises(Exception, match="no session"):
        first.get(sid, token_id)


def _token_id(store: RedisSessionStore, sid: str) -> str:
    return store.client.hget(store.key("s", sid), "token").decode()
