"""CKKS on TenSEAL: parameter presets, client keys, packing values into ciphertexts, server-side update.

The server never needs a key: it only adds plaintext vectors to ciphertexts (and, for the ``paper``
preset, multiplies them by a public scalar). So the evaluation context it gets carries the parameters
and nothing else, not even the public key.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

import numpy as np
import tenseal as ts

_KEYLESS = dict(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)


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
    def scale(self) -> float:
        return float(2**self.scale_bits)

    def ciphertexts_for(self, n_values: int) -> int:
        return max(1, -(-n_values // self.slots)) if n_values else 0


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


class ClientKey:
    """A CKKS secret key with its context. Lives only on the client; nothing here writes it anywhere.

    Encryptions of zero do not depend on the message, so ``prepare`` can make them ahead of time (while the
    server works) and ``encrypt`` only adds the encoded values on the critical path. Each one is used once.
    """

    def __init__(self, preset: HEPreset | str = DEFAULT_PRESET):
        self.preset = get_preset(preset) if isinstance(preset, str) else preset
        self._ctx = _new_context(self.preset)
        self._zeros: collections.deque[ts.CKKSVector] = collections.deque()
        self._zeros_lock = threading.Lock()
        self.decryptions = 0

    @property
    def slots(self) -> int:
        return self.preset.slots

    def evaluation_context(self) -> bytes:
        """Parameters only: no secret, public, relinearisation or Galois key."""
        return self._ctx.serialize(**_KEYLESS)

    def prepare(self, n_ciphertexts: int) -> None:
        """Top up the pool of fresh encryptions of zero to ``n_ciphertexts``."""
        zero = np.zeros(self.slots)
        while True:
            with self._zeros_lock:
                if len(self._zeros) >= n_ciphertexts:
                    return
            ct = ts.ckks_vector(self._ctx, zero)
            with self._zeros_lock:
                self._zeros.append(ct)

    def _fresh_zero(self) -> ts.CKKSVector:
        with self._zeros_lock:
            if self._zeros:
                return self._zeros.popleft()
        return ts.ckks_vector(self._ctx, np.zeros(self.slots))

    def encrypt(self, values: np.ndarray) -> list[ts.CKKSVector]:
        """Pack a 1-D array into as few ciphertexts as the slot count allows (the last one zero-padded)."""
        values = np.asarray(values, dtype=np.float64).ravel()
        if not np.all(np.isfinite(values)):
            raise HEError("refusing to encrypt NaN or infinite values")
        cts = []
        for chunk in _chunks(values, self.slots):
            ct = self._fresh_zero()
            ct.add_(chunk)
            cts.append(ct)
        return cts

    def decrypt(self, ciphertexts: list[ts.CKKSVector], n_values: int) -> np.ndarray:
        if len(ciphertexts) != self.preset.ciphertexts_for(n_values):
            raise HEError(f"{len(ciphertexts)} ciphertexts cannot hold exactly {n_values} values")
        out = np.empty(len(ciphertexts) * self.slots, dtype=np.float64)
        for i, ct in enumerate(ciphertexts):
            ct.link_context(self._ctx)
            out[i * self.slots : (i + 1) * self.slots] = ct.decrypt()
            self.decryptions += 1
        return out[:n_values]

    def deserialize(self, blobs: list[bytes]) -> list[ts.CKKSVector]:
        return [_load_ciphertext(self._ctx, b, self.slots) for b in blobs]


def _chunks(values: np.ndarray, slots: int):
    for start in range(0, len(values), slots):
        chunk = values[start : start + slots]
        if len(chunk) < slots:
            chunk = np.concatenate([chunk, np.zeros(slots - len(chunk))])
        yield chunk


def _load_ciphertext(ctx: ts.Context, blob: bytes, slots: int) -> ts.CKKSVector:
    try:
        ct = ts.ckks_vector_from(ctx, blob)
    except (ValueError, RuntimeError, TypeError) as e:
        raise HEError(f"not a ciphertext for this session's parameters: {e}") from None
    if ct.size() != slots:
        raise HEError(f"ciphertext holds {ct.size()} slots, expected {slots}")
    return ct


class EvaluationContext:
    """The server's view: parameters only. Refuses contexts that carry any key material it does not need."""

    def __init__(self, data: bytes, preset: HEPreset | str):
        self.preset = get_preset(preset) if isinstance(preset, str) else preset
        try:
            ctx = ts.context_from(data)
        except (ValueError, RuntimeError, TypeError) as e:
            raise HEError(f"the HE context could not be read: {e}") from None
        if ctx.is_private():
            raise SecretKeyInContextError(
                "the HE context contains a secret key; a client must send only the evaluation parameters"
            )
        if ctx.serialize(**_KEYLESS) != preset_parameter_bytes(self.preset):
            raise HEError(f"the HE context's parameters do not match preset {self.preset.name!r}")
        self._ctx = ctx

    def load(self, blobs: list[bytes]) -> list[ts.CKKSVector]:
        return [_load_ciphertext(self._ctx, b, self.preset.slots) for b in blobs]

    def affine_update(self, cts: list[ts.CKKSVector], scalar: float, offset: np.ndarray) -> list[ts.CKKSVector]:
        """scalar * Enc(x) + offset, chunk by chunk. With ``server_multiplies`` off, ``scalar`` must be 1."""
        if not self.preset.server_multiplies and scalar != 1.0:
            raise HEError(f"preset {self.preset.name!r} only supports additions on the server")
        offset = np.asarray(offset, dtype=np.float64).ravel()
        if self.preset.ciphertexts_for(len(offset)) != len(cts):
            raise HEError(f"an offset of {len(offset)} values does not fit {len(cts)} ciphertexts")
        out = []
        for ct, chunk in zip(cts, _chunks(offset, self.preset.slots)):
            out.append((ct * scalar if self.preset.server_multiplies else ct) + chunk)
        return out


def serialize_ciphertexts(cts: list[ts.CKKSVector]) -> list[bytes]:
    return [ct.serialize() for ct in cts]
