"""CKKS (Microsoft SEAL, as shipped in TenSEAL): parameter presets, client keys, packing, the server's update.

Three choices, each measured (bench/he_step.py, docs/performance.md):
- The server never needs a key: it only adds plaintext vectors to ciphertexts (and, with the ``paper`` preset,
  multiplies them by a public scalar). Its evaluation context carries the parameters and nothing else, not
  even the public key, so the client encrypts with the secret key (symmetric CKKS: half the encryption cost
  and smaller fresh noise than public-key encryption).
- Every coefficient of the update is real, so real and imaginary parts of a slot evolve independently: each
  ciphertext carries two latent values per complex slot (N values for ring degree N, not N/2). That halves
  the ciphertexts, the bytes and every per-ciphertext cost.
- Encryptions of zero do not depend on the message: ``ClientKey.prepare`` makes them ahead of time (while the
  server works) and ``encrypt`` only adds the encoded values on the critical path. Each is used once.
- Decryptions reach the server (through the activations of the next step), and exact CKKS decryptions give
  away the secret key (Li-Micciancio). So every decryption is noise-flooded (common/flooding.py), every key
  decrypts at most ``max_decryptions`` ciphertexts, and ``RotatingKey`` switches to a fresh key before that,
  which the server never notices: it holds no key material. docs/key-recovery.md has the argument and numbers.

TenSEAL's own CKKSVector encodes real values only, so keys and ciphertexts are handled through its bundled SEAL
API; TenSEAL's serialisation is kept for the parameter-only context that the server checks.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import math
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tenseal as ts
from tenseal import sealapi

from hediff.common import flooding
from hediff.common.errors import CryptoError

_KEYLESS = {"save_public_key": False, "save_secret_key": False, "save_galois_keys": False, "save_relin_keys": False}
_SEAL_ERRORS = (ValueError, RuntimeError, TypeError, OverflowError)


class HEError(CryptoError, ValueError):
    """A context or ciphertext that cannot be used; the message says what is wrong."""


class SecretKeyInContextError(HEError):
    pass


class DecryptionLimitError(CryptoError, RuntimeError):
    """A key was asked to decrypt more ciphertexts than its bound allows; the message names the bound.

    Not an HEError: nothing is wrong with the ciphertext or with what the server sent, the key is used up."""


# Each ciphertext a client makes is decrypted at most twice: once as the pivot of its own step and, for PLMS's
# second call, once more (checked for every sampler in tests/test_key_recovery.py). Keys reserve that much.
DECRYPTIONS_PER_CIPHERTEXT = 2
# Safety factor on the measured decryption error before it becomes the bound B the flood is sized from.
ERROR_MARGIN = 2.0


@dataclass(frozen=True)
class HEPreset:
    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    # True: the server computes a_p * Enc(x) + b (depth 1, as the paper). False: the server only adds
    # b / a_p and the client multiplies by a_p after decrypting (depth 0, so the smallest parameters do).
    server_multiplies: bool
    description: str
    # RMS error of one decrypted value after the server's update, measured by ``python -m bench.flooding
    # --measure-error``; the most ciphertexts one key may decrypt (Q); the flood's kappa (common/flooding.py).
    # docs/key-recovery.md has the measurements and the reasons for each choice.
    decryption_error_rms: float
    max_decryptions: int
    flood_kappa: float

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def values_per_ciphertext(self) -> int:
        return 2 * self.slots  # real and imaginary part of every slot

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    def ciphertexts_for(self, n_values: int) -> int:
        return -(-n_values // self.values_per_ciphertext)

    @property
    def decryption_error_norm(self) -> float:
        """B: a bound on the L2 norm of one ciphertext's decryption error over all its values, margin included."""
        return ERROR_MARGIN * self.decryption_error_rms * math.sqrt(self.values_per_ciphertext)

    def flood_sigma(self, max_decryptions: int | None = None, kappa: float | None = None) -> float:
        """The flood for a key that decrypts at most ``max_decryptions`` ciphertexts (see common/flooding.py)."""
        return flooding.flood_sigma(
            self.decryption_error_norm,
            self.max_decryptions if max_decryptions is None else max_decryptions,
            self.flood_kappa if kappa is None else kappa,
        )


