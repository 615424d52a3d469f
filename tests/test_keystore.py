"""The OS keyring wrapper (SecretStore) and the wrapped CKKS device keys (DeviceKeys)."""

from __future__ import annotations

import base64
import json
import os
import stat

import keyring
import keyring.backend
import keyring.errors
import numpy as np
import pytest
from keyring.backends import fail, null

from hediff.common import he
from hediff.desktop.core.keystore import (
    SCRYPT_N,
    CorruptKeyFile,
    DeviceKeys,
    KeyringUnavailable,
    KeyStoreError,
    MemoryKeyring,
    MissingWrappingKey,
    NoDeviceKey,
    PassphraseRequired,
    SecretStore,
    WrongPassphrase,
    keyring_advice,
    no_keyring_message,
)

FAST_N = 2**12  # scrypt cost for most tests; one test checks the real default


@pytest.fixture
def store() -> SecretStore:
    return SecretStore(MemoryKeyring())


@pytest.fixture
def keys(tmp_path, store) -> DeviceKeys:
    return DeviceKeys(tmp_path, store, scrypt_n=FAST_N)


def _all_bytes(root) -> list[tuple[str, bytes]]:
    return [(str(p), p.read_bytes()) for p in root.rglob("*") if p.is_file()]


def _rewrite(path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# --- SecretStore ---------------------------------------------------------------------------------------------


def test_memory_keyring_is_never_auto_selected():
    assert not MemoryKeyring.viable
    assert MemoryKeyring not in set(keyring.backend.KeyringBackend.get_viable_backends())
    assert not any(isinstance(b, MemoryKeyring) for b in keyring.backend.get_all_keyring())
    assert not isinstance(keyring.get_keyring(), MemoryKeyring)
    assert "in memory" in str(MemoryKeyring())


def test_secret_store_roundtrip(store):
    assert store.available and store.unavailable_reason == ""
    assert store.get("server-token:a") is None
    store.set("server-token:a", "hdt_secret")
    assert store.get("server-token:a") == "hdt_secret"
    assert store.backend.get_password("hediff", "server-token:a") == "hdt_secret"  # service "hediff"
    store.delete("server-token:a")
    store.delete("server-token:a")  # deleting what is not there is fine
    assert store.get("server-token:a") is None
    with pytest.raises(ValueError):
        store.set("x", "")


@pytest.mark.parametrize("backend", [fail.Keyring(), null.Keyring()], ids=["fail", "null"])
def test_unavailable_backends_refuse_with_advice(backend):
    s = SecretStore(backend)
    assert not s.available
    assert "passphrase" in s.unavailable_reason and "Keys tab" in s.unavailable_reason
    for call in (lambda: s.set("n", "v"), lambda: s.get("n"), lambda: s.delete("n")):
        with pytest.raises(KeyringUnavailable) as e:
            call()
        assert str(e.value) == s.unavailable_reason


def test_advice_names_the_platform_keyring():
    assert keyring_advice("linux") == "start or unlock your desktop's keyring (GNOME Keyring or KWallet)"
    assert "Keychain" in keyring_advice("darwin")
    assert "Credential Manager" in keyring_advice("win32")
    assert str(KeyringUnavailable("x", platform="linux")) == (
        "No usable system keyring (x). To fix: start or unlock your desktop's keyring (GNOME Keyring or KWallet), "
        "then try again. Meanwhile API tokens cannot be saved; device keys can use a passphrase instead (Keys tab)."
    )


class _Raising(keyring.backend.KeyringBackend):
    """A backend that is only ever used explicitly here (its priority raises, so keyring never selects it)."""

    class _P:
        def __get__(self, obj, owner):
            raise RuntimeError("no D-Bus session")

    priority = _P()

    def get_password(self, service, username):
        return None

    def set_password(self, service, username, password):
        pass


class _Negative(_Raising):
    priority = -5  # a plain class attribute reads like keyring's classproperty


def test_backends_with_raising_or_negative_priority_are_unavailable():
    s = SecretStore(_Raising())
    assert not s.available and "no D-Bus session" in s.unavailable_reason
    assert not SecretStore(_Negative()).available


def test_locked_keyring_detected_when_checked_and_when_used():
    assert not SecretStore(MemoryKeyring(locked=True)).available

    backend = MemoryKeyring()
    s = SecretStore(backend)
    assert s.available
    backend.locked = True  # locked after the first check: found out at use time
    with pytest.raises(KeyringUnavailable, match="locked"):
        s.get("n")
    assert not s.available and "locked" in s.unavailable_reason
    backend.locked = False
    assert s.refresh() and s.available


def test_use_time_keyring_errors_become_keyring_unavailable():
    class Broken(MemoryKeyring):
        def set_password(self, service, username, password):
            raise keyring.errors.InitError("Failed to unlock the collection!")

    s = SecretStore(Broken())
    assert s.available  # reading works, so the probe passes
    with pytest.raises(KeyringUnavailable, match="Failed to unlock") as e:
        s.set("n", "v")
    # what the user reads: the cause, then this platform's advice (the Secret Service on Linux)
    assert str(e.value) == no_keyring_message("the keyring could not be opened: Failed to unlock the collection!")
    assert str(e.value).startswith("No usable system keyring (the keyring could not be opened: Failed to unlock")
    assert keyring_advice() in str(e.value)
    assert not s.available  # remembered until refresh()

    class Refusing(MemoryKeyring):
        def set_password(self, service, username, password):
            raise keyring.errors.PasswordSetError("refused")

    s = SecretStore(Refusing())
    with pytest.raises(KeyringUnavailable, match="refused"):
        s.set("n", "v")


# --- DeviceKeys with the keyring -----------------------------------------------------------------------------


def test_device_key_create_load_and_file_format(tmp_path, store, keys):
    assert keys.info("fast") is None
    key = keys.get_or_create("fast")
    path = tmp_path / "keys" / "fast.hdkey"
    assert path.is_file()
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["fast.hdkey"]  # no temp files left behind

    info = keys.info("fast")
    assert (info.preset, info.fingerprint, info.protection) == ("fast", key.fingerprint, "keyring")
    header = json.loads(path.read_text())
    assert header["format"] == "hediff-device-key/1" and "kdf" not in header
    assert len(base64.b64decode(header["nonce"])) == 12
    wrap = base64.b64decode(store.get("device-key-wrap:fast"), validate=True)
    assert len(wrap) == 32

    assert keys.get_or_create("fast") is key  # cached while the file is unchanged
    again = DeviceKeys(tmp_path, store).load("fast")  # a fresh instance decrypts the file
    assert again.fingerprint == key.fingerprint and again.export_secret() == key.export_secret()
    x = np.linspace(-1, 1, 100)
    assert np.allclose(again.decrypt(key.encrypt(x), x.size), x, atol=1e-5)


def test_secret_key_never_on_disk_unwrapped(tmp_path, store, keys):
    secret = keys.get_or_create("fast").export_secret()
    keys.set_passphrase("correct horse")
    keys.rotate("fast")
    secret2 = keys.load("fast").export_secret()
    files = _all_bytes(tmp_path)
    assert files
    for blob in (secret, secret2):
        probes = [blob[i : i + 48] for i in range(0, len(blob) - 48, len(blob) // 7)]
        probes += [base64.b64encode(blob)[:64], base64.b64encode(blob[1:])[:64], base64.b64encode(blob[2:])[:64]]
        for name, data in files:
            assert not any(p in data for p in probes), name


def test_tampered_key_file_is_corrupt_and_named(tmp_path, keys):
    keys.get_or_create("fast")
    path = tmp_path / "keys" / "fast.hdkey"
    original = path.read_text()
    header = json.loads(original)
    ct = bytearray(base64.b64decode(header["ciphertext"]))
    ct[100] ^= 1
    _rewrite(path, ciphertext=base64.b64encode(bytes(ct)).decode())
    with pytest.raises(CorruptKeyFile) as e:
        DeviceKeys(tmp_path, keys.secrets).load("fast")
    assert str(path) in str(e.value) and e.value.path == path and isinstance(e.value, KeyStoreError)

    for change in ({"fingerprint": "0" * 20}, {"created": 1.0}, {"preset": "paper"}, {"format": "v2"}):
        path.write_text(original)
        _rewrite(path, **change)
        with pytest.raises(CorruptKeyFile, match="fast.hdkey"):
            DeviceKeys(tmp_path, keys.secrets).load("fast")
    for text in ("not json", "[]", ""):
        path.write_text(text)
        with pytest.raises(CorruptKeyFile, match="fast.hdkey"):
            keys.info("fast")


def test_swapped_header_does_not_decrypt(tmp_path, store):
    """Two keys wrapped under the same wrapping key: one's header with the other's ciphertext fails."""
    a = DeviceKeys(tmp_path / "a", store, clock=lambda: 1000.0)
    b = DeviceKeys(tmp_path / "b", store, clock=lambda: 2000.0)
    a.get_or_create("fast")
    b.get_or_create("fast")  # reuses the keyring's wrapping key for "fast"
    pa, pb = tmp_path / "a" / "keys" / "fast.hdkey", tmp_path / "b" / "keys" / "fast.hdkey"
    body = json.loads(pa.read_text())
    _rewrite(pb, nonce=body["nonce"], ciphertext=body["ciphertext"])
    with pytest.raises(CorruptKeyFile, match="authentication failed"):
        DeviceKeys(tmp_path / "b", store).load("fast")
    # a file copied to another preset's name is refused before decryption
    (tmp_path / "a" / "keys" / "paper.hdkey").write_text(pa.read_text())
    with pytest.raises(CorruptKeyFile, match="paper.hdkey"):
        a.load("paper")


def test_missing_wrapping_key(tmp_path, store, keys):
    keys.get_or_create("fast")
    store.delete("device-key-wrap:fast")
    with pytest.raises(MissingWrappingKey, match="device-key-wrap:fast"):
        DeviceKeys(tmp_path, store).load("fast")
    store.set("device-key-wrap:fast", "not base64!")
    with pytest.raises(MissingWrappingKey):
        DeviceKeys(tmp_path, store).load("fast")


def test_rotate_and_delete(tmp_path, store, keys):
    old = keys.get_or_create("fast")
    new = keys.rotate("fast")
    assert new.fingerprint != old.fingerprint
    assert DeviceKeys(tmp_path, store).load("fast").fingerprint == new.fingerprint
    assert keys.info("fast").fingerprint == new.fingerprint
    assert [p.name for p in (tmp_path / "keys").iterdir()] == ["fast.hdkey"]

    (tmp_path / "keys" / "fast.hdkey").write_text("garbage")  # rotating replaces even a corrupt file
    assert keys.rotate("fast").fingerprint == keys.info("fast").fingerprint

    keys.delete("fast")
    assert keys.info("fast") is None and not (tmp_path / "keys" / "fast.hdkey").exists()
    assert store.get("device-key-wrap:fast") is None
    with pytest.raises(NoDeviceKey):
        keys.load("fast")
    keys.delete("fast")  # again: fine
    with pytest.raises(he.HEError):
        keys.get_or_create("nope")


def test_no_keyring_needs_an_explicit_passphrase(tmp_path):
    keys = DeviceKeys(tmp_path, SecretStore(fail.Keyring()), scrypt_n=FAST_N)
    with pytest.raises(KeyringUnavailable, match="passphrase"):
        keys.get_or_create("fast")
    assert not (tmp_path / "keys" / "fast.hdkey").exists()


# --- DeviceKeys with a passphrase ----------------------------------------------------------------------------


def test_passphrase_protection(tmp_path):
    secrets = SecretStore(fail.Keyring())  # a machine without a keyring
    keys = DeviceKeys(tmp_path, secrets, passphrase="correct horse", scrypt_n=FAST_N)
    key = keys.get_or_create("fast")
    info = keys.info("fast")
    assert info.protection == "passphrase" and info.fingerprint == key.fingerprint
    header = json.loads((tmp_path / "keys" / "fast.hdkey").read_text())
    assert header["kdf"]["name"] == "scrypt" and header["kdf"]["n"] == FAST_N
    assert (header["kdf"]["r"], header["kdf"]["p"]) == (8, 1)

    assert DeviceKeys(tmp_path, secrets, passphrase="correct horse").load("fast").fingerprint == key.fingerprint
    with pytest.raises(PassphraseRequired, match="passphrase"):
        DeviceKeys(tmp_path, secrets).load("fast")
    with pytest.raises(WrongPassphrase, match="wrong passphrase"):
        DeviceKeys(tmp_path, secrets, passphrase="battery staple").load("fast")

    path = tmp_path / "keys" / "fast.hdkey"
    ct = bytearray(base64.b64decode(header["ciphertext"]))
    ct[-1] ^= 0x80
    _rewrite(path, ciphertext=base64.b64encode(bytes(ct)).decode())
    with pytest.raises(CorruptKeyFile, match="fast.hdkey"):
        DeviceKeys(tmp_path, secrets, passphrase="correct horse").load("fast")
    _rewrite(path, ciphertext=header["ciphertext"], protection="keyring")  # header swapped to keyring mode
    with pytest.raises(CorruptKeyFile, match="passphrase parameters"):
        DeviceKeys(tmp_path, SecretStore(MemoryKeyring()), passphrase="correct horse").load("fast")
    path.write_text(json.dumps({**header, "kdf": {**header["kdf"], "n": 2**40}}))
    with pytest.raises(CorruptKeyFile, match="out of range"):
        DeviceKeys(tmp_path, secrets, passphrase="correct horse").load("fast")
    with pytest.raises(ValueError):
        keys.set_passphrase("")


def test_default_scrypt_cost(tmp_path, store):
    keys = DeviceKeys(tmp_path, store, passphrase="pw")
    keys.get_or_create("fast")
    assert json.loads((tmp_path / "keys" / "fast.hdkey").read_text())["kdf"]["n"] == SCRYPT_N == 2**17
    assert DeviceKeys(tmp_path, store, passphrase="pw").load("fast").fingerprint == keys.info("fast").fingerprint


def test_switching_protection_on_rotate(tmp_path, store, keys):
    keys.get_or_create("fast")
    assert store.get("device-key-wrap:fast") is not None
    keys.set_passphrase("pw")
    keys.rotate("fast")
    assert keys.info("fast").protection == "passphrase"
    assert store.get("device-key-wrap:fast") is None  # the unused wrapping key is removed
    keys.set_passphrase(None)
    keys.rotate("fast")
    assert keys.info("fast").protection == "keyring"
    assert DeviceKeys(tmp_path, store).load("fast").fingerprint == keys.info("fast").fingerprint
