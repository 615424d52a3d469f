"""Hostile input: schemathesis against the OpenAPI document and mutated binary frames against live sessions.

The fuzzers live in bench/fuzz.py; `python -m bench.fuzz` runs the full 10,000-request version against a served
process. Here: a few hundred requests against the loopback backend, the bugs fuzzing found, and the slow full run.
"""

import logging

import httpx
import numpy as np
import pytest

from bench import fuzz
from hediff.backend.app import create_app
from hediff.backend.auth import TokenStore
from hediff.backend.serve import start_in_thread
from hediff.common import protocol


@pytest.fixture(scope="module")
def target(backend, server_model):
    return fuzz.Target(
        backend.url,
        backend.token,
        server_model.scheduler_config,
        server_model.cross_attention_dim,
        server_model.weights_digest,
    )


def _assert_clean(tally: fuzz.Tally, backend) -> None:
    assert tally.failures == [], tally.failures[:10]
    assert not any(status.startswith("5") for status in tally.by_status), tally.by_status
    assert httpx.get(backend.url + "/v1/health").json()["status"] == "ok"


def test_openapi_fuzzing_gets_no_5xx(target, backend):
    tally = fuzz.Tally()
    fuzz.fuzz_openapi(target, n_per_operation=15, seed=1, tally=tally)
    _assert_clean(tally, backend)
    # every route was exercised, and both refusals and successes came back
    assert {"200", "401", "404"} <= set(tally.by_status), tally.by_status
    assert tally.requests >= 30


def test_mutated_frames_get_4xx_and_change_no_session(target, backend):
    tally = fuzz.Tally()
    fuzz.fuzz_frames(target, 150, seed=2, tally=tally, check_every=25)
    _assert_clean(tally, backend)
    assert tally.requests == 150
    assert tally.by_status["400"] > 80, tally.by_status
    assert tally.state_checks >= 3  # each: the session's next valid step still answered correctly after garbage


@pytest.mark.parametrize(
    "header",
    [b"[" * 100_000 + b"]" * 100_000, b'{"meta":{"step":' + b"9" * 5000 + b'},"blobs":[]}'],
    ids=["deeply-nested", "5000-digit-int"],
)
def test_headers_that_crashed_the_decoder_are_protocol_errors(header):
    # found by fuzzing: RecursionError and int-conversion ValueError escaped decode_frame as HTTP 500
    with pytest.raises(protocol.ProtocolError, match="nests JSON too deeply|unreadable value"):
        protocol.decode_frame(fuzz.join_frame(header, []))


def test_frame_helpers_round_trip():
    frame = protocol.Frame(meta={"step": 1}, tensors={"a": np.arange(6, dtype=np.float32)}, blobs={"ct0": b"xyz"})
    data = frame.encode()
    header, payloads = fuzz.split_frame(data)
    assert fuzz.join_frame(header, payloads) == data
    assert payloads == [np.arange(6, dtype=np.float32).tobytes(), b"xyz"]


class _FailingModel:
    """A model whose capabilities raise with request-like text: the failure must not reach the log or the client."""

    model_id = "failing"

    def capabilities(self, limits):
        raise RuntimeError("prompt text that must not be logged")

    def run(self, call):
        raise RuntimeError("prompt text that must not be logged")


def test_unexpected_exception_is_a_500_answer_logged_by_type_and_keeps_the_connection(caplog, capfd):
    tokens, token = TokenStore.ephemeral()
    running = start_in_thread(create_app(_FailingModel(), tokens))
    try:
        with caplog.at_level(logging.DEBUG), httpx.Client(base_url=running.url) as c:
            r = c.get("/v1/capabilities", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 500 and r.json()["error"] == "internal_error"
            # the same keep-alive connection still serves the next request
            assert c.get("/v1/health").status_code == 200
    finally:
        running.stop()
    printed = capfd.readouterr()
    assert "RuntimeError" in caplog.text
    for text in (caplog.text, printed.out, printed.err):  # uvicorn's own loggers print instead of propagating
        assert "must not be logged" not in text and "Traceback" not in text


@pytest.mark.slow
def test_ten_thousand_hostile_requests(target, backend):
    tally = fuzz.run(target, 10_000, seed=0)
    _assert_clean(tally, backend)
    assert tally.requests >= 10_000