PRESETS: dict[str, HEPreset] = {
    "fast": HEPreset(
        name="fast",
        poly_modulus_degree=4096,
        coeff_mod_bit_sizes=(60, 49),
        scale_bits=40,
        server_multiplies=False,
        description="N=4096, q=[60,49] (109 bits, 128-bit security), scale 2^40; server adds only",
        decryption_error_rms=1.4e-10,
        max_decryptions=64,
        flood_kappa=6,
    ),
    "paper": HEPreset(
        name="paper",
        poly_modulus_degree=8192,
        coeff_mod_bit_sizes=(31, 26, 26, 26, 26, 26, 26, 31),
        scale_bits=26,
        server_multiplies=True,
        description="the paper's N=8192, q=[31,26x6,31] (218 bits), scale 2^26; server multiplies and adds",
        decryption_error_rms=2.1e-5,
        max_decryptions=2,
        flood_kappa=-4,
    ),
}
DEFAULT_PRESET = "fast"


def get_preset(name: str) -> HEPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise HEError(f"unknown HE preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def _new_context(preset: HEPreset) -> ts.Context:
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS, preset.poly_modulus_degree, coeff_mod_bit_sizes=list(preset.coeff_mod_bit_sizes)
    )
    ctx.global_scale = preset.scale
    return ctx


_reference_params: dict[str, bytes] = {}
_reference_lock = threading.Lock()


def preset_parameter_bytes(preset: HEPreset) -> bytes:
    """The keyless serialisation of a fresh context of this preset: what a valid evaluation context must equal."""
    with _reference_lock:
        if preset.name not in _reference_params:
            _reference_params[preset.name] = _new_context(preset).serialize(**_KEYLESS)
        return _reference_params[preset.name]


_seal_contexts: dict[str, object] = {}


def _seal_context(preset: HEPreset):
    """SEAL's precomputed tables for a preset (parameters only, immutable, shared): ~15 ms to build, so once."""
    with _reference_lock:
        if preset.name not in _seal_contexts:
            parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
            parms.set_poly_modulus_degree(preset.poly_modulus_degree)
            parms.set_coeff_modulus(
                sealapi.CoeffModulus.Create(preset.poly_modulus_degree, list(preset.coeff_mod_bit_sizes))
            )
            _seal_contexts[preset.name] = sealapi.SEALContext(parms, True, sealapi.SEC_LEVEL_TYPE.TC128)
        return _seal_contexts[preset.name]


# --- ciphertexts on the wire ---------------------------------------------------------------------------------

SCRATCH_PREFIX = "hediff-ct-"


def _scratch_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


