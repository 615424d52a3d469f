"""HTTP routes: auth, size limits, upload budget, error mapping. The work itself is in backend.engine.

Nothing on the event loop waits for the model: health, capabilities and closing a session answer at once; steps
wait in ``FairScheduler``'s per-token queues for its model workers; opening a session (parsing an HE context)
runs in the thread pool, which model work never occupies.
"""

from __future__ import annotations

import contextlib
import logging
import threading

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from hediff.backend.auth import TokenStore
from hediff.backend.budget import InflightBudget
from hediff.backend.cooldown import FailureCooldown
from hediff.backend.engine import Engine, Limits, ServerModel
from hediff.backend.scheduler import FairScheduler, QueueRefused
from hediff.backend.sessions import SessionError, SessionStore
from hediff.common import protocol
from hediff.common.he import HEError

log = logging.getLogger("hediff.backend")

QUEUE_POSITION_HEADER = "X-Queue-Position"  # steps that were queued ahead of this one when it arrived


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


class Health(BaseModel):
    status: str
    protocol_version: int


class SessionOpened(BaseModel):
    session_id: str
    timesteps: list[float]
    plan_digest: str
    latent_shape: list[int]
    activation_shapes: dict[str, list[int]]
    expires_after_idle_s: float


class ErrorBody(BaseModel):
    error: str
    detail: str


FRAME_BODY = {
    "requestBody": {
        "required": True,
        "content": {protocol.FRAME_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    }
}
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 408, 409, 410, 413, 415, 429, 503)}


class ContainFailures:
    """The last line of defence: an unexpected exception becomes a 500 JSON answer, logged by its type only.

    Not an exception handler: Starlette re-raises after running a handler for Exception, so uvicorn would log the
    traceback (whose text can carry request data) and drop the keep-alive connection under the client.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - any failure must become an answer, never a dead connection
            log.error("internal error while handling a request: %s", type(exc).__name__)
            if not started:
                body = JSONResponse(
                    {"error": "internal_error", "detail": "the backend failed; see its log"}, status_code=500
                )
                await body(scope, receive, send)


@contextlib.contextmanager
def as_api_errors():
    """The one mapping from the engine's, session store's and scheduler's exceptions to wire errors."""
    try:
        yield
    except ApiError:
        raise
    except (SessionError, QueueRefused) as e:
        retry_after = getattr(e, "retry_after_s", None)  # too many sessions or steps, a store that is away
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        raise ApiError(e.status, e.code, str(e), headers) from None
    except (protocol.ProtocolError, HEError) as e:
        raise ApiError(400, "bad_request", str(e)) from None


class HeldBytes:
    """The request bytes one request holds against the server's in-flight budget, released when it is answered.

    A body counts twice: the raw bytes and the decoded frame coexist while it is parsed.
    """

    COPIES = 2

    def __init__(self, budget: InflightBudget, token_id: str):
        self.budget, self.token_id, self.n = budget, token_id, 0

    def add(self, n: int) -> None:
        if not self.budget.try_reserve(self.COPIES * n, self.token_id):
            raise ApiError(
                429,
                "upload_budget_full",
                f"the server holds its maximum of request bytes in flight ({self.budget.max_bytes} in all, "
                f"{self.budget.max_bytes_per_owner} per token); retry shortly",
                {"Retry-After": "1"},
            )
        self.n += self.COPIES * n

    def release(self) -> None:
        self.budget.release(self.n, self.token_id)
        self.n = 0


def _watch_tokens(tokens: TokenStore, stop: threading.Event) -> None:
    while not stop.wait(tokens.reload_interval_s):
        try:
            tokens.reload_if_changed()
        except Exception as e:  # noqa: BLE001 - the watcher must outlive one bad read
            log.error("token file check failed: %s", type(e).__name__)


class LocalBackend:
    """The single-process backend behind the routes: the engine, its fair scheduler and the session store here."""

    def __init__(self, model: ServerModel, limits: Limits, store: SessionStore | None = None):
        store = store or SessionStore(limits.session_ttl_s, limits.max_sessions, limits.max_sessions_per_token)
        self.engine = Engine(model, limits, store)
        self.scheduler = FairScheduler(limits.model_workers, limits.max_steps_per_token, limits.max_queued_steps)

    async def capabilities(self) -> dict:
        return self.engine.model.capabilities(self.engine.limits)

    async def open_session(self, token_id: str, frame: protocol.Frame) -> dict:
        return await run_in_threadpool(self.engine.open_session, token_id, frame)

    async def step_limit(self, token_id: str, session_id: str) -> int:
        return self.engine.store.get(session_id, token_id).max_step_bytes

    async def step(self, token_id: str, session_id: str, frame: protocol.Frame) -> tuple[bytes, int]:
        session = self.engine.store.get(session_id, token_id)
        return await self.scheduler.run(token_id, self.engine.step, session, frame)

    async def close_session(self, token_id: str, session_id: str) -> None:
        self.engine.store.close(session_id, token_id)

    def close_token(self, token_id: str) -> str:
        closed = self.engine.store.close_token(token_id)
        dropped = self.scheduler.drop_token(token_id, ApiError(401, "unauthorized", "the bearer token was revoked"))
        return f"closed {closed} session(s), dropped {dropped} queued step(s)"

    def shutdown(self) -> None:
        self.scheduler.stop()


def create_app(
    model: ServerModel, tokens: TokenStore, limits: Limits | None = None, store: SessionStore | None = None
) -> FastAPI:
    """The single-process server: one model, its sessions in this process's memory."""
    limits = limits or Limits()
    local = LocalBackend(model, limits, store)
    app = create_http_app(local, tokens, limits)
    app.state.engine, app.state.scheduler = local.engine, local.scheduler
    return app


