"""The client's step strategies (desktop.core.step_strategies): chosen by the split's family, swappable in one
place, and what they make of a server answer they cannot use. Their numerical parity with diffusers is checked
end to end in test_e2e.py and test_ushape.py."""

from __future__ import annotations

import numpy as np
import pytest

from hediff.backend.serve import start_in_thread
from hediff.common import protocol, split
from hediff.desktop.core.backend_client import BackendClient, BackendProtocolError
from hediff.desktop.core.client_model import ClientModel
from hediff.desktop.core.engine import GenerationParams, Generator
from hediff.desktop.core.step_strategies import (
    STRATEGIES,
    PlaintextLatentSteps,
    StepRequest,
    UShapedSteps,
    strategy_for,
)


def _params(**kw) -> GenerationParams:
    base = dict(prompt="a red square", negative_prompt="blurry", steps=3, seed=3, encryption="none")
    return GenerationParams(**{**base, **kw})


@pytest.mark.parametrize(
    ("split_name", "expected"),
    [(name, PlaintextLatentSteps) for name in split.PAPER_SPLITS] + [(name, UShapedSteps) for name in split.U_SPLITS],
)
def test_the_splits_family_picks_the_strategy(client_model, split_name, expected):
    strategy = strategy_for(client_model, _params(split=split_name), key=None)
    assert type(strategy) is expected
    assert strategy.key is None  # nothing is encrypted with encryption=none


def test_a_family_without_a_strategy_is_named(client_model, monkeypatch):
    monkeypatch.delitem(STRATEGIES, split.U_SHAPED_FAMILY)
    with pytest.raises(ValueError, match="no client step strategy for split 'u1' \\(family 'u-shaped'\\)"):
        strategy_for(client_model, _params(split="u1"), key=None)


def test_a_registered_strategy_is_what_generate_runs_and_what_the_server_receives(generator, backend, monkeypatch):
    class RecordingSteps(PlaintextLatentSteps):
        def __init__(self, model, params):
            super().__init__(model, params)
            self.requests: list[bytes] = []

        def request(self, step, history, timings) -> StepRequest:
            request = super().request(step, history, timings)
            self.requests.append(request.frame.encode())
            return request

    made: list[RecordingSteps] = []

    def recording_steps(model, params, key):
        made.append(RecordingSteps(model, params))
        return made[-1]

    baseline = generator.generate(_params())
    monkeypatch.setitem(STRATEGIES, split.PAPER_FAMILY, recording_steps)
    backend.recorded.clear()
    result = generator.generate(_params())

    assert len(made) == 1
    sent = [body for path, body in backend.recorded if path.endswith("/steps")]
    assert len(sent) == len(result.step_timings) >= 3 and sent == made[0].requests
    assert np.array_equal(result.latent, baseline.latent)  # plaintext is deterministic: bit for bit


class _AnswersForAnotherStep:
    """The real backend app, except that every step answer claims to be for step 99."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].endswith("/steps"):
            return await self.app(scope, receive, send)
        start: dict = {}
        body = bytearray()

        async def relabelling_send(message):
            if message["type"] == "http.response.start":
                start.update(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body", False):
                return
            data = bytes(body)
            if start["status"] == 200:
                frame = protocol.decode_frame(data)
                frame.meta["step"] = 99
                data = frame.encode()
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data})

        return await self.app(scope, receive, relabelling_send)


@pytest.mark.parametrize(("split_name", "encryption"), [("conv_in", "none"), ("conv_in", "full"), ("u1", "none")])
def test_an_answer_for_another_step_is_refused_naming_the_server(
    tiny_model_dir, client_model, backend, split_name, encryption
):
    model = client_model if split_name == client_model.split else ClientModel(tiny_model_dir, split_name)
    store = backend.app.state.engine.store
    open_before = store.count()
    running = start_in_thread(_AnswersForAnotherStep(backend.app))
    try:
        with BackendClient(running.url, backend.token) as client:
            with pytest.raises(BackendProtocolError) as raised:
                Generator(model, client).generate(_params(split=split_name, encryption=encryption))
    finally:
        running.stop()
    assert str(raised.value) == f"{running.url} sent an unusable step answer: answer is for step 99, expected 0"
    assert store.count() == open_before  # the session was closed
