"""A small, self-contained CKKS for the key-recovery test: RLWE over Z_q[X]/(X^N + 1), one prime modulus,
canonical-embedding encoding with two real values per complex slot (as common/he.py packs them), symmetric
encryption, the server's plaintext addition, and decryption with or without the product's noise flooding.

Python integers throughout (numpy object arrays), so nothing overflows; N = 64 keeps the attack's linear algebra
instant. Not for anything but tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hediff.common import flooding


@dataclass(frozen=True)
class ToyParams:
    n: int = 64
    q: int = 1073741789  # the largest prime below 2^30
    scale: float = 2.0**20
    error_sigma: float = 3.2  # the HE standard's error width, as SEAL

    @property
    def roots(self) -> np.ndarray:
        """One primitive 2N-th root of unity from each conjugate pair: zeta^(5^j), j < N/2 (SEAL's slot order)."""
        exps = np.array([pow(5, j, 2 * self.n) for j in range(self.n // 2)])
        return np.exp(1j * np.pi * exps / self.n)


def centered(a: np.ndarray, q: int) -> np.ndarray:
    a = np.asarray(a, dtype=object) % q
    return np.where(a > q // 2, a - q, a)


def negacyclic_matrix(c: np.ndarray, q: int) -> np.ndarray:
    """M with M @ s == c * s in Z_q[X]/(X^N + 1)."""
    n = len(c)
    m = np.empty((n, n), dtype=object)
    for i in range(n):
        for j in range(n):
            m[i, j] = c[i - j] if i >= j else -c[n + i - j]
    return m % q


def polymul(a: np.ndarray, b: np.ndarray, q: int) -> np.ndarray:
    return negacyclic_matrix(np.asarray(a, dtype=object) % q, q).dot(np.asarray(b, dtype=object)) % q


def solve_mod(matrix: np.ndarray, rhs: np.ndarray, q: int) -> np.ndarray:
    """Gaussian elimination over Z_q (q prime); raises ValueError if the system is singular."""
    a = np.concatenate([matrix % q, (np.asarray(rhs, dtype=object) % q)[:, None]], axis=1)
    n = len(rhs)
    for col in range(n):
        pivot = next((r for r in range(col, n) if a[r, col] != 0), None)
        if pivot is None:
            raise ValueError("singular system")
        a[[col, pivot]] = a[[pivot, col]]
        a[col] = (a[col] * pow(int(a[col, col]), -1, q)) % q
        others = [r for r in range(n) if r != col]
        a[others] = (a[others] - np.outer(a[others, col], a[col])) % q
    return a[:, n]


class ToyCKKS:
    def __init__(self, params: ToyParams = ToyParams(), rng: np.random.Generator | None = None):
        self.p = params
        self.rng = rng if rng is not None else np.random.default_rng()
        roots = params.roots
        self._v = roots[:, None] ** np.arange(params.n)[None, :]  # slots = V @ coefficients

    # --- encoding: N real values <-> integer polynomial --------------------------------------------------------

    def encode(self, values: np.ndarray) -> np.ndarray:
        half = self.p.n // 2
        values = np.asarray(values, dtype=np.float64)
        z = values[:half] + 1j * values[half:]
        coeffs = (2.0 / self.p.n) * np.real(np.conj(self._v).T @ z)
        return np.array([int(round(c)) for c in coeffs * self.p.scale], dtype=object)

    def decode(self, poly: np.ndarray) -> np.ndarray:
        z = self._v @ np.asarray(centered(poly, self.p.q), dtype=np.float64) / self.p.scale
        return np.concatenate([z.real, z.imag])

    # --- keys, encryption, the server's update, decryption -----------------------------------------------------

    def keygen(self) -> np.ndarray:
        return np.array(self.rng.integers(-1, 2, self.p.n), dtype=object)

    def encrypt(self, s: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = self.p.q
        c1 = np.array([int(v) for v in self.rng.integers(0, q, self.p.n)], dtype=object)
        e = np.array([int(round(v)) for v in self.rng.normal(0, self.p.error_sigma, self.p.n)], dtype=object)
        c0 = (-polymul(c1, s, q) + e + self.encode(values)) % q
        return c0, c1

    def add_plain(self, ct: tuple[np.ndarray, np.ndarray], values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (ct[0] + self.encode(values)) % self.p.q, ct[1]

    def decrypt(self, s: np.ndarray, ct: tuple[np.ndarray, np.ndarray], flood_sigma: float = 0.0) -> np.ndarray:
        """The decoded values, flooded exactly as common.he.ClientKey floods them (common.flooding.flood)."""
        exact = self.decode((ct[0] + polymul(ct[1], s, self.p.q)) % self.p.q)
        return flooding.flood(exact, flood_sigma)


def recover_secret(toy: ToyCKKS, ct: tuple[np.ndarray, np.ndarray], decrypted: np.ndarray) -> np.ndarray:
    """Li-Micciancio: re-encode what the decryption showed, c1 * s = Encode(m') - c0 (mod q), solve for s."""
    q = toy.p.q
    rhs = (toy.encode(decrypted) - ct[0]) % q
    return centered(solve_mod(negacyclic_matrix(ct[1], q), rhs, q), q)
