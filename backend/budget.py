"""The global budget of request bytes held in memory at once: a body is admitted only if its bytes fit."""

from __future__ import annotations

import threading


class InflightBudget:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._used = 0
        self._peak = 0
        self._lock = threading.Lock()

    def try_reserve(self, n: int) -> bool:
        with self._lock:
            if self._used + n > self.max_bytes:
                return False
            self._used += n
            self._peak = max(self._peak, self._used)
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self._used -= n

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    @property
    def peak(self) -> int:
        with self._lock:
            return self._peak