def create_http_app(backend, tokens: TokenStore, limits: Limits) -> FastAPI:
    """Routes, auth, limits and the error format over ``backend`` (``LocalBackend``, or a Ray Serve deployment's
    session tier): the one HTTP face of every way the server runs."""
    if limits.max_inflight_bytes < 2 * HeldBytes.COPIES * limits.max_request_bytes:
        raise ValueError(
            f"max_inflight_bytes {limits.max_inflight_bytes} cannot hold one largest request for one token "
            f"(needs {2 * HeldBytes.COPIES} x max_request_bytes {limits.max_request_bytes})"
        )
    budget = InflightBudget(limits.max_inflight_bytes)
    cooldown = FailureCooldown(limits.failures_before_cooldown, limits.failure_window_s, limits.failure_cooldown_s)
    watch_stop = threading.Event()

    def shutdown() -> None:
        watch_stop.set()
        backend.shutdown()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        shutdown()

    # the OpenAPI document is served behind the token below; the interactive docs pages are off
    app = FastAPI(
        lifespan=lifespan,
        title="HE-Diffusion backend",
        version=str(protocol.PROTOCOL_VERSION),
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.backend, app.state.budget = backend, budget

    def on_revoked(token_ids: set[str]) -> None:
        for tid in token_ids:
            log.warning("revoked token: %s", backend.close_token(tid))

    tokens.on_revoked(on_revoked)
    if tokens.path is not None:  # revocations apply even while no request arrives to notice them
        threading.Thread(target=_watch_tokens, args=(tokens, watch_stop), name="hediff-tokens", daemon=True).start()

    app.state.shutdown = shutdown

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        token_id = getattr(request.state, "token_id", None)
        if token_id is not None:
            cooldown.failed(token_id, exc.code)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else exc.headers
        return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status, headers=headers)

    app.add_middleware(ContainFailures)

    def require_token(request: Request) -> str:
        """The one token check of every route but health: the token's id, or a 401."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "unauthorized", "missing bearer token: send 'Authorization: Bearer <token>'")
        tid = tokens.verify(token.strip())
        if tid is None:
            raise ApiError(401, "unauthorized", "the bearer token is not valid for this server")
        wait = cooldown.retry_after(tid)
        if wait is not None:
            raise ApiError(
                429,
                "token_cooling_down",
                f"this token's requests were refused as malformed {limits.failures_before_cooldown} times within "
                f"{limits.failure_window_s:g} s; the server reads none of its requests for {wait} s more",
                {"Retry-After": str(wait)},
            )
        request.state.token_id = tid
        return tid

    async def read_frame(request: Request, held: HeldBytes, max_bytes: int) -> protocol.Frame:
        """The body as a frame; refused before reading when its declared size is over ``max_bytes`` or the budget."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip()
        if ctype != protocol.FRAME_CONTENT_TYPE:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"send the body as {protocol.FRAME_CONTENT_TYPE}, not {ctype or 'nothing'}",
            )
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, "bad_request", f"Content-Length {declared[:40]!r} is not a byte count")
            if int(declared) > max_bytes:
                raise ApiError(413, "payload_too_large", f"request of {declared} bytes exceeds {max_bytes} bytes")
            held.add(int(declared))
        body, size = bytearray(), 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise ApiError(413, "payload_too_large", f"request exceeds {max_bytes} bytes")
                if declared is None:
                    held.add(len(chunk))
                body += chunk
        except ClientDisconnect:
            raise ApiError(400, "client_disconnected", "the client went away before its request arrived") from None
        try:
            return protocol.decode_frame(bytes(body), max_bytes)
        except protocol.ProtocolError as e:
            raise ApiError(400, "bad_frame", str(e)) from None

    @app.get("/v1/health", response_model=Health)
    async def health():
        # unauthenticated, so it names nothing about the deployment (the model is in /v1/capabilities)
        return Health(status="ok", protocol_version=protocol.PROTOCOL_VERSION)

    @app.get("/openapi.json", include_in_schema=False, responses=ERRORS)
    async def openapi(request: Request):
        require_token(request)
        return app.openapi()

    @app.get("/v1/capabilities", responses=ERRORS)
    async def capabilities(request: Request):
        require_token(request)
        return await backend.capabilities()

    @app.post("/v1/sessions", status_code=201, response_model=SessionOpened, responses=ERRORS, openapi_extra=FRAME_BODY)
    async def open_session(request: Request):
        tid = require_token(request)
        held = HeldBytes(budget, tid)
        try:
            frame = await read_frame(request, held, limits.max_request_bytes)
            with as_api_errors():
                return await backend.open_session(tid, frame)
        finally:
            held.release()

    @app.post(
        "/v1/sessions/{session_id}/steps",
        responses={200: {"content": {protocol.FRAME_CONTENT_TYPE: {}}}, **ERRORS},
        openapi_extra=FRAME_BODY,
    )
    async def step(session_id: str, request: Request):
        tid = require_token(request)
        with as_api_errors():
            max_bytes = await backend.step_limit(tid, session_id)
        held = HeldBytes(budget, tid)
        try:
            frame = await read_frame(request, held, min(limits.max_request_bytes, max_bytes))
            with as_api_errors():
                data, ahead = await backend.step(tid, session_id, frame)
        finally:
            held.release()
        return Response(
            content=data, media_type=protocol.FRAME_CONTENT_TYPE, headers={QUEUE_POSITION_HEADER: str(ahead)}
        )

    @app.delete("/v1/sessions/{session_id}", status_code=204, responses=ERRORS)
    async def close_session(session_id: str, request: Request):
        tid = require_token(request)
        with as_api_errors():
            await backend.close_session(tid, session_id)
        return Response(status_code=204)

    return app
