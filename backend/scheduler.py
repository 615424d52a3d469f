"""Fair scheduling of model work across API tokens.

Steps wait in one queue per token; workers take the next step of the token served least recently (round-robin,
with a newly arriving token first in line), so a token with many (or huge) steps delays another token by at most
one of its steps per turn, never by its whole backlog. Each token may have
at most ``max_per_token`` steps queued or running (more is a 429), the server at most ``max_queued`` (a 503).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


class QueueRefused(Exception):
    status = 429
    code = "too_many_steps"

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServerBusy(QueueRefused):
    status = 503
    code = "server_busy"


@dataclass
class _Job:
    token_id: str
    fn: Callable[..., Any]
    args: tuple
    future: Future = field(default_factory=Future)


class FairScheduler:
    def __init__(self, workers: int = 1, max_per_token: int = 4, max_queued: int = 256):
        if workers < 1 or max_per_token < 1 or max_queued < 1:
            raise ValueError("workers, max_per_token and max_queued must be at least 1")
        self.max_per_token, self.max_queued = max_per_token, max_queued
        self._queues: dict[str, deque[_Job]] = {}
        self._active: dict[str, int] = {}  # token -> queued + running
        self._last_served: dict[str, int] = {}  # token -> turn number of its latest step taken
        self._turn = 0
        self._queued = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._threads = [
            threading.Thread(target=self._work, name=f"hediff-model-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, token_id: str, fn: Callable[..., Any], *args) -> tuple[Future, int]:
        """Queue ``fn(*args)`` for this token; returns its future and how many queued steps are ahead of it."""
        with self._cond:
            if self._stopped:
                raise ServerBusy("the server is shutting down", retry_after_s=5)
            if self._active.get(token_id, 0) >= self.max_per_token:
                raise QueueRefused(
                    f"this token already has {self.max_per_token} steps queued or running; wait for an answer first"
                )
            if self._queued >= self.max_queued:
                raise ServerBusy(f"the server has {self.max_queued} steps queued; try again shortly")
            job = _Job(token_id, fn, args)
            self._queues.setdefault(token_id, deque()).append(job)
            ahead = self._position_locked(job)
            self._active[token_id] = self._active.get(token_id, 0) + 1
            self._queued += 1
            self._cond.notify()
            return job.future, ahead

    async def run(self, token_id: str, fn: Callable[..., Any], *args) -> tuple[Any, int]:
        future, ahead = self.submit(token_id, fn, *args)
        return await asyncio.wrap_future(future), ahead

    def drop_token(self, token_id: str, reason: Exception) -> int:
        """Fail this token's queued (not running) steps with ``reason``; returns how many."""
        with self._cond:
            queue = self._queues.pop(token_id, deque())
            for job in queue:
                job.future.set_exception(reason)
            self._queued -= len(queue)
            self._release_locked(token_id, len(queue))
            return len(queue)

    def queued(self) -> int:
        """Steps waiting for a worker."""
        with self._cond:
            return self._queued

    def active(self) -> int:
        """Steps queued or running."""
        with self._cond:
            return sum(self._active.values())

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            for token_id in list(self._queues):
                for job in self._queues.pop(token_id):
                    job.future.set_exception(ServerBusy("the server is shutting down", retry_after_s=5))
            self._queued = 0
            self._cond.notify_all()

    def _release_locked(self, token_id: str, n: int) -> None:
        left = self._active.get(token_id, 0) - n
        if left > 0:
            self._active[token_id] = left
        else:
            self._active.pop(token_id, None)

    def _pick_locked(self, queues: dict[str, deque], last_served: dict[str, int]) -> str:
        return min(queues, key=lambda t: last_served.get(t, -1))

    def _next_locked(self) -> _Job:
        token_id = self._pick_locked(self._queues, self._last_served)
        queue = self._queues[token_id]
        job = queue.popleft()
        if not queue:
            del self._queues[token_id]
        self._turn += 1
        self._last_served[token_id] = self._turn
        if len(self._last_served) > 4 * len(self._queues) + 1024:  # forget tokens that went quiet
            self._last_served = {t: n for t, n in self._last_served.items() if t in self._queues}
        self._queued -= 1
        return job

    def _position_locked(self, job: _Job) -> int:
        """How many queued steps the workers will take before ``job`` (a dry run of the picking order)."""
        queues = {t: deque(q) for t, q in self._queues.items()}
        last_served, turn, ahead = dict(self._last_served), self._turn, 0
        while True:
            token_id = self._pick_locked(queues, last_served)
            if queues[token_id].popleft() is job:
                return ahead
            if not queues[token_id]:
                del queues[token_id]
            turn += 1
            last_served[token_id] = turn
            ahead += 1

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queues and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                job = self._next_locked()
            try:
                if job.future.set_running_or_notify_cancel():
                    try:
                        job.future.set_result(job.fn(*job.args))
                    except BaseException as e:  # noqa: BLE001 - delivered to the request that queued it
                        job.future.set_exception(e)
            finally:
                with self._cond:
                    self._release_locked(job.token_id, 1)
