"""Noise flooding of CKKS decryptions: how large the flood must be, and drawing it.

A CKKS decryption reveals ``c0 + c1*s`` (message plus error) exactly; whoever learns it and holds the
ciphertext can solve for the secret key ``s`` (Li and Micciancio, EUROCRYPT 2021). Adding fresh Gaussian noise
much larger than the error hides the error. The size follows a Kullback-Leibler argument (the one Li,
Micciancio, Schwerdtfeger and Vaikuntanathan, CRYPTO 2022, use): the flooded output with the true error ``e``
and a simulated output without it are two Gaussians ``||e|| / sigma`` apart, so ``Q`` decryptions differ by
``KL <= Q * ||e||^2 / (2 sigma^2)``. With ``sigma = 2^(kappa/2) * sqrt(Q) * B`` and ``B >= ||e||`` that is at
most ``2^-(kappa+1)``, which keeps ``kappa`` bits of security for a search problem such as key recovery
(Micciancio and Walter, EUROCRYPT 2018). docs/key-recovery.md has the numbers.

The flood is added to the decoded values: the canonical embedding is ``sqrt(N/2)/scale`` times an orthogonal
map from the N plaintext coefficients to the N real and imaginary parts of the slots, so i.i.d. Gaussian noise
on every slot component is exactly i.i.d. Gaussian noise on every coefficient, and ``||e||`` is the same
ratio to ``sigma`` in either domain.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np

RandomBytes = Callable[[int], bytes]

_UNIT = 2.0**-53


def flood_sigma(error_norm: float, decryptions: int, kappa: float) -> float:
    """The flood's standard deviation per value: ``2^(kappa/2) * sqrt(decryptions) * error_norm``.

    ``error_norm`` bounds the L2 norm of one ciphertext's decryption error over all its N real values, in the
    same units as the values; ``decryptions`` is the most decryptions one key may ever make.
    """
    if error_norm <= 0 or decryptions < 1:
        raise ValueError("the error norm must be positive and the number of decryptions at least 1")
    return 2.0 ** (kappa / 2) * math.sqrt(decryptions) * error_norm


def key_recovery_bits(kappa: float, ideal_bits: float = 128.0) -> float:
    """Bits of security against key recovery left with a flood of this kappa, if it has ``ideal_bits`` without
    the decryptions (RLWE at the presets' parameters: 128).

    Renyi divergence of order ``a`` between the real view (error + flood) and the ideal one (flood only) is at
    most ``exp(a * 2^-kappa / 2)`` over all ``Q`` decryptions, and an event of probability ``p`` in the ideal
    view has at most ``(p * R_a)^((a-1)/a)`` in the real one (Bai, Langlois, Lepoint, Stehle, Steinfeld 2015).
    Optimising over ``a`` gives ``(sqrt(ideal_bits) - sqrt(2^-kappa / (2 ln 2)))^2`` bits (0 when negative).
    """
    gap = math.sqrt(ideal_bits) - math.sqrt(2.0**-kappa / (2 * math.log(2)))
    return gap * gap if gap > 0 else 0.0


def gaussian(n: int, sigma: float, random_bytes: RandomBytes = os.urandom) -> np.ndarray:
    """``n`` independent N(0, sigma^2) samples from the operating system's CSPRNG (Box-Muller on 53-bit uniforms).

    Not numpy's generators: the server sees flood plus a tiny error, so it nearly sees the flood itself, and
    the state of a statistical generator such as PCG64 can be recovered from its outputs (Bouillaguet,
    Martinez and Sauvage, 2020), which would let the server subtract every later flood.
    """
    if n == 0:
        return np.zeros(0)
    pairs = (n + 1) // 2
    words = np.frombuffer(random_bytes(16 * pairs), dtype=np.uint64)
    uniform = (words >> np.uint64(11)).astype(np.float64) * _UNIT  # [0, 1) on a 2^-53 grid
    radius = np.sqrt(-2.0 * np.log1p(-uniform[:pairs]))  # 1 - u is in (0, 1]: no log(0)
    angle = (2.0 * np.pi) * uniform[pairs:]
    return (sigma * np.concatenate([radius * np.cos(angle), radius * np.sin(angle)]))[:n]


def flood(values: np.ndarray, sigma: float, random_bytes: RandomBytes = os.urandom) -> np.ndarray:
    """``values`` plus fresh flooding noise on every element (a new array); ``sigma == 0`` returns a copy."""
    values = np.asarray(values, dtype=np.float64)
    if sigma == 0:
        return values.copy()
    return values + gaussian(values.size, sigma, random_bytes).reshape(values.shape)