@contextlib.contextmanager
def _scratch_file():
    """A private file for one SEAL path-only save/load (in RAM where /dev/shm exists), deleted right after.

    Only ciphertexts pass through it, never key material. The name carries the pid, so a later process can remove
    what a crashed one left (``remove_stale_scratch_files``).
    """
    fd, path = tempfile.mkstemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=_scratch_dir())
    os.close(fd)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def remove_stale_scratch_files(include_own: bool = False) -> int:
    """Delete ciphertext scratch files whose process is gone (and this process's, if ``include_own``)."""
    removed = 0
    folder = _scratch_dir()
    try:
        names = [n for n in os.listdir(folder) if n.startswith(SCRATCH_PREFIX)]
    except OSError:
        return 0
    for name in names:
        path = os.path.join(folder, name)
        pid_text = name[len(SCRATCH_PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit():
            pid = int(pid_text)
            if (pid == os.getpid() and not include_own) or (pid != os.getpid() and _process_alive(pid)):
                continue
        else:  # an older version's per-thread file (no pid): remove only once it has been idle for an hour
            with contextlib.suppress(OSError):
                if time.time() - os.path.getmtime(path) < 3600:
                    continue
        try:
            os.unlink(path)
            removed += 1
        except OSError:
            pass
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class Ciphertext:
    """One SEAL ciphertext holding up to ``values_per_ciphertext`` latent values."""

    __slots__ = ("seal",)

    def __init__(self, seal_ct: sealapi.Ciphertext):
        self.seal = seal_ct

    def serialize(self) -> bytes:
        with _scratch_file() as path:
            self.seal.save(path)
            with open(path, "rb") as f:
                return f.read()

    @classmethod
    def load(cls, seal_context, blob: bytes) -> Ciphertext:
        """SEAL validates the data against the context on load; anything else is refused with HEError."""
        if not isinstance(blob, (bytes, bytearray)) or len(blob) < 16:
            raise HEError("not a ciphertext for this session's parameters: too short")
        ct = sealapi.Ciphertext()
        with _scratch_file() as path:
            with open(path, "wb") as f:
                f.write(blob)
            try:
                ct.load(seal_context, path)
            except _SEAL_ERRORS as e:
                raise HEError(f"not a ciphertext for this session's parameters: {e}") from None
        if ct.size() != 2:
            raise HEError(f"ciphertext has {ct.size()} polynomials, expected 2")
        return cls(ct)


def serialize_ciphertexts(cts: list[Ciphertext]) -> list[bytes]:
    return [ct.serialize() for ct in cts]


def _rows(values: np.ndarray, n_rows: int, width: int) -> np.ndarray:
    padded = np.zeros(n_rows * width)
    padded[: values.size] = values
    return padded.reshape(n_rows, width)


def _as_slots(row: np.ndarray) -> list[complex]:
    half = row.size // 2
    return (row[:half] + 1j * row[half:]).tolist()


_SECRET_ONLY = {"save_public_key": False, "save_secret_key": True, "save_galois_keys": False, "save_relin_keys": False}


class ClientKey:
    """A CKKS secret key. Lives only on the client; nothing here writes it anywhere.

    ``ClientKey(preset)`` makes a throwaway key (the fastest way; ``RotatingKey`` makes them as it needs them).
    ``exportable=True`` makes one whose secret can be exported as bytes (in memory, for wrapping and storage
    by the caller); ``ClientKey(preset, secret=blob)`` loads such bytes back.

    Every decryption is flooded with Gaussian noise of ``flood_sigma`` (``flooding=False`` turns that off, for
    tests and for demonstrating the attack) and the key refuses to decrypt more than ``max_decryptions``
    ciphertexts in all (``spent``: how many a stored key has already used or promised). ``on_use`` is called with
    the key after every encryption (which reserves the later decryptions of its ciphertexts) before the
    ciphertexts are returned, and after every decryption: a stored key persists ``spent`` there.
    """

    def __init__(
        self,
        preset: HEPreset | str = DEFAULT_PRESET,
        *,
        secret: bytes | None = None,
        exportable: bool = False,
        flooding: bool = True,
        kappa: float | None = None,
        max_decryptions: int | None = None,
        spent: int = 0,
        on_use: Callable[[ClientKey], None] | None = None,
    ):
        self.preset = get_preset(preset) if isinstance(preset, str) else preset
        max_decryptions = self.preset.max_decryptions if max_decryptions is None else max_decryptions
        if not isinstance(max_decryptions, int) or max_decryptions < 1:
            raise ValueError(f"max_decryptions must be a positive integer, got {max_decryptions!r}")
        if not isinstance(spent, int) or spent < 0:
            raise ValueError(f"spent must be a non-negative integer, got {spent!r}")
        self._seal = _seal_context(self.preset)
        self._secret_blob: bytes | None = None
        if secret is not None:
            secret_key = self._load_secret(secret)
            self._secret_blob = bytes(secret)
        elif exportable:
            ctx = _new_context(self.preset)
            self._secret_blob = ctx.serialize(**_SECRET_ONLY)
            secret_key = ctx.secret_key().data
        else:
            secret_key = sealapi.KeyGenerator(self._seal).secret_key()  # no public, relinearisation or Galois keys
        self.fingerprint = (
            hashlib.sha256(b"hediff/key-fingerprint/v1\0" + self._secret_blob).hexdigest()[:20]
            if self._secret_blob is not None
            else "ephemeral-" + secrets.token_hex(6)
        )
        self._encryptor = sealapi.Encryptor(self._seal, secret_key)
        self._decryptor = sealapi.Decryptor(self._seal, secret_key)
        self._encoder = sealapi.CKKSEncoder(self._seal)
        self._evaluator = sealapi.Evaluator(self._seal)
        self._zero = sealapi.Plaintext()
        self._encoder.encode(0.0, self.preset.scale, self._zero)
        self._zeros: collections.deque[sealapi.Ciphertext] = collections.deque()
        self._zeros_lock = threading.Lock()
        self.max_decryptions = max_decryptions
        self.flood_sigma = self.preset.flood_sigma(max_decryptions, kappa) if flooding else 0.0
        self.decryptions = spent
        self.reserved = spent  # decryptions made or promised to ciphertexts already handed out
        self._on_use = on_use

    def _load_secret(self, blob: bytes):
        try:
            ctx = ts.context_from(bytes(blob))
        except _SEAL_ERRORS as e:
            raise HEError(f"stored key material could not be read: {e}") from None
        if not ctx.is_private():
            raise HEError("stored key material holds no secret key")
        if ctx.serialize(**_KEYLESS) != preset_parameter_bytes(self.preset):
            raise HEError(f"stored key material is not for preset {self.preset.name!r}")
        return ctx.secret_key().data

    def export_secret(self) -> bytes:
        """The secret key as bytes, for the caller to wrap before it goes anywhere. Never write these as they are."""
        if self._secret_blob is None:
            raise HEError("this key was made as a throwaway key; create it with exportable=True to store it")
        return self._secret_blob

    @property
    def slots(self) -> int:
        return self.preset.slots

    def evaluation_context(self) -> bytes:
        """Parameters only: no secret, public, relinearisation or Galois key (the same bytes for every key)."""
        return preset_parameter_bytes(self.preset)

    def can_reserve(self, n_ciphertexts: int) -> bool:
        """Whether ``n_ciphertexts`` more ciphertexts can be made and each later decrypted as often as allowed."""
        return self.reserved + DECRYPTIONS_PER_CIPHERTEXT * n_ciphertexts <= self.max_decryptions

    def prepare(self, n_ciphertexts: int) -> None:
        """Top up the pool of fresh encryptions of zero to ``n_ciphertexts``."""
        while True:
            with self._zeros_lock:
                if len(self._zeros) >= n_ciphertexts:
                    return
            self._zeros.append(self._fresh_zero_now())

    def _fresh_zero_now(self) -> sealapi.Ciphertext:
        ct = sealapi.Ciphertext()
        self._encryptor.encrypt_symmetric(self._zero, ct)
        return ct

    def _fresh_zero(self) -> sealapi.Ciphertext:
        with self._zeros_lock:
            if self._zeros:
                return self._zeros.popleft()
        return self._fresh_zero_now()

    def encrypt(self, values: np.ndarray) -> list[Ciphertext]:
        """Pack a 1-D array into as few ciphertexts as possible (the last one zero-padded)."""
        values = _finite_values(values)
        n = self.preset.ciphertexts_for(values.size)
        cts = []
        for row in _rows(values, n, self.preset.values_per_ciphertext):
            ct = self._fresh_zero()
            plain = sealapi.Plaintext()
            self._encoder.encode(_as_slots(row), ct.parms_id(), ct.scale, plain)
            self._evaluator.add_plain_inplace(ct, plain)
            cts.append(Ciphertext(ct))
        # a plain ClientKey may be over-reserved (it only refuses at decryption); RotatingKey checks first
        self.reserved += DECRYPTIONS_PER_CIPHERTEXT * n
        self.notify_use()
        return cts

    def notify_use(self) -> None:
        if self._on_use is not None:
            self._on_use(self)

    @property
    def spent(self) -> int:
        """Decryptions made or promised: what a stored key must remember across sessions."""
        return max(self.reserved, self.decryptions)

    def decrypt(self, ciphertexts: list[Ciphertext], n_values: int) -> np.ndarray:
        if len(ciphertexts) != self.preset.ciphertexts_for(n_values):
            raise HEError(f"{len(ciphertexts)} ciphertexts cannot hold exactly {n_values} values")
        if not ciphertexts:
            return np.zeros(0)
        self.check_budget(len(ciphertexts))
        out = np.concatenate([self.reveal(self.decode(ct)) for ct in ciphertexts])[:n_values]
        self.notify_use()
        return out

    def check_budget(self, n_ciphertexts: int) -> None:
        if self.decryptions + n_ciphertexts > self.max_decryptions:
            raise DecryptionLimitError(
                f"this key may decrypt at most {self.max_decryptions} ciphertexts (a bound that keeps its noise "
                f"flooding sound against key recovery); it has decrypted {self.decryptions} and {n_ciphertexts} "
                "more were asked for: rotate the key (RotatingKey does so by itself)"
            )

    def decode(self, ct: Ciphertext) -> np.ndarray:
        """The exact decryption of one ciphertext (all its values, unflooded, uncounted): never let it leave."""
        plain = sealapi.Plaintext()
        self._decryptor.decrypt(ct.seal, plain)
        z = np.asarray(self._encoder.decode_complex(plain))
        return np.concatenate([z.real, z.imag])

    def reveal(self, decoded: np.ndarray) -> np.ndarray:
        """A decoded ciphertext, flooded and counted: what a caller may pass on (``check_budget`` first)."""
        self.decryptions += 1
        return flooding.flood(decoded, self.flood_sigma)

    def deserialize(self, blobs: list[bytes]) -> list[Ciphertext]:
        return [Ciphertext.load(self._seal, b) for b in blobs]


def _finite_values(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(values)):
        raise HEError("refusing to encrypt NaN or infinite values")
    return values


# A ciphertext decrypted under a key it was not made under decodes to values uniform modulo q; under the right
# key to the latent (|x| well below 1e4). The gap is at least 2^10 for both presets.
_WRONG_KEY_GAP_BITS = 10


class RotatingKey:
    """Secret keys that change before any of them exceeds its decryption bound, behind ClientKey's interface.

    The server holds no key material (only the parameters), so the client can switch keys at any step without
    telling it. Each ciphertext reserves ``DECRYPTIONS_PER_CIPHERTEXT`` decryptions on the key that makes it; a
    key whose reservations would pass ``max_decryptions`` is retired and ``new_key()`` makes the next one.
    Retired keys are kept for the ciphertexts still in flight (the last ``retain_calls`` encryptions): a
    returned ciphertext is matched to the key that made it by decoding it (the right key gives latent-sized
    values, any other gives values uniform modulo q), trying the key that made the same position last first.
    """

    def __init__(
        self,
        preset: HEPreset | str = DEFAULT_PRESET,
        *,
        max_decryptions: int | None = None,
        flooding: bool = True,
        kappa: float | None = None,
        new_key: Callable[[], ClientKey] | None = None,
        retain_calls: int = 4,
    ):
        self.preset = get_preset(preset) if isinstance(preset, str) else preset
        if new_key is None:
            if max_decryptions is not None and max_decryptions < DECRYPTIONS_PER_CIPHERTEXT:
                raise ValueError(
                    f"max_decryptions must be at least {DECRYPTIONS_PER_CIPHERTEXT}: every ciphertext may be "
                    "decrypted that often"
                )

            def new_key() -> ClientKey:
                return ClientKey(self.preset, flooding=flooding, kappa=kappa, max_decryptions=max_decryptions)

        self._new_key = new_key
        self._lock = threading.RLock()
        self._current = self._checked(new_key())
        self._pending: collections.deque[ClientKey] = collections.deque()  # made ahead by prepare()
        self._made: collections.deque[list[ClientKey]] = collections.deque(maxlen=retain_calls)
        self.fingerprints = [self._current.fingerprint]
        self.decryptions = 0
        self.rotations = 0

    def _checked(self, key: ClientKey) -> ClientKey:
        if key.preset != self.preset:
            raise HEError(f"new_key made a key for preset {key.preset.name!r}, not {self.preset.name!r}")
        if key.max_decryptions < DECRYPTIONS_PER_CIPHERTEXT:
            raise DecryptionLimitError(
                f"a key bounded to {key.max_decryptions} decryptions cannot hold even one ciphertext, which may be "
                f"decrypted {DECRYPTIONS_PER_CIPHERTEXT} times"
            )
        return key

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the key the next ciphertext will be made under (``fingerprints``: all so far)."""
        return self._current.fingerprint

    @property
    def slots(self) -> int:
        return self.preset.slots

    @property
    def flood_sigma(self) -> float:
        return self._current.flood_sigma

    def evaluation_context(self) -> bytes:
        return preset_parameter_bytes(self.preset)

    def export_secret(self) -> bytes:
        raise HEError("a rotating key has no single secret to export")

    def deserialize(self, blobs: list[bytes]) -> list[Ciphertext]:
        return self._current.deserialize(blobs)

    def _rotate(self) -> None:
        self._current = self._pending.popleft() if self._pending else self._checked(self._new_key())
        self.fingerprints.append(self._current.fingerprint)
        self.rotations += 1

    def _key_for_next_ciphertext(self) -> ClientKey:
        if not self._current.can_reserve(1):
            self._rotate()
            if not self._current.can_reserve(1):
                raise DecryptionLimitError(
                    f"the new key {self._current.fingerprint} has no decryptions left of its "
                    f"{self._current.max_decryptions}"
                )
        return self._current

    def prepare(self, n_ciphertexts: int) -> None:
        """Fresh encryptions of zero for the next ``n_ciphertexts``, under the keys that will make them."""
        with self._lock:
            left = n_ciphertexts
            for key in [self._current, *self._pending]:
                room = (key.max_decryptions - key.reserved) // DECRYPTIONS_PER_CIPHERTEXT
                key.prepare(min(room, left))
                left -= min(room, left)
            while left > 0:
                key = self._checked(self._new_key())
                self._pending.append(key)
                room = (key.max_decryptions - key.reserved) // DECRYPTIONS_PER_CIPHERTEXT
                if room < 1:
                    raise DecryptionLimitError(f"the new key {key.fingerprint} has no decryptions left")
                key.prepare(min(room, left))
                left -= min(room, left)

    def encrypt(self, values: np.ndarray) -> list[Ciphertext]:
        values = _finite_values(values)
        width = self.preset.values_per_ciphertext
        with self._lock:
            cts, keys = [], []
            for row in _rows(values, self.preset.ciphertexts_for(values.size), width):
                key = self._key_for_next_ciphertext()
                cts += key.encrypt(row)
                keys.append(key)
            self._made.append(keys)
            return cts

    def _candidates(self, position: int) -> list[ClientKey]:
        ordered = [keys[position] for keys in reversed(self._made) if position < len(keys)]
        ordered += [k for keys in reversed(self._made) for k in keys]
        seen: set[int] = set()
        return [k for k in ordered if not (id(k) in seen or seen.add(id(k)))]

    def _plausible(self, decoded: np.ndarray, ct: Ciphertext) -> bool:
        q_bits = self._current._seal.get_context_data(ct.seal.parms_id()).total_coeff_modulus_bit_count()
        wrong_key_rms = 2.0 ** (q_bits - _WRONG_KEY_GAP_BITS) / math.sqrt(12) / ct.seal.scale
        return bool(np.sqrt(np.mean(decoded**2)) * math.sqrt(2 / decoded.size) < wrong_key_rms)

    def decrypt(self, ciphertexts: list[Ciphertext], n_values: int) -> np.ndarray:
        if len(ciphertexts) != self.preset.ciphertexts_for(n_values):
            raise HEError(f"{len(ciphertexts)} ciphertexts cannot hold exactly {n_values} values")
        if not ciphertexts:
            return np.zeros(0)
        with self._lock:
            found: list[tuple[ClientKey, np.ndarray]] = []
            for position, ct in enumerate(ciphertexts):
                for key in self._candidates(position):
                    decoded = key.decode(ct)
                    if self._plausible(decoded, ct):
                        found.append((key, decoded))
                        break
                else:
                    raise HEError(
                        f"ciphertext {position} was not made under any key this client still holds (the keys of "
                        f"its last {self._made.maxlen} encryptions)"
                    )
            for key in {id(k): k for k, _ in found}.values():  # all or nothing: check every budget first
                try:
                    key.check_budget(sum(1 for k, _ in found if k is key))
                except DecryptionLimitError as e:
                    raise DecryptionLimitError(
                        f"{e}; key {key.fingerprint} made them, so they came back more often than the protocol needs"
                    ) from None
            out = np.concatenate([key.reveal(decoded) for key, decoded in found])
            self.decryptions += len(found)
            for key in {id(k): k for k, _ in found}.values():
                key.notify_use()
            return out[:n_values]


def _explain_rejected_context(data: bytes, preset: HEPreset) -> None:
    try:
        ctx = ts.context_from(data)
    except _SEAL_ERRORS as e:
        raise HEError(f"the HE context could not be read: {e}") from None
    if ctx.is_private():
        raise SecretKeyInContextError(
            "the HE context contains a secret key; a client must send only the evaluation parameters"
        )
    if ctx.serialize(**_KEYLESS) == preset_parameter_bytes(preset):
        raise HEError("the HE context carries keys the server does not use; send the parameters only")
    raise HEError(f"the HE context's parameters do not match preset {preset.name!r}")


class EvaluationContext:
    """The server's view: parameters only. Refuses contexts that carry key material it does not need."""

    def __init__(self, data: bytes, preset: HEPreset | str):
        self.preset = get_preset(preset) if isinstance(preset, str) else preset
        if bytes(data) != preset_parameter_bytes(self.preset):
            _explain_rejected_context(data, self.preset)
        # the bytes are exactly the preset's parameters, so the shared precomputed SEAL context serves
        self._seal = _seal_context(self.preset)
        self._encoder = sealapi.CKKSEncoder(self._seal)
        self._evaluator = sealapi.Evaluator(self._seal)
        self._fresh_parms = self._seal.first_parms_id()

    def load(self, blobs: list[bytes]) -> list[Ciphertext]:
        cts = [Ciphertext.load(self._seal, b) for b in blobs]
        for ct in cts:
            # a client may only send fresh ciphertexts at the preset's scale: anything else could not take the update
            if list(ct.seal.parms_id()) != list(self._fresh_parms) or ct.seal.scale != self.preset.scale:
                raise HEError("ciphertext is not at the preset's first level and scale")
        return cts

    def affine_update(self, cts: list[Ciphertext], scalar: float, offset: np.ndarray) -> list[Ciphertext]:
        """scalar * Enc(x) + offset, ciphertext by ciphertext. With ``server_multiplies`` off, scalar must be 1."""
        if not self.preset.server_multiplies and scalar != 1.0:
            raise HEError(f"preset {self.preset.name!r} only supports additions on the server")
        offset = np.asarray(offset, dtype=np.float64).ravel()
        if self.preset.ciphertexts_for(offset.size) != len(cts):
            raise HEError(f"an offset of {offset.size} values does not fit {len(cts)} ciphertexts")
        out = []
        for ct, row in zip(cts, _rows(offset, len(cts), self.preset.values_per_ciphertext)):
            src, res = ct.seal, sealapi.Ciphertext()  # the stored ciphertext stays as it was (a pivot may be reused)
            try:
                if self.preset.server_multiplies:
                    factor = sealapi.Plaintext()
                    self._encoder.encode(float(scalar), src.parms_id(), self.preset.scale, factor)
                    scaled = sealapi.Ciphertext()
                    self._evaluator.multiply_plain(src, factor, scaled)
                    self._evaluator.rescale_to_next_inplace(scaled)
                    src = scaled
                plain = sealapi.Plaintext()
                self._encoder.encode(_as_slots(row), src.parms_id(), src.scale, plain)
                self._evaluator.add_plain(src, plain, res)
            except _SEAL_ERRORS as e:
                raise HEError(f"the update could not be applied to this ciphertext: {e}") from None
            out.append(Ciphertext(res))
        return out
