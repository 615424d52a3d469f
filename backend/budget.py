"""The global budget of request bytes held in memory at once: a body is admitted only if its bytes fit.

One token may hold at most half of it, so a single client flooding uploads cannot lock every other client out.
"""

from __future__ import annotations

import threading


class InflightBudget:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.max_bytes_per_owner = max_bytes // 2
        self._used = 0
        self._by_owner: dict[str, int] = {}
        self._peak = 0
        self._lock = threading.Lock()

    def try_reserve(self, n: int, owner: str) -> bool:
        with self._lock:
            mine = self._by_owner.get(owner, 0)
            if self._used + n > self.max_bytes or mine + n > self.max_bytes_per_owner:
                return False
            self._used += n
            self._by_owner[owner] = mine + n
            self._peak = max(self._peak, self._used)
            return True

    def release(self, n: int, owner: str) -> None:
        with self._lock:
            self._used -= n
            left = self._by_owner.get(owner, 0) - n
            if left > 0:
                self._by_owner[owner] = left
            else:
                self._by_owner.pop(owner, None)

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    @property
    def peak(self) -> int:
        with self._lock:
            return self._peak
