"""Generation sessions held by the backend: settings, plan, HE context, history, expiry."""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hediff.common.he import EvaluationContext
from hediff.common.protocol import SessionSettings
from hediff.common.schedulers import AffinePlan


class SessionError(Exception):
    """A request about a session that cannot be served; ``code`` is its snake_case error code on the wire."""

    status = 400
    code = "bad_request"


class SessionNotFound(SessionError):
    status = 404
    code = "session_not_found"


class SessionExpired(SessionError):
    status = 410
    code = "session_expired"


class TooManySessions(SessionError):
    status = 429
    code = "too_many_sessions"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Session:
    id: str
    token_id: str
    settings: SessionSettings
    plan: AffinePlan
    context: EvaluationContext | None
    embeddings: Any  # numpy (guidance branches, tokens, dim), as the client sent them
    latent_shape: tuple[int, ...]
    activation_shapes: dict[str, tuple[int, ...]]
    created: float
    last_used: float
    next_step: int = 0
    eps_history: dict[int, Any] = field(default_factory=dict)  # step -> guided noise prediction (float64)
    latents: dict[int, Any] = field(default_factory=dict)  # step -> EncryptedLatent or plaintext array
    last_response: tuple[int, bytes] | None = None
    max_step_bytes: int = 0  # the largest step request this session can need; larger bodies are refused unread
    context_bytes: bytes | None = None  # the HE context as sent, for a store that keeps sessions outside the process
    added_cond: dict[str, Any] | None = None  # SDXL: text_embeds and time_ids per batch row (numpy)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def finished(self) -> bool:
        return self.next_step >= len(self.plan.steps)

    def forget_old(self) -> None:
        """Drop history no later step can reference."""
        keep_eps = self.plan.eps_history_needed()
        keep_lat = self.plan.latent_history_needed()
        for k in [k for k in self.eps_history if k < self.next_step - keep_eps]:
            del self.eps_history[k]
        for k in [k for k in self.latents if k < self.next_step - keep_lat]:
            del self.latents[k]


def new_session_id() -> str:
    return secrets.token_urlsafe(16)


class SessionStore:
    def __init__(
        self, ttl_s: float, max_sessions: int, max_per_token: int, clock: Callable[[], float] = time.monotonic
    ):
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.max_per_token = max_per_token
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._expired: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, token_id: str, session_id: str | None = None, **fields) -> Session:
        with self._lock:
            self._purge_locked()
            if len(self._sessions) >= self.max_sessions:
                raise TooManySessions(
                    f"the server holds its maximum of {self.max_sessions} sessions; try again later",
                    self._retry_after_locked(self._sessions.values()),
                )
            own = [s for s in self._sessions.values() if s.token_id == token_id]
            if len(own) >= self.max_per_token:
                raise TooManySessions(
                    f"this token already has {self.max_per_token} open sessions; close one (DELETE) or wait for expiry",
                    self._retry_after_locked(own),
                )
            now = self.clock()
            session_id = session_id or new_session_id()
            if session_id in self._sessions or session_id in self._expired:
                raise SessionError("session id already in use")
            session = Session(id=session_id, token_id=token_id, created=now, last_used=now, **fields)
            self._sessions[session.id] = session
            return session

    def get(self, session_id: str, token_id: str) -> Session:
        with self._lock:
            self._purge_locked()
            session = self._sessions.get(session_id)
            if session is None or session.token_id != token_id:
                if session_id in self._expired:
                    raise SessionExpired(f"session {session_id} expired after {self.ttl_s:.0f} s without a step")
                raise SessionNotFound(f"no session {session_id} for this token")
            session.last_used = self.clock()
            return session

    def commit(self, session: Session) -> None:
        """A step changed ``session``: this store holds it in memory, so there is nothing to write."""

    def close(self, session_id: str, token_id: str) -> None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.token_id != token_id:
                raise SessionNotFound(f"no session {session_id} for this token")
            del self._sessions[session_id]

    def close_token(self, token_id: str) -> int:
        """Close every session of this token (it was revoked); returns how many."""
        with self._lock:
            doomed = [sid for sid, s in self._sessions.items() if s.token_id == token_id]
            for sid in doomed:
                del self._sessions[sid]
            return len(doomed)

    def count(self) -> int:
        with self._lock:
            self._purge_locked()
            return len(self._sessions)

    def _retry_after_locked(self, holding) -> int:
        """Whole seconds until the first of these sessions would expire if left idle (the earliest a slot frees)."""
        now = self.clock()
        first = min((s.last_used + self.ttl_s - now for s in holding), default=self.ttl_s)
        return max(1, math.ceil(first))

    def _purge_locked(self) -> None:
        now = self.clock()
        for sid in [sid for sid, s in self._sessions.items() if now - s.last_used > self.ttl_s]:
            del self._sessions[sid]
            self._expired[sid] = now
        # remember expired ids for a while so clients get "expired" rather than "not found"
        for sid in [sid for sid, t in self._expired.items() if now - t > 10 * self.ttl_s]:
            del self._expired[sid]
