"""Prototypes of speed-ups for ``common.he`` (full latent, ``fast`` parameters), measured by ``bench.he_step``.

Not product code: each class does one step of the same protocol as ``bench.he_step.ours_step`` (prepare,
encrypt, serialise, load, server add, serialise, load, decrypt, merge, client multiply by f), with the same
stage names, so its numbers sit in the same table. Same parameters as the ``fast`` preset: N=4096,
q=[60, 49], scale 2^40, server adds only.

* ``LeanTenSEAL``: still TenSEAL ``CKKSVector``, but (1) the client context uses symmetric (secret-key)
  encryption, which makes an encryption of zero about 2x cheaper than TenSEAL's default public-key encryption
  and the ciphertexts are loadable by the same keyless server context; (2) plaintext vectors go to the
  low-level ``add_plain`` as one ``list`` (TenSEAL's Python ``add``/``add_`` turn a numpy array into a list, into
  a PlainTensor, and back into a list before the C++ call); (3) the latent is zero-padded into an (n, slots)
  array once instead of per chunk.
* ``ComplexPackedSEAL``: SEAL through ``tenseal.sealapi`` (shipped with TenSEAL), symmetric encryption, and two
  real latent values per CKKS slot (real and imaginary part): the update f * x + b is linear with real
  coefficients, so it acts on both parts independently, and N=4096 holds 4096 values per ciphertext instead of
  2048. Every cost per value (encode, add, decrypt, decode, bytes, serialisation) halves. sealapi only saves and
  loads ciphertexts through file paths, so serialisation goes through a file in /dev/shm (a product version
  would want a bytes API).
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import tenseal as ts
from tenseal import sealapi as sa

from common import he

STAGES = ("prepare", "select", "encrypt", "ser_up", "load_up", "update", "ser_down", "load_down", "decrypt", "merge")


def _padded_rows(values: np.ndarray, n_rows: int, width: int) -> np.ndarray:
    out = np.zeros(n_rows * width)
    out[: values.size] = values.ravel()
    return out.reshape(n_rows, width)


class LeanTenSEAL:
    """TenSEAL CKKSVector with symmetric encryption, list operands to the low-level add, one padded array."""

    name = "proto-tenseal-lean"

    def __init__(self):
        p = he.get_preset("fast")
        self.slots = p.slots
        self._ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            p.poly_modulus_degree,
            coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes),
            encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
        )
        self._ctx.global_scale = p.scale
        keyless = self._ctx.serialize(
            save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
        )
        self._server = ts.context_from(keyless)
        self._zero = [0.0] * self.slots
        self._pool: list = []

    def n_ciphertexts(self, n_values: int) -> int:
        return -(-n_values // self.slots)

    def prepare(self, n: int) -> None:
        while len(self._pool) < n:
            self._pool.append(ts._ts_cpp.CKKSVector(self._ctx.data, self._zero))

    def step(self, x: np.ndarray, f: float, b: np.ndarray, n_pool: int) -> dict:
        c = time.perf_counter
        n = self.n_ciphertexts(x.size)
        t0 = c()
        self.prepare(n_pool)
        t1 = c()
        t2 = c()  # no selection: full latent
        cts = []
        for row in _padded_rows(x, n, self.slots):
            ct = self._pool.pop()
            ct.add_plain_(row.tolist())
            cts.append(ct)
        t3 = c()
        up = [ct.serialize() for ct in cts]
        t4 = c()
        srv = [ts._ts_cpp.CKKSVector(self._server.data, blob) for blob in up]
        t5 = c()
        out = [ct.add_plain(row.tolist()) for ct, row in zip(srv, _padded_rows(b * (1.0 / f), n, self.slots))]
        t6 = c()
        down = [ct.serialize() for ct in out]
        t7 = c()
        back = [ts._ts_cpp.CKKSVector(self._ctx.data, blob) for blob in down]
        t8 = c()
        dec = np.empty(n * self.slots)
        for i, ct in enumerate(back):
            dec[i * self.slots : (i + 1) * self.slots] = ct.decrypt()
        t9 = c()
        y = f * dec[: x.size].reshape(x.shape)
        t10 = c()
        stamps = (t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10)
        return _result(stamps, up, down, n, y, x, f, b)


class ComplexPackedSEAL:
    """SEAL via tenseal.sealapi, symmetric encryption, two real values per complex slot (4096 per ciphertext)."""

    name = "proto-seal-complex"

    def __init__(self):
        p = he.get_preset("fast")
        self.scale = p.scale
        self.slots = p.slots
        self.values_per_ct = 2 * p.slots
        parms = sa.EncryptionParameters(sa.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(p.poly_modulus_degree)
        parms.set_coeff_modulus(sa.CoeffModulus.Create(p.poly_modulus_degree, list(p.coeff_mod_bit_sizes)))
        self._client = sa.SEALContext(parms, True, sa.SEC_LEVEL_TYPE.TC128)
        self._server = sa.SEALContext(parms, True, sa.SEC_LEVEL_TYPE.TC128)  # what the server builds from params
        sk = sa.KeyGenerator(self._client).secret_key()
        self._encryptor = sa.Encryptor(self._client, sk)
        self._decryptor = sa.Decryptor(self._client, sk)
        self._encoder = sa.CKKSEncoder(self._client)
        self._server_encoder = sa.CKKSEncoder(self._server)
        self._client_evaluator = sa.Evaluator(self._client)
        self._evaluator = sa.Evaluator(self._server)
        self._zero_plain = sa.Plaintext()
        self._encoder.encode(0.0, self.scale, self._zero_plain)
        self._pool: list = []
        fd, self._path = tempfile.mkstemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.close(fd)

    def close(self) -> None:
        if os.path.exists(self._path):
            os.remove(self._path)

    def n_ciphertexts(self, n_values: int) -> int:
        return -(-n_values // self.values_per_ct)

    def prepare(self, n: int) -> None:
        while len(self._pool) < n:
            ct = sa.Ciphertext()
            self._encryptor.encrypt_symmetric(self._zero_plain, ct)
            self._pool.append(ct)

    def _complex(self, row: np.ndarray) -> list:
        return (row[: self.slots] + 1j * row[self.slots :]).tolist()

    def _save(self, ct) -> bytes:
        ct.save(self._path)
        with open(self._path, "rb") as fh:
            return fh.read()

    def _load(self, ctx, blob: bytes):
        with open(self._path, "wb") as fh:
            fh.write(blob)
        ct = sa.Ciphertext()
        ct.load(ctx, self._path)
        return ct

    def step(self, x: np.ndarray, f: float, b: np.ndarray, n_pool: int) -> dict:
        c = time.perf_counter
        n = self.n_ciphertexts(x.size)
        w = self.values_per_ct
        t0 = c()
        self.prepare(n_pool)
        t1 = c()
        t2 = c()
        cts = []
        for row in _padded_rows(x, n, w):
            ct = self._pool.pop()
            plain = sa.Plaintext()
            self._encoder.encode(self._complex(row), ct.parms_id(), self.scale, plain)
            self._client_evaluator.add_plain_inplace(ct, plain)
            cts.append(ct)
        t3 = c()
        up = [self._save(ct) for ct in cts]
        t4 = c()
        srv = [self._load(self._server, blob) for blob in up]
        t5 = c()
        out = []
        for ct, row in zip(srv, _padded_rows(b * (1.0 / f), n, w)):
            plain = sa.Plaintext()
            self._server_encoder.encode(self._complex(row), ct.parms_id(), self.scale, plain)
            res = sa.Ciphertext()
            self._evaluator.add_plain(ct, plain, res)
            out.append(res)
        t6 = c()
        down = [self._save(ct) for ct in out]
        t7 = c()
        back = [self._load(self._client, blob) for blob in down]
        t8 = c()
        dec = np.empty(n * w)
        for i, ct in enumerate(back):
            plain = sa.Plaintext()
            self._decryptor.decrypt(ct, plain)
            z = np.asarray(self._encoder.decode_complex(plain))
            dec[i * w : i * w + self.slots] = z.real
            dec[i * w + self.slots : (i + 1) * w] = z.imag
        t9 = c()
        y = f * dec[: x.size].reshape(x.shape)
        t10 = c()
        stamps = (t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10)
        return _result(stamps, up, down, n, y, x, f, b)


def _result(stamps, up, down, n, y, x, f, b) -> dict:
    return {
        "times": {name: stamps[i + 1] - stamps[i] for i, name in enumerate(STAGES)},
        "bytes_up": sum(map(len, up)),
        "bytes_down": sum(map(len, down)),
        "ciphertext_bytes_up": sum(map(len, up)),
        "mask_bytes": 0,
        "remainder_bytes": 0,
        "n_ciphertexts": n,
        "encrypted_fraction": 1.0,
        "max_error": float(np.abs(y - (f * x + b)).max()),
    }
