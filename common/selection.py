"""Which latent elements to encrypt: everything, or the paper's min-distortion (HILL cost) selection.

A mask is a boolean array shaped like the latent; True means "encrypted".
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

ENCRYPTION_MODES = ("full", "min-distortion")
DEFAULT_TAU = 0.01

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


def select_mask(latent: np.ndarray, mode: str, tau: float = DEFAULT_TAU) -> np.ndarray | None:
    """None for full encryption (no index set goes on the wire), else the min-distortion mask."""
    if mode == "full":
        return None
    if mode == "min-distortion":
        return min_distortion_mask(latent, tau)
    raise ValueError(f"unknown encryption mode {mode!r}; choose one of: {', '.join(ENCRYPTION_MODES)}")
