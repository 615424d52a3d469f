"""The server's configurable limits and their defaults. Torch-free, so that `hediff serve --help` and the
argument checks run before any model library loads."""

from __future__ import annotations

from dataclasses import dataclass

from hediff.common import settings


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 64 << 20
    max_steps: int = settings.SERVER_MAX_STEPS
    max_side: int = settings.MAX_SIDE  # a model's own cap may be lower: ServerModel.size_limits
    session_ttl_s: float = 600.0
    max_sessions: int = 64
    max_sessions_per_token: int = 8
    # bytes of request bodies held at once (read, queued or being worked on), all clients together; full -> 429
    max_inflight_bytes: int = 256 << 20
    max_steps_per_token: int = 4  # steps one token may have queued or running
    max_queued_steps: int = 256  # steps the server queues in total
    model_workers: int = 1  # threads running model steps (one forward pass at a time on the device anyway)
    # a token refused as malformed this many times within the window is refused unread for the cool-down
    failures_before_cooldown: int = 5
    failure_window_s: float = 10.0
    failure_cooldown_s: float = 10.0
