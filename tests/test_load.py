"""Many clients through one loopback backend: no error, no lost step, the same latents as one client alone; and
the session limits hold under a burst with clear 429s (never a crash). bench/load.py runs it as a benchmark."""

import httpx
import pytest

from bench import fuzz, load
from hediff.backend.app import create_app
from hediff.backend.auth import TokenStore
from hediff.backend.engine import Limits
from hediff.backend.serve import start_in_thread


@pytest.fixture(scope="module")
def crowd_backend(server_model):
    """A backend with one token per client, so the per-token limit is not what is being measured."""
    tokens = TokenStore()
    issued = [tokens.create(f"client-{i}", persist=False) for i in range(16)]
    running = start_in_thread(create_app(server_model, tokens, Limits(max_sessions=32)))
    yield running.url, issued
    running.stop()


def _run_crowd(client_model, url, tokens, n_clients, steps):
    params = [load.client_params(i, steps) for i in range(n_clients)]
    refs = load.reference_latents(client_model, url, tokens[0], params)
    runs = load.run_clients(client_model, url, tokens, params)
    assert load.check_runs(runs, refs) == []
    assert all(len(r.steps_seen) == r.total_steps == steps for r in runs)
    # equal seeds under load give equal images: bit for bit without HE
    plain = [r for r in runs if r.params.encryption == "none"]
    assert plain and all((r.latent == refs[r.params]).all() for r in plain)
    return runs


def test_sixteen_concurrent_clients_complete_with_every_step(client_model, crowd_backend):
    url, tokens = crowd_backend
    _run_crowd(client_model, url, tokens, 16, steps=3)
    assert httpx.get(url + "/v1/health").status_code == 200


@pytest.mark.slow
def test_sixteen_clients_longer_generations(client_model, crowd_backend):
    url, tokens = crowd_backend
    _run_crowd(client_model, url, tokens, 16, steps=12)


def test_session_limits_hold_under_a_burst(server_model):
    tokens, token = TokenStore.ephemeral()
    running = start_in_thread(create_app(server_model, tokens, Limits(max_sessions=6, max_sessions_per_token=4)))
    try:
        caps = httpx.get(running.url + "/v1/capabilities", headers={"Authorization": f"Bearer {token}"}).json()
        model = caps["model"]
        target = fuzz.Target(
            running.url, token, server_model.scheduler_config, model["cross_attention_dim"], model["weights_digest"]
        )
        frame = fuzz.open_frame(target, "full", "fast").encode()
        by_status, refused = load.session_burst(running.url, token, 12, frame)
        assert by_status == {201: 4, 429: 8}, by_status
        assert all(int(r["retry_after"]) >= 1 and "4 open sessions" in r["detail"] for r in refused), refused
        # the server-wide limit, reached with a second token
        other = tokens.create("other", persist=False)
        by_status, refused = load.session_burst(running.url, other, 2, frame)  # burst closes its own sessions
        assert by_status == {201: 2}
        with httpx.Client(base_url=running.url, headers={"Authorization": f"Bearer {token}"}) as c:
            held = [c.post("/v1/sessions", content=frame, headers=fuzz.FRAME) for _ in range(4)]
            assert [r.status_code for r in held] == [201] * 4
            by_status, refused = load.session_burst(running.url, other, 4, frame)
            assert by_status == {201: 2, 429: 2}, by_status
            assert all("maximum of 6 sessions" in r["detail"] and int(r["retry_after"]) >= 1 for r in refused)
            assert c.get("/v1/health").status_code == 200
    finally:
        running.stop()
