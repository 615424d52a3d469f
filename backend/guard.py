"""The web server's own defences, below the app: connection caps, header/body read deadlines, quiet accept errors.

uvicorn arms no timer until a first response is sent, so a client that opens a connection and dribbles a header
keeps a slot forever; and nothing caps connections per address. ``guarded_protocol`` returns uvicorn's h11 protocol
with both fixed; ``RateLimitedLog`` keeps a flood of identical log lines (accept() failing with EMFILE) to a trickle.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("hediff.backend")


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0  # from connection (or the first byte of a next request) to complete headers
    body_idle_timeout_s: float = 30.0  # longest silence while a request body is arriving
    body_timeout_s: float = 300.0  # a whole request body, however steadily it trickles
    max_connections: int = 512  # in total; keep it under the process's open-file limit
    max_connections_per_address: int = 32
    keep_alive_s: float = 5.0


class ConnectionGuard:
    """Counts open connections per peer address; shared by every connection of one server."""

    def __init__(self, limits: ConnectionLimits):
        self.limits = limits
        self._per_address: Counter[str] = Counter()
        self._total = 0
        self._refused = 0
        self._lock = threading.Lock()

    def admit(self, address: str) -> bool:
        with self._lock:
            if (
                self._total >= self.limits.max_connections
                or self._per_address[address] >= self.limits.max_connections_per_address
            ):
                self._refused += 1
                return False
            self._total += 1
            self._per_address[address] += 1
            return True

    def release(self, address: str) -> None:
        with self._lock:
            self._total -= 1
            self._per_address[address] -= 1
            if self._per_address[address] <= 0:
                del self._per_address[address]

    @property
    def open_connections(self) -> int:
        with self._lock:
            return self._total

    @property
    def refused(self) -> int:
        with self._lock:
            return self._refused


_TIMEOUT_408 = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n"
)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with per-connection read deadlines and admission by ``guard`` (set by a subclass)."""

    guard: ConnectionGuard

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._address = self.client[0] if self.client else "?"
        self._admitted = self.guard.admit(self._address)
        self._watchdog: asyncio.TimerHandle | None = None
        self._phase_cycle = None  # the request cycle whose body is being watched; None while waiting for headers
        self._phase_start = self._last_data = time.monotonic()
        if not self._admitted:
            transport.abort()  # no answer: an answer costs a write to a peer that is already over its share
            return
        self._arm(self.guard.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_admitted", False):
            self._admitted = False
            self.guard.release(self._address)
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self._watchdog is None:  # first byte of a next request on a kept-alive connection
            self._phase_cycle, self._phase_start = None, now
            self._arm(self.guard.limits.header_timeout_s)
        self._last_data = now
        super().data_received(data)
        if self.cycle is not None and self.cycle is not self._phase_cycle and not self.cycle.response_complete:
            # headers complete: from now on the body has its own deadlines
            self._phase_cycle, self._phase_start = self.cycle, now
            self._disarm()
            if self.cycle.more_body:
                self._arm(self.guard.limits.body_idle_timeout_s)
        elif self._phase_cycle is not None and not self._phase_cycle.more_body:
            self._disarm()  # body complete

    def on_response_complete(self) -> None:
        self._disarm()
        self._phase_cycle = None
        super().on_response_complete()

    def _arm(self, delay: float) -> None:
        self._disarm()
        self._watchdog = self.loop.call_later(max(delay, 0.0), self._check)

    def _disarm(self) -> None:
        if getattr(self, "_watchdog", None) is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _check(self) -> None:
        self._watchdog = None
        if self.transport.is_closing():
            return
        limits, now = self.guard.limits, time.monotonic()
        if self._phase_cycle is None:  # still waiting for complete headers
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being answered; its response re-arms nothing until the next bytes
            self._close_with_408("request headers did not arrive within the header timeout")
            return
        if not self._phase_cycle.more_body or self._phase_cycle.response_complete:
            return
        idle_left = limits.body_idle_timeout_s - (now - self._last_data)
        total_left = limits.body_timeout_s - (now - self._phase_start)
        if idle_left <= 0 or total_left <= 0:
            # mid-request: the app sees a disconnect; h11 cannot start a second response, so just close
            self.transport.close()
            return
        self._arm(min(idle_left, total_left))

    def _close_with_408(self, detail: str) -> None:
        body = b'{"error":"request_timeout","detail":"%s"}' % detail.encode()
        if self.conn.our_state is h11.IDLE:  # nothing sent on this request yet: say why before closing
            self.transport.write(_TIMEOUT_408 % len(body) + body)
        self.transport.close()


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    return type("BoundGuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})


class RateLimitedLog(logging.Filter):
    """Lets through at most ``burst`` records with the same message template per ``window_s``; then one line saying
    how many were dropped. One client must not be able to fill the disk through the log."""

    def __init__(self, burst: int = 5, window_s: float = 10.0):
        super().__init__()
        self.burst, self.window_s = burst, window_s
        self._seen: dict[tuple[str, str], list] = {}  # key -> [window start, count]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            entry = self._seen.get(key)
            if entry is None or now - entry[0] >= self.window_s:
                dropped = 0 if entry is None else max(0, entry[1] - self.burst)
                self._seen[key] = [now, 1]
                if len(self._seen) > 1024:  # templates are few; ids in messages must not grow this without bound
                    self._seen = {key: self._seen[key]}
                if dropped:
                    record.msg = f"{record.msg} [{dropped} similar lines suppressed in the last {self.window_s:.0f} s]"
                return True
            entry[1] += 1
            return entry[1] <= self.burst


LOGGERS_TO_LIMIT = ("asyncio", "uvicorn.error", "uvicorn.access", "hediff.backend")


_limiter: RateLimitedLog | None = None


def install_log_limits() -> RateLimitedLog:
    """Rate-limit the server's loggers (once per process; later calls return the same limiter)."""
    global _limiter
    if _limiter is None:
        _limiter = RateLimitedLog()
        for name in LOGGERS_TO_LIMIT:
            logging.getLogger(name).addFilter(_limiter)
    return _limiter
