"""Record a real generation's requests and answers at a backend, and send the same requests again to any backend.

Replaying exact requests makes backends comparable answer for answer (same inputs, so any difference is the
server's), and makes a light load generator: a replaying client spends no CPU on the model or on HE.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

from hediff.common import protocol


@dataclass(frozen=True)
class Exchange:
    path: str
    request: bytes
    status: int
    answer: bytes


class RecordingASGI:
    """Wraps an ASGI app and keeps every POST it handled as an ``Exchange``."""

    def __init__(self, app):
        self.app, self.exchanges = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        request, answer, status = [], [], []

        async def recording_receive():
            message = await receive()
            if message["type"] == "http.request":
                request.append(message.get("body", b""))
            return message

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif message["type"] == "http.response.body":
                answer.append(message.get("body", b""))
            await send(message)

        await self.app(scope, recording_receive, recording_send)
        self.exchanges.append(Exchange(scope["path"], b"".join(request), status[0], b"".join(answer)))


def step_answers(exchanges: list[Exchange]) -> list[bytes]:
    return [e.answer for e in exchanges if e.path.endswith("/steps")]


def replay(
    url: str, token: str, exchanges: list[Exchange], latencies: list[float] | None = None, verify=True
) -> list[bytes]:
    """Open a new session with the recorded request and send the recorded steps in order; returns the answers
    (and appends each step's round-trip seconds to ``latencies``). Any refusal is an AssertionError. ``verify``:
    httpx's TLS verification (an ``ssl.SSLContext`` for a private CA)."""
    headers = {"Authorization": f"Bearer {token}", "content-type": protocol.FRAME_CONTENT_TYPE}
    answers = []
    with httpx.Client(base_url=url, headers=headers, timeout=300, verify=verify) as http:
        session_id = None
        for e in exchanges:
            if e.path == "/v1/sessions":
                r = http.post("/v1/sessions", content=e.request)
                assert r.status_code == e.status == 201, r.text
                session_id = r.json()["session_id"]
                continue
            t0 = time.perf_counter()
            r = http.post(f"/v1/sessions/{session_id}/steps", content=e.request)
            if latencies is not None:
                latencies.append(time.perf_counter() - t0)
            assert r.status_code == e.status == 200, r.text
            answers.append(r.content)
        http.delete(f"/v1/sessions/{session_id}")
    return answers
