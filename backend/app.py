"""HTTP routes: auth, size limits, error mapping. The work itself is in backend.engine."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from hediff.backend.auth import TokenStore
from hediff.backend.engine import Engine, Limits, ServerModel
from hediff.backend.sessions import SessionError, SessionStore, TooManySessions
from hediff.common import protocol
from hediff.common.he import HEError

log = logging.getLogger("hediff.backend")


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


class Health(BaseModel):
    status: str
    protocol_version: int
    model: str


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
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 409, 410, 413, 415, 429)}


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


def create_app(
    model: ServerModel, tokens: TokenStore, limits: Limits | None = None, store: SessionStore | None = None
) -> FastAPI:
    limits = limits or Limits()
    store = store or SessionStore(limits.session_ttl_s, limits.max_sessions, limits.max_sessions_per_token)
    engine = Engine(model, limits, store)
    app = FastAPI(title="HE-Diffusion backend", version=str(protocol.PROTOCOL_VERSION))
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else exc.headers
        return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status, headers=headers)

    app.add_middleware(ContainFailures)

    def token_id(request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "unauthorized", "missing bearer token: send 'Authorization: Bearer <token>'")
        tid = tokens.verify(token.strip())
        if tid is None:
            raise ApiError(401, "unauthorized", "the bearer token is not valid for this server")
        return tid

    async def read_frame(request: Request) -> protocol.Frame:
        ctype = request.headers.get("content-type", "").split(";")[0].strip()
        if ctype != protocol.FRAME_CONTENT_TYPE:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"send the body as {protocol.FRAME_CONTENT_TYPE}, not {ctype or 'nothing'}",
            )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_request_bytes:
            raise ApiError(
                413, "payload_too_large", f"request of {declared} bytes exceeds {limits.max_request_bytes} bytes"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_request_bytes:
                raise ApiError(413, "payload_too_large", f"request exceeds {limits.max_request_bytes} bytes")
            chunks.append(chunk)
        try:
            return protocol.decode_frame(b"".join(chunks), limits.max_request_bytes)
        except protocol.ProtocolError as e:
            raise ApiError(400, "bad_frame", str(e)) from None

    async def run(fn, *args):
        try:
            return await run_in_threadpool(fn, *args)
        except TooManySessions as e:
            raise ApiError(e.status, type(e).__name__, str(e), {"Retry-After": str(e.retry_after_s)}) from None
        except SessionError as e:
            raise ApiError(e.status, type(e).__name__, str(e)) from None
        except (protocol.ProtocolError, HEError) as e:
            raise ApiError(400, "bad_request", str(e)) from None

    @app.get("/v1/health", response_model=Health)
    def health():
        return Health(status="ok", protocol_version=protocol.PROTOCOL_VERSION, model=model.model_id)

    @app.get("/v1/capabilities", responses=ERRORS)
    def capabilities(request: Request):
        token_id(request)
        return model.capabilities(limits)

    @app.post("/v1/sessions", status_code=201, response_model=SessionOpened, responses=ERRORS, openapi_extra=FRAME_BODY)
    async def open_session(request: Request):
        tid = token_id(request)
        frame = await read_frame(request)
        return await run(engine.open_session, tid, frame)

    @app.post(
        "/v1/sessions/{session_id}/steps",
        responses={200: {"content": {protocol.FRAME_CONTENT_TYPE: {}}}, **ERRORS},
        openapi_extra=FRAME_BODY,
    )
    async def step(session_id: str, request: Request):
        tid = token_id(request)
        session = await run(store.get, session_id, tid)
        frame = await read_frame(request)
        data = await run(engine.step, session, frame)
        return Response(content=data, media_type=protocol.FRAME_CONTENT_TYPE)

    @app.delete("/v1/sessions/{session_id}", status_code=204, responses=ERRORS)
    async def close_session(session_id: str, request: Request):
        tid = token_id(request)
        await run(store.close, session_id, tid)
        return Response(status_code=204)

    return app
