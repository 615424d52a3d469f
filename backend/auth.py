"""Bearer tokens. Only SHA-256 hashes are stored; a token is shown once, when it is made.

A running server sees `hediff token create` / `revoke` within ``reload_interval_s``: ``verify`` re-reads the file
when its identity (inode, size, mtime) changed, and tells listeners which token ids disappeared.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from hediff.common.files import atomic_write, locked, read_regular

TOKEN_PREFIX = "hdt_"
MAX_TOKEN_FILE_BYTES = 4 << 20
DEFAULT_RELOAD_INTERVAL_S = 1.0

log = logging.getLogger("hediff.backend")


def default_tokens_path() -> Path:
    """``$HEDIFF_CONFIG_DIR/tokens.json``, else in the platform's per-user config folder (``~/.config/hediff`` on
    Linux)."""
    base = os.environ.get("HEDIFF_CONFIG_DIR") or platformdirs.user_config_path("hediff", appauthor=False)
    return Path(base) / "tokens.json"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenRecord:
    id: str
    label: str
    sha256: str
    created: float


def _file_identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read_records(path: Path) -> list[TokenRecord]:
    if not path.exists():
        return []
    try:
        raw = json.loads(read_regular(path, MAX_TOKEN_FILE_BYTES))
        return [TokenRecord(**r) for r in raw["tokens"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"token file {path} is unreadable ({e}); fix or remove it") from None


class TokenStore:
    def __init__(
        self,
        records: list[TokenRecord] | None = None,
        path: Path | None = None,
        reload_interval_s: float = DEFAULT_RELOAD_INTERVAL_S,
    ):
        self.path = path
        self.reload_interval_s = reload_interval_s
        self._records = list(records or [])
        self._identity = _file_identity(path) if path is not None else None
        self._checked = time.monotonic()
        self._lock = threading.Lock()
        self._revoked_listeners: list[Callable[[set[str]], None]] = []

    @classmethod
    def load(cls, path: Path, reload_interval_s: float = DEFAULT_RELOAD_INTERVAL_S) -> TokenStore:
        path = Path(path)
        return cls(_read_records(path), path, reload_interval_s)

    @classmethod
    def ephemeral(cls, label: str = "local") -> tuple[TokenStore, str]:
        """An in-memory store with one fresh token (for a loopback backend that lives for one run)."""
        store = cls()
        return store, store.create(label, persist=False)

    def on_revoked(self, listener: Callable[[set[str]], None]) -> None:
        """``listener(ids)`` runs after a reload in which these token ids disappeared (e.g. to close their sessions)."""
        self._revoked_listeners.append(listener)

    def create(self, label: str, persist: bool = True) -> str:
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)

        def add(records: list[TokenRecord]) -> list[TokenRecord]:
            taken = {r.id for r in records}
            tid = secrets.token_hex(4)
            while tid in taken:  # 32-bit ids: a collision would make revoke remove two tokens
                tid = secrets.token_hex(4)
            return [*records, TokenRecord(id=tid, label=label, sha256=_digest(token), created=time.time())]

        self._modify(add, persist)
        return token

    def revoke(self, token_id: str) -> bool:
        found = []

        def remove(records: list[TokenRecord]) -> list[TokenRecord]:
            kept = [r for r in records if r.id != token_id]
            found.append(len(kept) != len(records))
            return kept

        self._modify(remove, persist=True)
        return found[0]

    def records(self) -> list[TokenRecord]:
        self.reload_if_changed()
        with self._lock:
            return list(self._records)

    def verify(self, token: str) -> str | None:
        """The token's id, or None. Compares against every record in constant time per comparison."""
        self.reload_if_changed()
        candidate = _digest(token)
        found = None
        with self._lock:
            records = self._records
        for r in records:
            if hmac.compare_digest(candidate, r.sha256):
                found = r.id
        return found

    def reload_if_changed(self, force: bool = False) -> None:
        """Re-read the file if it changed since the last look (looked at most every ``reload_interval_s``).

        A file that became unreadable keeps the tokens last read (and logs why): a half-edited file must not lock
        every client out, nor let revoked tokens back in.
        """
        if self.path is None:
            return
        now = time.monotonic()
        if not force and now - self._checked < self.reload_interval_s:
            return
        self._checked = now
        identity = _file_identity(self.path)
        if identity == self._identity:
            return
        try:
            records = _read_records(self.path)
        except ValueError as e:
            log.error("keeping the previous tokens: %s", e)
            return
        with self._lock:
            before = {r.id for r in self._records}
            self._records, self._identity = records, identity
        gone = before - {r.id for r in records}
        if gone:
            log.warning("%d token(s) revoked; closing their sessions", len(gone))
            for listener in self._revoked_listeners:
                listener(gone)

    def _modify(self, change: Callable[[list[TokenRecord]], list[TokenRecord]], persist: bool) -> None:
        """Read-modify-write under the file's lock, so two `hediff token` commands cannot lose each other's edit."""
        if self.path is None or not persist:
            with self._lock:
                self._records = change(self._records)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with locked(self.path):
            records = change(_read_records(self.path))
            data = json.dumps({"tokens": [r.__dict__ for r in records]}, indent=2).encode("utf-8")
            atomic_write(self.path, data, mode=0o600)
        with self._lock:
            self._records, self._identity = records, _file_identity(self.path)
