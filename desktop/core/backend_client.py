"""HTTP client for the backend. Every failure becomes a BackendError that names the server and says what to do."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from hediff.common import protocol
from hediff.common.errors import EXIT_PROTOCOL, EXIT_SERVER_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE, HEDiffusionError
from hediff.common.net import is_loopback

_UPLOAD_CHUNK = 1 << 20
MAX_JSON_ANSWER_BYTES = 1 << 20  # health, capabilities, a session's plan: a few KiB in practice
# A step's answer is the updated latent (no larger than the one sent) or, in a U-shaped split, the hidden state
# entering the client's up blocks; neither exceeds this multiple of the step's request, plus a frame header.
STEP_ANSWER_FACTOR = 16
STEP_ATTEMPTS = 5  # a step and its retries (see BackendClient.step)
MAX_RETRY_WAIT_S = 5.0
_TRANSIENT_429 = ("too_many_steps", "upload_budget_full")  # queues that drain by themselves


class BackendError(HEDiffusionError, RuntimeError):
    """A failure talking to the backend; str() is a message for the user, no traceback needed."""

    exit_code = EXIT_SERVER_REFUSED


class BackendUnreachable(BackendError):
    exit_code = EXIT_UNREACHABLE


class BackendTimeout(BackendError):
    exit_code = EXIT_UNREACHABLE


class BackendTLSError(BackendUnreachable):
    """The server's TLS certificate did not verify against the trusted CAs."""


class BackendRejected(BackendError):
    def __init__(self, message: str, status: int, code: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.code, self.retry_after_s = status, code, retry_after_s


class BackendProtocolError(BackendError):
    exit_code = EXIT_PROTOCOL


class BackendInsecure(BackendError, ValueError):
    """A bearer token would cross the network in the clear (found before anything is sent: a usage error)."""

    exit_code = EXIT_USAGE


def step_answer_limit(request_bytes: int) -> int:
    return STEP_ANSWER_FACTOR * request_bytes + protocol.MAX_HEADER_BYTES


def refuse_plaintext_token(url: str, insecure: bool) -> None:
    """Plain http to another machine hands the token (and everything else) to anyone on the path: refuse unless
    the caller said ``insecure`` (``--insecure``, like curl's -k)."""
    parts = urlsplit(url)
    if parts.scheme.lower() == "http" and not is_loopback(parts.hostname or "") and not insecure:
        raise BackendInsecure(
            f"refusing to send the API token over plain http to {parts.hostname}, which is not this machine: anyone "
            "on the path could read and reuse it. Use an https:// URL (serve with --tls-cert/--tls-key), or pass "
            "--insecure (insecure=True) if the network is trusted"
        )


@dataclass
class Exchange:
    """One step's round trip as measured on the client."""

    frame: protocol.Frame
    upload_s: float
    download_s: float
    bytes_sent: int
    bytes_received: int


def tls_verification(url: str, tls_ca: str | Path | None) -> ssl.SSLContext | bool:
    """What httpx verifies the server with: the system CAs, or the given CA bundle / self-signed certificate."""
    if tls_ca is None:
        return True
    if not url.lower().startswith("https://"):
        raise ValueError(f"a TLS CA ({tls_ca}) was given for {url}, which is not an https:// URL")
    try:
        context = ssl.create_default_context(cafile=str(tls_ca))
    except FileNotFoundError:
        raise ValueError(f"the TLS CA file {tls_ca} does not exist") from None
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"the TLS CA file {tls_ca} cannot be used as PEM certificates ({e})") from None
    # a certificate the user pinned ("trust this certificate") is trusted as it is, even when it is not a CA's
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


