"""Sessions written through to Redis, so that any replica of a scaled-out session tier can take any session's next
step: a lost or added replica costs at most the step in flight, which the client retries.

Redis holds every session as bytes (the protocol's own frame encoding): its settings, embeddings and HE context
(written once, at open) and its state after each step (history, next step, the last answer for a retried step).
Limits per token and in total are counted in Redis, not per replica. A replica keeps the sessions it has loaded
(with their parsed HE context) and reloads one only when Redis holds a newer step than its copy.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import numpy as np

from hediff.backend.sessions import (
    Session,
    SessionError,
    SessionExpired,
    SessionNotFound,
    TooManySessions,
    new_session_id,
)
from hediff.common import he, protocol
from hediff.common.latent import EncryptedLatent, pack_mask, unpack_mask
from hediff.common.protocol import Frame, SessionSettings


class StepConflict(SessionError):
    """Another replica committed this session's step first (a retry raced the original)."""

    status = 409
    code = "step_out_of_order"


class StoreUnavailable(SessionError):
    status = 503
    code = "store_unavailable"

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


# KEYS: all-sessions zset, token zset, session hash, known marker
# ARGV: sid, ttl_ms, max_all, max_token, token_id, static, state, next_step, max_step_bytes
_OPEN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('EXISTS', KEYS[4]) == 1 then return {-3, 0} end
local function wait(key)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] then return tonumber(first[2]) - now end
  return ttl
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return {-1, wait(KEYS[1])} end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return {-2, wait(KEYS[2])} end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('HSET', KEYS[3], 'token', ARGV[5], 'static', ARGV[6], 'state', ARGV[7], 'next_step', ARGV[8],
  'max_step_bytes', ARGV[9])
redis.call('PEXPIRE', KEYS[3], ttl)
redis.call('SET', KEYS[4], '1', 'PX', 10 * ttl)
return {1, 0}
"""

# KEYS: all zset, token zset, session hash, known marker; ARGV: sid, ttl_ms, token_id
# -> next_step, or -1 (no such session for this token), -2 (expired)
_TOUCH = """
local tok = redis.call('HGET', KEYS[3], 'token')
if tok ~= ARGV[3] then
  if (not tok) and redis.call('EXISTS', KEYS[4]) == 1 then return -2 end
  return -1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('PEXPIRE', KEYS[3], ttl)
redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[1])
redis.call('ZADD', KEYS[2], 'XX', now + ttl, ARGV[1])
return tonumber(redis.call('HGET', KEYS[3], 'next_step'))
"""

# KEYS: session hash; ARGV: expected next_step, new next_step, state, ttl_ms -> 1 written, 0 conflict, -1 gone
_COMMIT = """
local cur = redis.call('HGET', KEYS[1], 'next_step')
if not cur then return -1 end
if cur ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'next_step', ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
return 1
"""


def encode_static(session: Session) -> bytes:
    """What never changes after open: settings, shapes, embeddings, HE context."""
    frame = Frame(
        meta={
            "settings": session.settings.to_meta(),
            "latent_shape": list(session.latent_shape),
            "activation_shapes": {k: list(v) for k, v in session.activation_shapes.items()},
            "max_step_bytes": session.max_step_bytes,
            "created": session.created,
        },
        tensors={"embeddings": np.asarray(session.embeddings)},
    )
    if session.context_bytes is not None:
        frame.blobs["context"] = session.context_bytes
    for name, rows in (session.added_cond or {}).items():
        frame.tensors[f"added.{name}"] = np.asarray(rows)
    return frame.encode()


def encode_state(session: Session) -> bytes:
    """What a step changes: the history later steps use, the next step, the last answer (for a retry)."""
    frame = Frame(meta={"next_step": session.next_step, "eps": sorted(session.eps_history), "latents": []})
    for k, eps in session.eps_history.items():
        frame.tensors[f"eps{k}"] = np.asarray(eps)
    for k, latent in sorted(session.latents.items()):
        if isinstance(latent, EncryptedLatent):
            frame.meta["latents"].append(
                {"step": k, "encrypted": True, "n_ct": len(latent.ciphertexts), "masked": latent.mask is not None}
            )
            for i, ct in enumerate(latent.ciphertexts):
                frame.blobs[f"lat{k}.ct{i}"] = ct.serialize()
            if latent.mask is not None:
                frame.tensors[f"lat{k}.mask"] = pack_mask(latent.mask)
                frame.tensors[f"lat{k}.rem"] = latent.remainder
        else:
            frame.meta["latents"].append({"step": k, "encrypted": False})
            frame.tensors[f"lat{k}"] = np.asarray(latent)
    if session.last_response is not None:
        frame.meta["last_response_step"] = session.last_response[0]
        frame.blobs["last_response"] = session.last_response[1]
    return frame.encode()


def _decode(data: bytes) -> Frame:
    return protocol.decode_frame(data, max_bytes=len(data))


class RedisSessionStore:
    """The session store of a scaled-out backend; the same interface as ``SessionStore``."""

    def __init__(
        self,
        client,
        model,
        ttl_s: float,
        max_sessions: int,
        max_per_token: int,
        prefix: str = "hediff",
    ):
        self.client = client
        self.model = model  # ModelFacts: rebuilds a loaded session's plan
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.max_per_token = max_per_token
        self.prefix = prefix
        self._open = client.register_script(_OPEN)
        self._touch = client.register_script(_TOUCH)
        self._commit = client.register_script(_COMMIT)
        self._cache: dict[str, Session] = {}
        self._stored_step: dict[str, int] = {}  # the next_step Redis held when this replica last read or wrote it
        self._lock = threading.Lock()
        self._timing = threading.local()
        self.clock: Callable[[], float] = time.monotonic

    # key layout: one owner
    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _keys(self, session_id: str, token_id: str) -> list[str]:
        return [self.key("all"), self.key("token", token_id), self.key("s", session_id), self.key("known", session_id)]

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))

    def _call(self, fn, *args, **kwargs):
        import redis

        try:
            return fn(*args, **kwargs)
        except redis.RedisError as e:
            raise StoreUnavailable(f"the session store is unreachable ({type(e).__name__}); retry shortly") from None

    def add(self, token_id: str, session_id: str | None = None, **fields) -> Session:
        now = self.clock()
        session = Session(id=session_id or new_session_id(), token_id=token_id, created=now, last_used=now, **fields)
        keys = self._keys(session.id, token_id)
        args = [session.id, self._ttl_ms, self.max_sessions, self.max_per_token, token_id]
        args += [encode_static(session), encode_state(session), session.next_step, session.max_step_bytes]
        status, wait_ms = self._call(self._open, keys=keys, args=args)
        retry = max(1, math.ceil(int(wait_ms) / 1000))
        if status == -1:
            raise TooManySessions(
                f"the server holds its maximum of {self.max_sessions} sessions; try again later", retry
            )
        if status == -2:
            raise TooManySessions(
                f"this token already has {self.max_per_token} open sessions; close one (DELETE) or wait for expiry",
                retry,
            )
        if status == -3:
            raise SessionError("session id already in use")
        with self._lock:
            self._cache[session.id] = session
            self._stored_step[session.id] = session.next_step
        return session

    def get(self, session_id: str, token_id: str) -> Session:
        stored = self._touch_session(session_id, token_id)
        with self._lock:
            self._evict_idle_locked()
            cached = self._cache.get(session_id)
            if cached is not None and cached.token_id == token_id and self._stored_step.get(session_id) == stored:
                cached.last_used = self.clock()
                return cached
        session = self._load(session_id, token_id)
        with self._lock:
            self._cache[session_id] = session
            self._stored_step[session_id] = session.next_step
        return session

    def _touch_session(self, session_id: str, token_id: str) -> int:
        """Keep the session alive; its stored next step, or the error for a missing or expired one."""
        keys = self._keys(session_id, token_id)
        stored = int(self._call(self._touch, keys=keys, args=[session_id, self._ttl_ms, token_id]))
        if stored < 0:
            self._forget(session_id)
            if stored == -2:
                raise SessionExpired(f"session {session_id} expired after {self.ttl_s:.0f} s without a step")
            raise SessionNotFound(f"no session {session_id} for this token")
        return stored

    def step_limit(self, session_id: str, token_id: str) -> int:
        """The largest step body of this session, without loading it (what an ingress checks before reading)."""
        self._touch_session(session_id, token_id)
        limit = self._call(self.client.hget, self.key("s", session_id), "max_step_bytes")
        if limit is None:
            raise SessionNotFound(f"no session {session_id} for this token")
        return int(limit)

    def last_commit_s(self) -> float:
        """Seconds this thread's latest commit took (0 if it made none since the last call)."""
        seconds, self._timing.commit_s = getattr(self._timing, "commit_s", 0.0), 0.0
        return seconds

    def commit(self, session: Session) -> None:
        t0 = time.perf_counter()
        try:
            self._commit_session(session)
        finally:
            self._timing.commit_s = time.perf_counter() - t0

    def _commit_session(self, session: Session) -> None:
        with self._lock:
            expected = self._stored_step.get(session.id)
        try:
            written = int(
                self._call(
                    self._commit,
                    keys=[self.key("s", session.id)],
                    args=[expected, session.next_step, encode_state(session), self._ttl_ms],
                )
            )
        except StoreUnavailable:
            self._forget(session.id)  # this copy is ahead of the store: reload it next time
            raise
        if written != 1:
            self._forget(session.id)
            if written == 0:
                raise StepConflict(f"session {session.id} moved on while this step ran; retry the step")
            raise SessionNotFound(f"session {session.id} was closed while this step ran")
        if session.finished:  # only a retry of the last step can come now, and Redis has its answer
            self._forget(session.id)
            return
        with self._lock:
            self._stored_step[session.id] = session.next_step

    def close(self, session_id: str, token_id: str) -> None:
        keys = self._keys(session_id, token_id)
        owner = self._call(self.client.hget, keys[2], "token")
        if owner is None or owner.decode() != token_id:
            raise SessionNotFound(f"no session {session_id} for this token")
        self._delete(token_id, [session_id])

    def close_token(self, token_id: str) -> int:
        ids = [m.decode() for m in self._call(self.client.zrange, self.key("token", token_id), 0, -1)]
        self._delete(token_id, ids)
        return len(ids)

    def count(self) -> int:
        now_ms = int(time.time() * 1000)
        self._call(self.client.zremrangebyscore, self.key("all"), "-inf", now_ms)
        return int(self._call(self.client.zcard, self.key("all")))

    def _delete(self, token_id: str, session_ids: list[str]) -> None:
        if not session_ids:
            return
        pipe = self.client.pipeline()
        for sid in session_ids:
            pipe.delete(self.key("s", sid), self.key("known", sid))
            pipe.zrem(self.key("all"), sid)
            pipe.zrem(self.key("token", token_id), sid)
        self._call(pipe.execute)
        for sid in session_ids:
            self._forget(sid)

    def cached(self) -> int:
        """Sessions this replica holds in memory."""
        with self._lock:
            return len(self._cache)

    def _evict_idle_locked(self) -> None:
        # a session closed elsewhere, or abandoned, leaves this replica's memory after one idle TTL
        horizon = self.clock() - self.ttl_s
        for sid in [sid for sid, s in self._cache.items() if s.last_used < horizon]:
            del self._cache[sid]
            self._stored_step.pop(sid, None)

    def _forget(self, session_id: str) -> None:
        with self._lock:
            self._cache.pop(session_id, None)
            self._stored_step.pop(session_id, None)

    def _load(self, session_id: str, token_id: str) -> Session:
        static, state = self._call(self.client.hmget, self.key("s", session_id), "static", "state")
        if static is None or state is None:
            raise SessionNotFound(f"no session {session_id} for this token")
        s, d = _decode(static), _decode(state)
        settings = SessionSettings.from_meta(s.meta["settings"])
        context_bytes = s.blobs.get("context")
        context = he.EvaluationContext(context_bytes, settings.he_preset) if context_bytes is not None else None
        now = self.clock()
        session = Session(
            id=session_id,
            token_id=token_id,
            settings=settings,
            plan=self.model.plan(settings.scheduler, settings.steps),
            context=context,
            embeddings=s.tensors["embeddings"],
            latent_shape=tuple(s.meta["latent_shape"]),
            activation_shapes={k: tuple(v) for k, v in s.meta["activation_shapes"].items()},
            created=float(s.meta["created"]),
            last_used=now,
            max_step_bytes=int(s.meta["max_step_bytes"]),
            context_bytes=context_bytes,
            next_step=int(d.meta["next_step"]),
            added_cond={k.split(".", 1)[1]: v for k, v in s.tensors.items() if k.startswith("added.")} or None,
        )
        session.eps_history = {int(k): d.tensors[f"eps{k}"] for k in d.meta["eps"]}
        for entry in d.meta["latents"]:
            k = int(entry["step"])
            if not entry["encrypted"]:
                session.latents[k] = d.tensors[f"lat{k}"]
                continue
            mask = unpack_mask(d.tensors[f"lat{k}.mask"], session.latent_shape) if entry["masked"] else None
            session.latents[k] = EncryptedLatent(
                shape=session.latent_shape,
                mask=mask,
                ciphertexts=context.load([d.blobs[f"lat{k}.ct{i}"] for i in range(int(entry["n_ct"]))]),
                remainder=d.tensors[f"lat{k}.rem"] if entry["masked"] else np.zeros(0),
            )
        if "last_response" in d.blobs:
            session.last_response = (int(d.meta["last_response_step"]), d.blobs["last_response"])
        return session
