"""A token whose requests keep being refused as malformed is refused for a while, before its bodies are read.

A working client never sends malformed frames or oversized bodies; a token that sends several in a short window
is broken or hostile, and reading its bodies (up to the request limit each) is the server's largest cost under a
flood that the in-flight budget admits. Counting happens per token, so no other client is affected.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

# refusals that a correct client never causes (a 429 or an expired session can happen to anyone)
MALFORMED = frozenset({"bad_frame", "bad_request", "payload_too_large", "unsupported_media_type"})


class FailureCooldown:
    def __init__(
        self,
        max_failures: int = 5,
        window_s: float = 10.0,
        cooldown_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_failures, self.window_s, self.cooldown_s, self.clock = max_failures, window_s, cooldown_s, clock
        self._failures: dict[str, deque[float]] = {}
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def retry_after(self, token_id: str) -> int | None:
        """Whole seconds this token must wait before the server reads its requests again, or None."""
        with self._lock:
            until = self._until.get(token_id)
            now = self.clock()
            if until is None:
                return None
            if now >= until:
                del self._until[token_id]
                return None
            return max(1, math.ceil(until - now))

    def failed(self, token_id: str, code: str) -> None:
        """A request of this token was refused with ``code``."""
        if code not in MALFORMED:
            return
        with self._lock:
            now = self.clock()
            recent = self._failures.setdefault(token_id, deque())
            recent.append(now)
            while recent and now - recent[0] > self.window_s:
                recent.popleft()
            if len(recent) >= self.max_failures:
                self._until[token_id] = now + self.cooldown_s
                recent.clear()
            if len(self._failures) > 4096:  # tokens that went quiet
                self._failures = {t: q for t, q in self._failures.items() if q and now - q[-1] <= self.window_s}
