"""The encrypted latent: packed ciphertexts + index set (mask) + plaintext remainder, and merging it back."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hediff.common.he import ClientKey, EvaluationContext, RotatingKey


@dataclass
class EncryptedLatent:
    shape: tuple[int, ...]
    mask: np.ndarray | None  # bool, latent-shaped, True = encrypted; None = everything encrypted
    ciphertexts: list = field(default_factory=list)  # common.he.Ciphertext, values in flat order of the mask
    remainder: np.ndarray = field(default_factory=lambda: np.zeros(0))  # float64 plaintext values, flat order

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def n_encrypted(self) -> int:
        return self.size if self.mask is None else int(self.mask.sum())

    @property
    def encrypted_fraction(self) -> float:
        return self.n_encrypted / self.size if self.size else 1.0


def split_values(x: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    flat = np.asarray(x, dtype=np.float64).ravel()
    if mask is None:
        return flat, np.zeros(0)
    m = mask.ravel()
    return flat[m], flat[~m]


def merge_values(
    shape: tuple[int, ...], mask: np.ndarray | None, encrypted: np.ndarray, plain: np.ndarray
) -> np.ndarray:
    if mask is None:
        return np.asarray(encrypted, dtype=np.float64).reshape(shape)
    out = np.empty(int(np.prod(shape)), dtype=np.float64)
    m = mask.ravel()
    out[m] = encrypted
    out[~m] = plain
    return out.reshape(shape)


def encrypt_latent(x: np.ndarray, mask: np.ndarray | None, key: ClientKey | RotatingKey) -> EncryptedLatent:
    x = np.asarray(x, dtype=np.float64)
    if mask is not None and mask.shape != x.shape:
        raise ValueError(f"mask shape {mask.shape} does not match latent shape {x.shape}")
    enc, plain = split_values(x, mask)
    return EncryptedLatent(shape=x.shape, mask=mask, ciphertexts=key.encrypt(enc), remainder=plain)


def decrypt_latent(latent: EncryptedLatent, key: ClientKey | RotatingKey) -> np.ndarray:
    """The latent as the client may use it: the encrypted part noise-flooded by ``key`` (unless made without)."""
    enc = key.decrypt(latent.ciphertexts, latent.n_encrypted)
    return merge_values(latent.shape, latent.mask, enc, latent.remainder)


def update_latent(
    latent: EncryptedLatent, ctx: EvaluationContext, scalar: float, offset: np.ndarray
) -> EncryptedLatent:
    """Server side: scalar * x + offset on the encrypted part (under HE) and on the plaintext remainder."""
    enc_off, plain_off = split_values(np.asarray(offset).reshape(latent.shape), latent.mask)
    return EncryptedLatent(
        shape=latent.shape,
        mask=latent.mask,
        ciphertexts=ctx.affine_update(latent.ciphertexts, scalar, enc_off),
        remainder=scalar * latent.remainder + plain_off,
    )


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """The index set as a bitmap: one bit per latent element (2 KiB for 4x64x64), not COO indices."""
    return np.packbits(mask.ravel().astype(np.uint8))


def unpack_mask(bits: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    bits = np.asarray(bits, dtype=np.uint8).ravel()
    if bits.size != (n + 7) // 8:
        raise ValueError(f"mask has {bits.size} bytes, a {shape} latent needs {(n + 7) // 8}")
    return np.unpackbits(bits, count=n).astype(bool).reshape(shape)
