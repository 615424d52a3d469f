"""Which latent elements to encrypt: everything, the paper's min-distortion (HILL cost) selection, or a
data-independent random mask.

A mask is a boolean array shaped like the latent; True means "encrypted". The min-distortion mask is computed
from the secret latent at every step, so the index set the server sees is a saliency map of the image. The
random mask is drawn once per generation from a fresh secret seed and does not depend on the latent at all;
the server learns only the fraction. Either only matters for the paper's splits, which send the latent: the
U-shaped splits keep it on the client.
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np
from scipy import ndimage

from hediff.common.settings import DEFAULT_MASK_FRACTION, DEFAULT_TAU, Encryption  # noqa: F401 (re-exported)

MASK_SEED_BYTES = 32

HILL_HIGHPASS = np.array([[-1.0, 2.0, -1.0], [2.0, -4.0, 2.0], [-1.0, 2.0, -1.0]])


def hill_cost(latent: np.ndarray) -> np.ndarray:
    """HILL cost map (H, W) of the channel sum of a (C, H, W) latent.

    rho = L2 * (1 / (L1 * |H * X|)) with a 3x3 high-pass H, 3x3 box L1, 15x15 box L2. The reference code's
    kernels sum over the channels, so the map is the cost of the channel sum. Torch's "reflect" padding
    (edge not repeated) is scipy's "mirror".
    """
    x = np.asarray(latent, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"expected a (C, H, W) latent, got shape {x.shape}")
    s = x.sum(axis=0)
    residual = np.abs(ndimage.correlate(s, HILL_HIGHPASS, mode="mirror"))
    smoothed = ndimage.uniform_filter(residual, size=3, mode="mirror")
    inv = np.zeros_like(smoothed)
    np.divide(1.0, smoothed, out=inv, where=smoothed > 0)
    return ndimage.uniform_filter(inv, size=15, mode="mirror")


def distortion(latent: np.ndarray) -> np.ndarray:
    """D_i = |x_i| * rho_i: the distortion of leaving element i out of the encrypted part."""
    x = np.asarray(latent, dtype=np.float64)
    return np.abs(x) * hill_cost(x)[None, :, :]


def min_distortion_mask(latent: np.ndarray, tau: float = DEFAULT_TAU) -> np.ndarray:
    """Encrypt everything except the largest set of lowest-distortion elements whose summed D <= tau * sum(D)."""
    if not (0.0 <= tau <= 1.0) or not np.isfinite(tau):
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    d = distortion(latent).ravel()
    if not d.size or d.sum() <= 0:
        # no measurable distortion anywhere (e.g. a constant latent): the rule would leave everything in
        # plaintext; encrypting everything is the safe reading
        return np.ones(np.shape(latent), dtype=bool)
    order = np.argsort(d, kind="stable")
    cumulative = np.cumsum(d[order])
    n_plain = int(np.searchsorted(cumulative, tau * cumulative[-1], side="right"))
    mask = np.ones(d.size, dtype=bool)
    mask[order[:n_plain]] = False
    return mask.reshape(np.shape(latent))


def new_mask_seed() -> bytes:
    """A fresh secret seed for :func:`random_mask` (one per generation)."""
    return secrets.token_bytes(MASK_SEED_BYTES)


def random_mask(shape: tuple[int, ...], fraction: float, seed: bytes) -> np.ndarray:
    """Exactly ``round(fraction * size)`` encrypted elements, a uniformly random subset chosen by ``seed``.

    The subset is the positions of the smallest of ``size`` 64-bit keys read from SHAKE-256(seed): a
    cryptographic expansion of the seed, so without the seed the mask is unpredictable, and with it the mask
    is reproducible (tests). It never looks at the latent.
    """
    if not np.isfinite(fraction) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"mask fraction must be in [0, 1], got {fraction}")
    if not isinstance(seed, bytes) or len(seed) < 16:
        raise ValueError("the random mask needs a secret seed of at least 16 bytes (use new_mask_seed())")
    size = int(np.prod(shape))
    keys = np.frombuffer(hashlib.shake_256(seed).digest(8 * size), dtype="<u8")
    chosen = np.argsort(keys, kind="stable")[: int(round(fraction * size))]
    mask = np.zeros(size, dtype=bool)
    mask[chosen] = True
    return mask.reshape(shape)


def select_mask(latent: np.ndarray, mode: str, tau: float = DEFAULT_TAU) -> np.ndarray | None:
    """None for full encryption (no index set goes on the wire), else the min-distortion mask.

    ``random-mask`` is not chosen per step: draw it once per generation with :func:`random_mask`.
    """
    if mode == Encryption.FULL:
        return None
    if mode == Encryption.MIN_DISTORTION:
        if np.ndim(latent) == 4:  # a batch of images: each image's own selection, as if generated alone
            return np.stack([min_distortion_mask(x, tau) for x in latent])
        return min_distortion_mask(latent, tau)
    if mode == Encryption.RANDOM_MASK:
        raise ValueError("the random mask does not depend on the latent: draw it once with random_mask()")
    raise ValueError(f"encryption mode {mode!r} selects no index set; choose full, min-distortion or random-mask")