class BackendClient:
    def __init__(
        self,
        url: str,
        token: str,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 10.0,
        tls_ca: str | Path | None = None,
        insecure: bool = False,
    ):
        self.url = url.rstrip("/")
        refuse_plaintext_token(self.url, insecure)
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            verify=tls_verification(self.url, tls_ca),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def health(self) -> dict:
        return self._json("GET", "/v1/health")

    def capabilities(self) -> dict:
        return self._json("GET", "/v1/capabilities")

    def open_session(self, frame: protocol.Frame) -> dict:
        return self._json(
            "POST", "/v1/sessions", content=frame.encode(), headers={"content-type": protocol.FRAME_CONTENT_TYPE}
        )

    def close_session(self, session_id: str) -> None:
        self._request("DELETE", f"/v1/sessions/{session_id}")

    def step(
        self, session_id: str, frame: protocol.Frame, on_uploaded=None, max_answer_bytes: int | None = None
    ) -> Exchange:
        """One step. A dropped connection, a 503 (a server replica lost, a store away) or a 429 for a full queue or
        upload budget is retried with the same step index, after the wait the server asks for: the server answers a
        repeated step with its stored answer, so a retry never advances the session twice."""
        body = frame.encode()
        limit = max_answer_bytes or step_answer_limit(len(body))
        if on_uploaded is not None:  # the retry uploads again, but what waits for the upload runs once
            on_uploaded = _once(on_uploaded)
        for attempt in range(STEP_ATTEMPTS):
            last = attempt == STEP_ATTEMPTS - 1
            try:
                return self._step_once(session_id, body, on_uploaded, limit)
            except BackendRejected as e:
                if last or not (e.status == 503 or (e.status == 429 and e.code in _TRANSIENT_429)):
                    raise
                wait = e.retry_after_s
            except BackendUnreachable as e:
                if last or isinstance(e, BackendTLSError):
                    raise
                wait = None
            time.sleep(min(MAX_RETRY_WAIT_S, wait if wait is not None else 0.25 * 2**attempt))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _step_once(self, session_id: str, body: bytes, on_uploaded, limit: int) -> Exchange:
        marks = {}

        def chunks():
            for i in range(0, len(body), _UPLOAD_CHUNK):
                yield body[i : i + _UPLOAD_CHUNK]
            marks["uploaded"] = time.perf_counter()
            if on_uploaded is not None:
                on_uploaded()

        t0 = time.perf_counter()
        headers = {"content-type": protocol.FRAME_CONTENT_TYPE, "content-length": str(len(body))}
        with self._guard():
            with self._http.stream("POST", f"/v1/sessions/{session_id}/steps", content=chunks(), headers=headers) as r:
                t_headers = time.perf_counter()
                data = self._read_capped(r, limit)
                t_end = time.perf_counter()
                self._raise_for(r, data)
        if r.headers.get("content-type", "").split(";")[0] != protocol.FRAME_CONTENT_TYPE:
            raise BackendProtocolError(
                f"{self.url} answered a step with {r.headers.get('content-type')!r}, not a frame"
            )
        try:
            answer = protocol.decode_frame(data, limit)
        except protocol.ProtocolError as e:
            raise BackendProtocolError(f"{self.url} sent a malformed step answer: {e}") from None
        uploaded = marks.get("uploaded", t0)
        return Exchange(
            frame=answer,
            upload_s=uploaded - t0,
            download_s=t_end - t_headers,
            bytes_sent=len(body),
            bytes_received=len(data),
        )

    # --- plumbing ---

    def _json(self, method: str, path: str, **kw) -> dict:
        r = self._request(method, path, **kw)
        try:
            data = r.json()
        except ValueError:
            raise BackendProtocolError(
                f"{self.url}{path} did not answer JSON; is this an HE-Diffusion backend?"
            ) from None
        if not isinstance(data, dict):
            raise BackendProtocolError(f"{self.url}{path} answered unexpected JSON")
        return data

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        with self._guard():
            with self._http.stream(method, path, **kw) as r:
                data = self._read_capped(r, MAX_JSON_ANSWER_BYTES)
        self._raise_for(r, data)
        return httpx.Response(r.status_code, headers=r.headers, content=data)

    def _read_capped(self, r: httpx.Response, limit: int) -> bytes:
        """The body, read no further than ``limit`` bytes: a broken or hostile server cannot make us buffer more."""
        declared = r.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BackendProtocolError(
                f"{self.url} announced an answer of {declared} bytes; the protocol allows at most {limit} here"
            )
        body = bytearray()
        for chunk in r.iter_bytes():
            body += chunk
            if len(body) > limit:
                raise BackendProtocolError(
                    f"{self.url} sent more than the {limit} bytes the protocol allows for this answer; stopped reading"
                )
        return bytes(body)

    def _guard(self):
        client = self

        class _Guard:
            def __enter__(self):
                return self

            def __exit__(self, typ, exc, tb):
                if exc is None or isinstance(exc, BackendError):
                    return False
                if isinstance(exc, httpx.TimeoutException):
                    raise BackendTimeout(
                        f"the backend at {client.url} did not answer in time ({type(exc).__name__}); "
                        "it may be overloaded, or raise the timeout"
                    ) from None
                if isinstance(exc, httpx.ConnectError) and _is_certificate_failure(exc):
                    raise BackendTLSError(
                        f"the TLS certificate of {client.url} does not verify ({_ssl_reason(exc)}); if the server uses "
                        "a self-signed certificate or a private CA, pass that certificate with --tls-ca"
                    ) from None
                if isinstance(exc, (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
                    raise BackendUnreachable(
                        f"cannot reach the backend at {client.url} ({exc}); is it running, and is the URL right?"
                    ) from None
                if isinstance(exc, httpx.HTTPError):
                    raise BackendError(f"talking to {client.url} failed: {exc}") from None
                return False

        return _Guard()

    def _raise_for(self, r: httpx.Response, data: bytes) -> None:
        if r.status_code < 400:
            return
        code, detail = "error", data[:300].decode("utf-8", "replace")
        try:
            body = httpx.Response(r.status_code, content=data).json()
            code, detail = body.get("error", code), body.get("detail", detail)
        except (ValueError, AttributeError):
            pass
        if r.status_code == 401:
            msg = f"{self.url} refused the API token ({detail}); check the token for this server"
        elif r.status_code >= 500:
            msg = f"the backend at {self.url} failed with HTTP {r.status_code}; see the server's log"
        else:
            msg = f"the backend at {self.url} rejected the request (HTTP {r.status_code}): {detail}"
        retry_after = r.headers.get("retry-after", "")
        raise BackendRejected(msg, r.status_code, str(code), float(retry_after) if retry_after.isdigit() else None)


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    done = threading.Event()

    def call() -> None:
        if not done.is_set():
            done.set()
            fn()

    return call


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    seen = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _is_certificate_failure(exc: BaseException) -> bool:
    return isinstance(_ssl_cause(exc), ssl.SSLCertVerificationError)


def _ssl_reason(exc: BaseException) -> str:
    cause = _ssl_cause(exc)
    return getattr(cause, "verify_message", None) or getattr(cause, "reason", None) or str(exc)
