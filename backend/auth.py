"""Bearer tokens. Only SHA-256 hashes are stored; a token is shown once, when it is made."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import platformdirs

TOKEN_PREFIX = "hdt_"


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


class TokenStore:
    def __init__(self, records: list[TokenRecord] | None = None, path: Path | None = None):
        self.path = path
        self._records = list(records or [])

    @classmethod
    def load(cls, path: Path) -> TokenStore:
        path = Path(path)
        if not path.exists():
            return cls([], path)
        try:
            raw = json.loads(path.read_text())
            records = [TokenRecord(**r) for r in raw["tokens"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"token file {path} is unreadable ({e}); fix or remove it") from None
        return cls(records, path)

    @classmethod
    def ephemeral(cls, label: str = "local") -> tuple[TokenStore, str]:
        """An in-memory store with one fresh token (for a loopback backend that lives for one run)."""
        store = cls()
        return store, store.create(label, persist=False)

    def create(self, label: str, persist: bool = True) -> str:
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        record = TokenRecord(id=secrets.token_hex(4), label=label, sha256=_digest(token), created=time.time())
        self._records.append(record)
        if persist:
            self._save()
        return token

    def revoke(self, token_id: str) -> bool:
        before = len(self._records)
        self._records = [r for r in self._records if r.id != token_id]
        if len(self._records) != before:
            self._save()
            return True
        return False

    def records(self) -> list[TokenRecord]:
        return list(self._records)

    def verify(self, token: str) -> str | None:
        """The token's id, or None. Compares against every record in constant time per comparison."""
        candidate = _digest(token)
        found = None
        for r in self._records:
            if hmac.compare_digest(candidate, r.sha256):
                found = r.id
        return found

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"tokens": [r.__dict__ for r in self._records]}, indent=2))
        os.chmod(tmp, 0o600)
        tmp.replace(self.path)
