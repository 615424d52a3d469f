"""Secrets on the client: the OS keyring (server tokens, wrapping keys) and wrapped CKKS device keys. Qt-free.

- ``SecretStore`` wraps a ``keyring`` backend and refuses to work, with a message that says what to do, when the
  backend cannot keep secrets (keyring's fail/null backends, a locked or missing Secret Service, ...). There is
  no silent plaintext fallback.
- ``DeviceKeys`` keeps one exportable CKKS key per HE preset in ``data_dir/keys/<preset>.hdkey``. The secret
  bytes are only ever written wrapped with AES-256-GCM, under either a random 256-bit wrapping key kept in the
  keyring (``device-key-wrap:<preset>``, base64) or, only when the user opted in with a passphrase, a key
  derived with scrypt (N=2**17, r=8, p=1; salt in the file). The AES-GCM associated data is the file's whole
  header (format, preset, fingerprint, created, protection, KDF parameters), so a swapped or edited header
  does not decrypt.
- A CKKS key may decrypt only a bounded number of ciphertexts (common/he.py, docs/key-recovery.md). A device key
  outlives sessions, so its count (decryptions made or promised) is kept in the key file itself, as the header
  field ``spent``, rewritten (new nonce) before its ciphertexts leave the machine. Being in the AES-GCM associated
  data, the count cannot be edited or reset without the file failing to open, and deleting it deletes the key;
  ``rotating`` replaces such a tampered key with a new one. (Files of the previous format kept the count in a
  separate ``<preset>.uses`` file; it is read once and folded into the header.)
  ``get_or_create``/``load`` give the key itself, which refuses past the bound; ``rotating`` gives it behind a
  RotatingKey that replaces it with a new stored key instead.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import keyring
import keyring.backend
import keyring.errors
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from keyring.backends import fail as _fail_backend
from keyring.backends import null as _null_backend

from hediff.common import he
from hediff.common.errors import KeysError
from hediff.common.files import atomic_write
from hediff.desktop.core.appdata import ensure_private_dir

DEFAULT_SERVICE = "hediff"
WRAP_NAME = "device-key-wrap:{preset}"
KEY_FORMAT = "hediff-device-key/1"
KEY_SUFFIX = ".hdkey"
USES_SUFFIX = ".uses"
# scrypt N=2**17, r=8, p=1: OWASP's minimum for scrypt; 128 MiB and ~0.25 s per derivation on a laptop core,
# paid once per unlock (loaded keys are cached in memory). Stored per file, so it can be raised later.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
# A crafted file must not make unlocking exhaust memory or take minutes: at most 4x the default's work and memory.
_SCRYPT_MAX_MEMORY = 4 * 128 * SCRYPT_N * SCRYPT_R  # 512 MiB
_SCRYPT_MAX_WORK = 4 * SCRYPT_N * SCRYPT_R * SCRYPT_P  # n * r * p, proportional to the time one derivation takes
_MAX_KEY_FILE = 16 << 20
_AAD_PREFIX = b"hediff/device-key/v1\0"
_PROBE_NAME = "hediff-availability-probe"
_USE_ERRORS = (keyring.errors.KeyringLocked, keyring.errors.NoKeyringError, keyring.errors.InitError)


# --- errors --------------------------------------------------------------------------------------------------


def keyring_advice(platform: str | None = None) -> str:
    """How to get a working keyring on this platform: one short imperative."""
    platform = sys.platform if platform is None else platform
    if platform.startswith("win"):
        return "sign in to a normal Windows session (Credential Manager)"
    if platform == "darwin":
        return "unlock your login keychain in Keychain Access"
    return "start or unlock your desktop's keyring (GNOME Keyring or KWallet)"


def no_keyring_message(detail: str, platform: str | None = None) -> str:
    """The one message for a missing or locked keyring, wherever it shows (Servers and Keys tabs, the server
    dialog, errors in the CLI and API): what is wrong, how to fix it, and what works meanwhile."""
    return (
        f"No usable system keyring ({detail}). To fix: {keyring_advice(platform)}, then try again. Meanwhile "
        "API tokens cannot be saved; device keys can use a passphrase instead (Keys tab)."
    )


class KeyringUnavailable(KeysError, RuntimeError):
    """The OS keyring cannot be used; str() is ``no_keyring_message``."""

    def __init__(self, detail: str, platform: str | None = None):
        self.detail = detail
        super().__init__(no_keyring_message(detail, platform))


class KeyStoreError(KeysError, ValueError):
    """A device key that cannot be used; str() says which and why."""


class WrongPassphrase(KeyStoreError):
    pass


class PassphraseRequired(WrongPassphrase):
    """The key file is passphrase-protected and no passphrase was given (a WrongPassphrase, for callers)."""


class CorruptKeyFile(KeyStoreError):
    def __init__(self, path: Path, reason: str):
        self.path = Path(path)
        super().__init__(
            f"the device key file {self.path} is corrupt or was modified ({reason}); rotate or delete the key"
        )


class MissingWrappingKey(KeyStoreError):
    pass


class NoDeviceKey(KeyStoreError):
    pass


# --- the keyring ---------------------------------------------------------------------------------------------


class _NeverAutoSelected:
    """A ``priority`` that raises: keyring then deems the class not viable, so get_keyring() never picks it."""

    def __get__(self, obj, owner):
        raise RuntimeError("MemoryKeyring is never auto-selected; pass it explicitly to SecretStore")


class MemoryKeyring(keyring.backend.KeyringBackend):
    """Secrets in this process's memory only: for tests and an explicit "this session only" mode.

    Never auto-selected by ``keyring.get_keyring()`` (its priority raises, so keyring does not consider it viable).
    Set ``locked = True`` to make it behave like a locked keyring (raises ``KeyringLocked`` on use).
    """

    priority = _NeverAutoSelected()

    def __init__(self, locked: bool = False):
        super().__init__()
        self.locked = locked
        self._data: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return f"{type(self).__module__}.{type(self).__name__} (in memory, this session only)"

    def _check(self) -> None:
        if self.locked:
            raise keyring.errors.KeyringLocked("the in-memory keyring is locked")

    def get_password(self, service: str, username: str) -> str | None:
        self._check()
        with self._lock:
            return self._data.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self._check()
        with self._lock:
            self._data[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self._check()
        with self._lock:
            if self._data.pop((service, username), None) is None:
                raise keyring.errors.PasswordDeleteError("no such password")


def _backend_name(backend) -> str:
    cls = type(backend)
    return f"{cls.__module__}.{cls.__name__}"


def _static_problem(backend) -> str | None:
    """Why this backend cannot keep secrets, judged without using it; None if it looks usable."""
    if isinstance(backend, MemoryKeyring):
        return None
    if isinstance(backend, _fail_backend.Keyring):
        return "no keyring backend was found"
    if isinstance(backend, _null_backend.Keyring):
        return "the keyring is disabled (null backend)"
    if type(backend).__module__.startswith("keyrings.alt"):
        return f"{_backend_name(backend)} keeps secrets in a plain file or asks on a terminal"
    try:
        priority = type(backend).priority
    except Exception as e:  # noqa: BLE001 - keyring signals "not usable here" by raising anything from priority
        return f"{_backend_name(backend)} is not usable here: {e}"
    try:
        if float(priority) < 0:
            return f"{_backend_name(backend)} has no working store behind it"
    except (TypeError, ValueError):
        return f"{_backend_name(backend)} reports no usable priority"
    return None


class SecretStore:
    """Named secrets (strings) in a keyring backend; raises KeyringUnavailable instead of ever falling back."""

    def __init__(self, backend: keyring.backend.KeyringBackend | None = None, service: str = DEFAULT_SERVICE):
        self._init_problem: str | None = None
        if backend is None:
            try:
                backend = keyring.get_keyring()
            except Exception as e:  # noqa: BLE001 - a broken keyring configuration must not stop the app
                backend = _fail_backend.Keyring()
                self._init_problem = f"the keyring could not be set up: {type(e).__name__}: {e}"
        self.backend = backend
        self.service = service
        self._lock = threading.Lock()
        self._problem: str | None = None
        self._checked = False

    def __repr__(self) -> str:
        return f"SecretStore({_backend_name(self.backend)}, service={self.service!r})"

    @property
    def backend_name(self) -> str:
        return _backend_name(self.backend)

    def refresh(self) -> bool:
        """Check again (e.g. after the user unlocked the keyring); returns ``available``."""
        with self._lock:
            self._checked = False
        return self.available

    @property
    def available(self) -> bool:
        return self._current_problem() is None

    @property
    def unavailable_reason(self) -> str:
        """The user-facing message (as KeyringUnavailable would say it), or "" when the keyring works."""
        problem = self._current_problem()
        return "" if problem is None else str(KeyringUnavailable(problem))

    def _current_problem(self) -> str | None:
        with self._lock:
            if not self._checked:
                self._problem = self._init_problem or _static_problem(self.backend)
                if self._problem is None:
                    try:  # a locked Secret Service shows up only when used (it may ask the user to unlock it)
                        self.backend.get_password(self.service, _PROBE_NAME)
                    except Exception as e:  # noqa: BLE001 - whatever the backend raises, it cannot be used
                        self._problem = _describe(e)
                self._checked = True
            return self._problem

    def _require(self) -> None:
        problem = self._current_problem()
        if problem is not None:
            raise KeyringUnavailable(problem)

    def _failed(self, e: Exception) -> KeyringUnavailable:
        problem = _describe(e)
        if isinstance(e, _USE_ERRORS):
            with self._lock:
                self._problem, self._checked = problem, True
        return KeyringUnavailable(problem)

    def set(self, name: str, value: str) -> None:
        if not isinstance(value, str) or not value:
            raise ValueError(f"secret {name!r} must be a non-empty string")
        self._require()
        try:
            self.backend.set_password(self.service, name, value)
        except keyring.errors.PasswordSetError as e:
            raise KeyringUnavailable(f"{self.backend_name} refused to store {name!r}: {e}") from None
        except (keyring.errors.KeyringError, OSError) as e:
            raise self._failed(e) from None

    def get(self, name: str) -> str | None:
        self._require()
        try:
            return self.backend.get_password(self.service, name)
        except (keyring.errors.KeyringError, OSError) as e:
            raise self._failed(e) from None

    def delete(self, name: str) -> None:
        """Remove a secret; removing one that is not there is fine."""
        self._require()
        try:
            self.backend.delete_password(self.service, name)
        except keyring.errors.PasswordDeleteError:
            pass  # not there (backends say so with this error)
        except (keyring.errors.KeyringError, OSError) as e:
            raise self._failed(e) from None


def _describe(e: Exception) -> str:
    if isinstance(e, keyring.errors.KeyringLocked):
        return f"the keyring is locked: {e}"
    if isinstance(e, keyring.errors.NoKeyringError):
        return "no keyring backend was found"
    if isinstance(e, keyring.errors.InitError):
        return f"the keyring could not be opened: {e}"
    return f"the keyring failed: {type(e).__name__}: {e}"


# --- device keys ---------------------------------------------------------------------------------------------


@dataclass
class KeyInfo:
    preset: str
    fingerprint: str
    created: float
    protection: str  # "keyring" | "passphrase"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value, what: str, path: Path, length: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise CorruptKeyFile(path, f"{what} is missing")
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise CorruptKeyFile(path, f"{what} is not base64") from None
    if length is not None and len(data) != length:
        raise CorruptKeyFile(path, f"{what} has {len(data)} bytes, expected {length}")
    return data


def _aad(header: dict) -> bytes:
    """Associated data: the canonical JSON of every header field (all but nonce and ciphertext)."""
    fields = {k: v for k, v in header.items() if k not in ("nonce", "ciphertext")}
    return _AAD_PREFIX + json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _scrypt(passphrase: str, salt: bytes, n: int, r: int, p: int) -> tuple[bytes, bytes]:
    """(AES key, passphrase check value): two halves of one 64-byte scrypt output."""
    out = Scrypt(salt=salt, length=64, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))
    return out[:32], out[32:]


class DeviceKeys:
    """Stored CKKS device keys, one per HE preset, wrapped with AES-256-GCM (see the module docstring).

    ``passphrase``: the user's opt-in to passphrase protection. While set, new keys are wrapped under it instead
    of a keyring wrapping key, and passphrase-protected files can be opened. ``scrypt_n`` and ``clock`` are
    injectable (tests).
    """

    def __init__(
        self,
        data_dir: Path,
        secrets: SecretStore,
        passphrase: str | None = None,
        *,
        scrypt_n: int = SCRYPT_N,
        clock=time.time,
    ):
        self.data_dir = Path(data_dir)
        self.dir = self.data_dir / "keys"
        self.secrets = secrets
        self.scrypt_n = scrypt_n
        self.clock = clock
        self._passphrase: str | None = None
        self._cache: dict[str, tuple[tuple, he.ClientKey]] = {}
        self._wraps: dict[str, bytes] = {}  # preset -> AES key of its file, to rewrite the count (memory only)
        self._lock = threading.RLock()
        self.set_passphrase(passphrase)

    # --- passphrase opt-in ---

    def set_passphrase(self, passphrase: str | None) -> None:
        """Opt in to (or, with None, out of) passphrase protection for this session."""
        if passphrase is not None and (not isinstance(passphrase, str) or not passphrase):
            raise ValueError("the passphrase must not be empty")
        with self._lock:
            self._passphrase = passphrase
            self._cache.clear()
            self._wraps.clear()

    @property
    def uses_passphrase(self) -> bool:
        return self._passphrase is not None

    # --- queries ---

    def path(self, preset: str) -> Path:
        he.get_preset(preset)  # only known preset names become file names
        return self.dir / f"{preset}{KEY_SUFFIX}"

    def uses_path(self, preset: str) -> Path:
        return self.path(preset).with_suffix(USES_SUFFIX)

    def info(self, preset: str) -> KeyInfo | None:
        """What is stored for ``preset`` (read from the header, nothing is decrypted), or None.

        CorruptKeyFile if the file is unreadable."""
        path = self.path(preset)
        if not path.exists():
            return None
        header = self._read(path, preset)
        return KeyInfo(header["preset"], header["fingerprint"], float(header["created"]), header["protection"])

    # --- operations ---

    def get_or_create(self, preset: str) -> he.ClientKey:
        with self._lock:
            if self.path(preset).exists():
                return self.load(preset)
            return self._create(preset)

    def load(self, preset: str) -> he.ClientKey:
        path = self.path(preset)
        with self._lock:
            try:
                st = path.stat()
            except FileNotFoundError:
                raise NoDeviceKey(f"there is no stored device key for preset {preset!r}; create one first") from None
            signature = (st.st_mtime_ns, st.st_size, st.st_ino)
            cached = self._cache.get(preset)
            if cached is not None and cached[0] == signature:
                return cached[1]
            key = self._open(path, preset)
            self._cache[preset] = (signature, key)
            return key

    def rotate(self, preset: str) -> he.ClientKey:
        """A new key replaces the stored one (the old file is overwritten atomically, even if it was corrupt)."""
        with self._lock:
            return self._create(preset)

    def rotating(self, preset: str) -> he.RotatingKey:
        """The device key behind a RotatingKey: when it has no decryptions left, a new device key is made, wrapped
        and stored like ``rotate`` does, and used from then on, so a generation never stops at the bound."""
        first = True

        def next_key() -> he.ClientKey:
            nonlocal first
            with self._lock:
                if first:
                    first = False
                    try:
                        key = self.get_or_create(preset)
                    except CorruptKeyFile:  # e.g. its count was edited: its true count is unknown, so replace it
                        return self._create(preset)
                    if key.can_reserve(1):
                        return key
                return self._create(preset)

        return he.RotatingKey(preset, new_key=next_key)

    def delete(self, preset: str) -> None:
        path = self.path(preset)
        with self._lock:
            self._cache.pop(preset, None)
            self._wraps.pop(preset, None)
            for p in (path, self.uses_path(preset)):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
            self._forget_wrapping_key(preset)

    # --- internals ---

    def _create(self, preset: str) -> he.ClientKey:
        path = self.path(preset)
        key = he.ClientKey(preset, exportable=True, on_use=self._record_use)
        header: dict = {
            "format": KEY_FORMAT,
            "preset": preset,
            "fingerprint": key.fingerprint,
            "created": float(self.clock()),
            "protection": "passphrase" if self._passphrase is not None else "keyring",
            "cipher": "AES-256-GCM",
            "spent": 0,
        }
        if self._passphrase is not None:
            salt = os.urandom(16)
            wrap, check = _scrypt(self._passphrase, salt, self.scrypt_n, SCRYPT_R, SCRYPT_P)
            header["kdf"] = {
                "name": "scrypt",
                "n": self.scrypt_n,
                "r": SCRYPT_R,
                "p": SCRYPT_P,
                "salt": _b64(salt),
                "check": _b64(check),
            }
        else:
            # one wrapping key per preset, kept across rotations: the file's atomic replace is then the only
            # commit point, and a crash mid-rotation cannot leave a file whose wrapping key was overwritten
            wrap = self._wrapping_key(preset, create=True)
        ensure_private_dir(self.dir, tighten_existing=True)
        self._write_wrapped(path, header, wrap, key)
        self._wraps[preset] = wrap
        try:
            self.uses_path(preset).unlink()  # a count file of the previous format
        except FileNotFoundError:
            pass
        if self._passphrase is not None:
            self._forget_wrapping_key(preset)  # a keyring wrapping key left from an earlier key is no longer used
        st = path.stat()
        self._cache[preset] = ((st.st_mtime_ns, st.st_size, st.st_ino), key)
        return key

    def _write_wrapped(self, path: Path, header: dict, wrap: bytes, key: he.ClientKey) -> None:
        """Encrypt the secret under ``wrap`` with a fresh nonce, the header (count included) as associated data."""
        header = {k: v for k, v in header.items() if k not in ("nonce", "ciphertext")}
        nonce = os.urandom(12)
        ciphertext = AESGCM(wrap).encrypt(nonce, key.export_secret(), _aad(header))
        header["nonce"], header["ciphertext"] = _b64(nonce), _b64(ciphertext)
        atomic_write(path, json.dumps(header, indent=1).encode("utf-8"), mode=0o600)

    def _record_use(self, key: he.ClientKey) -> None:
        """Persist how many decryptions the stored key has made or promised (before its ciphertexts leave)."""
        preset = key.preset.name
        with self._lock:
            path = self.path(preset)
            wrap = self._wraps.get(preset)
            if wrap is None or not path.exists():
                return  # deleted, or opened under another passphrase setting: nothing of this key to update
            header = self._read(path, preset)
            if header["fingerprint"] != key.fingerprint:
                return  # a key rotated away (still finishing its ciphertexts): never loaded again
            if header.get("spent", -1) >= key.spent:
                return
            self._write_wrapped(path, {**header, "spent": key.spent}, wrap, key)
            st = path.stat()
            self._cache[preset] = ((st.st_mtime_ns, st.st_size, st.st_ino), key)
            try:
                self.uses_path(preset).unlink()  # folded into the header from now on
            except FileNotFoundError:
                pass

    def _spent(self, preset: str, fingerprint: str) -> int:
        path = self.uses_path(preset)
        try:
            with open(path, "rb") as f:
                raw = f.read(4096)
        except FileNotFoundError:
            return 0
        except OSError as e:
            raise KeyStoreError(f"the usage record {path} cannot be read: {e.strerror or e}") from None
        try:
            record = json.loads(raw.decode("utf-8"))
            spent, owner = record["spent"], record["fingerprint"]
        except (UnicodeDecodeError, ValueError, TypeError, KeyError):
            raise CorruptKeyFile(path, "the record of its decryptions is unreadable") from None
        if isinstance(spent, bool) or not isinstance(spent, int) or spent < 0:
            raise CorruptKeyFile(path, "the record of its decryptions is not a count")
        return spent if owner == fingerprint else 0  # another key's record: left over from a rotation

    def _wrapping_key(self, preset: str, create: bool) -> bytes:
        name = WRAP_NAME.format(preset=preset)
        stored = self.secrets.get(name)  # KeyringUnavailable if the keyring cannot be used
        if stored is not None:
            try:
                wrap = base64.b64decode(stored.encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError):
                wrap = b""
            if len(wrap) == 32:
                return wrap
            if not create:
                raise MissingWrappingKey(
                    f"the OS keyring entry {name!r} is not a valid wrapping key; the device key for preset "
                    f"{preset!r} cannot be opened: rotate or delete it"
                )
        elif not create:
            raise MissingWrappingKey(
                f"the OS keyring ({self.secrets.backend_name}) no longer holds the wrapping key {name!r}, so the "
                f"device key for preset {preset!r} cannot be opened (was the keyring reset?): rotate or delete it"
            )
        wrap = os.urandom(32)
        self.secrets.set(name, _b64(wrap))
        return wrap

    def _forget_wrapping_key(self, preset: str) -> None:
        try:
            self.secrets.delete(WRAP_NAME.format(preset=preset))
        except KeyringUnavailable:
            pass  # nothing reachable to remove; without its file the wrapping key protects nothing

    def _read(self, path: Path, preset: str) -> dict:
        try:
            with open(path, "rb") as f:
                raw = f.read(_MAX_KEY_FILE + 1)
        except OSError as e:
            raise KeyStoreError(f"the device key file {path} cannot be read: {e.strerror or e}") from None
        if len(raw) > _MAX_KEY_FILE:
            raise CorruptKeyFile(path, "the file is far too large")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise CorruptKeyFile(path, "not a JSON key file") from None
        if not isinstance(header, dict):
            raise CorruptKeyFile(path, "not a JSON object")
        if header.get("format") != KEY_FORMAT:
            raise CorruptKeyFile(path, f"unknown format {header.get('format')!r}, expected {KEY_FORMAT!r}")
        if header.get("preset") != preset:
            raise CorruptKeyFile(path, f"it holds preset {header.get('preset')!r}, not {preset!r}")
        if header.get("protection") not in ("keyring", "passphrase"):
            raise CorruptKeyFile(path, f"unknown protection {header.get('protection')!r}")
        if not isinstance(header.get("fingerprint"), str) or not header["fingerprint"]:
            raise CorruptKeyFile(path, "the fingerprint is missing")
        created = header.get("created")
        if isinstance(created, bool) or not isinstance(created, (int, float)):
            raise CorruptKeyFile(path, "the creation time is missing")
        if header.get("cipher") != "AES-256-GCM":
            raise CorruptKeyFile(path, f"unknown cipher {header.get('cipher')!r}")
        return header

    def _kdf_params(self, header: dict, path: Path) -> tuple[bytes, bytes, int, int, int]:
        kdf = header.get("kdf")
        if not isinstance(kdf, dict) or kdf.get("name") != "scrypt":
            raise CorruptKeyFile(path, "the passphrase KDF parameters are missing")
        n, r, p = kdf.get("n"), kdf.get("r"), kdf.get("p")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, r, p)):
            raise CorruptKeyFile(path, "the scrypt parameters are not integers")
        if (
            n < 2**10
            or n & (n - 1)
            or not 1 <= r <= 32
            or not 1 <= p <= 16
            or 128 * n * r > _SCRYPT_MAX_MEMORY
            or n * r * p > _SCRYPT_MAX_WORK
        ):
            raise CorruptKeyFile(
                path,
                f"scrypt parameters n={n}, r={r}, p={p} are out of range (at most {_SCRYPT_MAX_MEMORY >> 20} MiB "
                f"and n*r*p <= {_SCRYPT_MAX_WORK}, 4x this app's default)",
            )
        salt = _unb64(kdf.get("salt"), "the salt", path)
        if len(salt) < 16:
            raise CorruptKeyFile(path, "the salt is too short")
        check = _unb64(kdf.get("check"), "the passphrase check", path, 32)
        return salt, check, n, r, p

    def _open(self, path: Path, preset: str) -> he.ClientKey:
        header = self._read(path, preset)
        nonce = _unb64(header.get("nonce"), "the nonce", path, 12)
        ciphertext = _unb64(header.get("ciphertext"), "the ciphertext", path)
        if header["protection"] == "passphrase":
            salt, check, n, r, p = self._kdf_params(header, path)
            if self._passphrase is None:
                raise PassphraseRequired(
                    f"the device key for preset {preset!r} is protected with a passphrase; enter it on the Keys tab"
                )
            wrap, got = _scrypt(self._passphrase, salt, n, r, p)
            if not hmac.compare_digest(got, check):
                raise WrongPassphrase(f"wrong passphrase for the device key of preset {preset!r} ({path})")
        else:
            if "kdf" in header:
                raise CorruptKeyFile(path, "a keyring-protected file carries passphrase parameters")
            wrap = self._wrapping_key(preset, create=False)
        try:
            secret = AESGCM(wrap).decrypt(nonce, ciphertext, _aad(header))
        except InvalidTag:
            why = "authentication failed" + (
                "" if header["protection"] == "passphrase" else " (or the keyring's wrapping key does not match it)"
            )
            raise CorruptKeyFile(path, why) from None
        spent = header.get("spent")
        if spent is None:  # previous format: the count lived in <preset>.uses
            spent = self._spent(preset, header["fingerprint"])
        elif isinstance(spent, bool) or not isinstance(spent, int) or spent < 0:
            raise CorruptKeyFile(path, "the record of its decryptions is not a count")
        try:
            key = he.ClientKey(preset, secret=secret, spent=spent, on_use=self._record_use)
        except he.HEError as e:
            raise CorruptKeyFile(path, f"the decrypted key is unusable: {e}") from None
        if key.fingerprint != header["fingerprint"]:
            raise CorruptKeyFile(path, "the key does not match the fingerprint in the header")
        self._wraps[preset] = wrap
        return key
