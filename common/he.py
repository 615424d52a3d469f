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

TenSEAL's own CKKSVector encodes real values only, so keys and ciphertexts are handled through its bundled SEAL
API; TenSEAL's serialisation is kept for the parameter-only context that the server checks.
"""

from __future__ import annotations

import collections
import hashlib
import os
import secrets
import tempfile
import threading
from dataclasses import dataclass

import numpy as np
import tenseal as ts
from tenseal import sealapi

_KEYLESS = {"save_public_key": False, "save_secret_key": False, "save_galois_keys": False, "save_relin_keys": False}
_SEAL_ERRORS = (ValueError, RuntimeError, TypeError, OverflowError)


class HEError(ValueError):
    """A context or ciphertext that cannot be used; the message says what is wrong."""


class SecretKeyInContextError(HEError):
    pass


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


PRESETS: dict[str, HEPreset] = {
    "fast": HEPreset(
        name="fast",
        poly_modulus_degree=4096,
        coeff_mod_bit_sizes=(60, 49),
        scale_bits=40,
        server_multiplies=False,
        description="N=4096, q=[60,49] (109 bits, 128-bit security), scale 2^40; server adds only",
    ),
    "paper": HEPreset(
        name="paper",
        poly_modulus_degree=8192,
        coeff_mod_bit_sizes=(31, 26, 26, 26, 26, 26, 26, 31),
        scale_bits=26,
        server_multiplies=True,
        description="the paper's N=8192, q=[31,26x6,31] (218 bits), scale 2^26; server multiplies and adds",
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

_scratch = threading.local()


def _scratch_path() -> str:
    """A private per-thread file for SEAL's path-only save/load (in RAM where /dev/shm exists).

    Only ciphertexts pass through it, never key material.
    """
    path = getattr(_scratch, "path", None)
    if path is None or not os.path.exists(path):
        fd, path = tempfile.mkstemp(prefix="hediff-ct-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.close(fd)
        _scratch.path = path
    return path


class Ciphertext:
    """One SEAL ciphertext holding up to ``values_per_ciphertext`` latent values."""

    __slots__ = ("seal",)

    def __init__(self, seal_ct: sealapi.Ciphertext):
        self.seal = seal_ct

    def serialize(self) -> bytes:
        path = _scratch_path()
        self.seal.save(path)
        with open(path, "rb") as f:
            return f.read()

    @classmethod
    def load(cls, seal_context, blob: bytes) -> Ciphertext:
        """SEAL validates the data against the context on load; anything else is refused with HEError."""
        if not isinstance(blob, (bytes, bytearray)) or len(blob) < 16:
            raise HEError("not a ciphertext for this session's parameters: too short")
        path = _scratch_path()
        with open(path, "wb") as f:
            f.write(blob)
        ct = sealapi.Ciphertext()
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

    ``ClientKey(preset)`` makes a throwaway key (the fastest way, for a key per generation).
    ``exportable=True`` makes one whose secret can be exported as bytes (in memory, for wrapping and storage
    by the caller); ``ClientKey(preset, secret=blob)`` loads such bytes back.
    """

    def __init__(
        self, preset: HEPreset | str = DEFAULT_PRESET, *, secret: bytes | None = None, exportable: bool = False
    ):
        self.preset = get_preset(preset) if isinstance(preset, str) else preset
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
        self.decryptions = 0

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
        values = np.asarray(values, dtype=np.float64).ravel()
        if not np.all(np.isfinite(values)):
            raise HEError("refusing to encrypt NaN or infinite values")
        n = self.preset.ciphertexts_for(values.size)
        cts = []
        for row in _rows(values, n, self.preset.values_per_ciphertext):
            ct = self._fresh_zero()
            plain = sealapi.Plaintext()
            self._encoder.encode(_as_slots(row), ct.parms_id(), ct.scale, plain)
            self._evaluator.add_plain_inplace(ct, plain)
            cts.append(Ciphertext(ct))
        return cts

    def decrypt(self, ciphertexts: list[Ciphertext], n_values: int) -> np.ndarray:
        if len(ciphertexts) != self.preset.ciphertexts_for(n_values):
            raise HEError(f"{len(ciphertexts)} ciphertexts cannot hold exactly {n_values} values")
        width = self.preset.values_per_ciphertext
        out = np.empty(len(ciphertexts) * width)
        for i, ct in enumerate(ciphertexts):
            plain = sealapi.Plaintext()
            self._decryptor.decrypt(ct.seal, plain)
            z = np.asarray(self._encoder.decode_complex(plain))
            out[i * width : i * width + width // 2] = z.real
            out[i * width + width // 2 : (i + 1) * width] = z.imag
            self.decryptions += 1
        return out[:n_values]

    def deserialize(self, blobs: list[bytes]) -> list[Ciphertext]:
        return [Ciphertext.load(self._seal, b) for b in blobs]


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
