"""The paper's own HE paths, re-implemented for benchmarking against (not used by the product).

Source of this reading: the authors' public reference code, github ChenYaojian/HE-diffusion at commit f71fbd27:
``ldm/distortion.py`` (selection: ``hill_cost_function``, ``mirror_padded_convolution``, ``additive_distortion``,
``smallest_k_elements``, ``remove_points``), ``ldm/coo_sparse.py`` (the COO container ``COOSparseTensor`` and
``convert_dense_to_coo``/``dense_to_coo``, ``get_encryption_context``), ``ldm/models/diffusion/enc_plms.py``
(``plms_sampling`` with ``sparse=True``, ``p_sample_plms_sp``, and the dense ``p_sample_plms``) and
``scripts/enc_txt2img.py`` (what invokes it). The code below is written anew; per denoising step it performs the
same operations, on the same data structures (float32 torch tensors shaped (B, C, H, W), numpy index arrays, one
TenSEAL ``CKKSVector``), with the same Python-level loops and the same TenSEAL calls and parameters, and says
where it departs.

Sparse (COO) path, per denoising step (what ``sparse_step`` times; stage names in brackets):

1. [select] ``remove_points(img_cpu, threshold=0.01)``: the HILL cost map is computed once into a variable that is
   never used, then again inside ``additive_distortion(x, zeros_like(x))``, which returns D = |x - 0| * cost and
   its sum. The cost map uses C x C kernels (``H.repeat(channels, channels, 1, 1)``), so every output channel
   is the cost of the channel sum, built afresh on every call, with reflect padding. The plaintext budget is
   ``tau * sum(D)``; the selected plaintext elements are set to 0 in a deep copy of x, in four greedy phases,
   each on the full tensor (already-moved elements get D = +inf):
     a. one threshold pass: every element with ``D * numel / sum(D) < tau``;
     b. repeated threshold passes, each taking every remaining element with
        ``D * n_remaining < budget_left``, for as long as the previous pass moved more than 1000 elements.
        (The reference sets ``n_remaining = numel - moved_in_this_pass``, not cumulatively, and updates
        ``budget_left`` only at the start of a pass, so phase c starts from a stale, too large budget whenever b
        ran at all; we keep both);
     c. top-k halving: k = n_remaining // 2; take the k smallest remaining (``torch.topk`` on the flattened
        tensor, ``np.unravel_index`` back) if their sum is below the budget left, else halve k; stop when
        k <= 20 or the budget is spent. After a take it also gathers ``D[taken]`` just to count it;
     d. repeated argmin: move the single smallest remaining element while the spent distortion (a 0-d tensor,
        accumulated in place) is still below the budget.
   Every phase takes a smallest-D prefix of the remaining elements, so the result is the smallest-D prefix of
   the ascending order. Phase d stops only once the spent distortion reaches the budget, so (when phase b did
   not run, and so the stale budget of phase c cannot overshoot) the prefix is the shortest one whose sum is
   >= tau * sum(D): exactly one element longer than ``common.selection``'s rule (the longest prefix whose sum
   is <= tau * sum(D)), unless a prefix sum hits the budget exactly. Sorting ties and float32 (reference)
   against float64 (ours) can reorder near-equal D; that is all.
2. [pack] ``remain_img = img_cpu - new_image`` (dense, zeros at encrypted positions); ``count_zeros(new_image)``
   (computed for a progress print); ``convert_dense_to_coo``: ``nonzero(as_tuple=True)``, values gathered with
   it, then ``nonzero()`` a second time for the (n, 4) index tensor, which the container copies into a numpy
   array (``np.array(indices)``).
3. [encrypt] ``coo.encrypt(context)``: in place, ``values = ts.ckks_vector(context, values)`` over all n values
   (a float32 torch tensor; TenSEAL converts it through ``np.array(...).flatten().tolist()`` and splits it into
   ceil(n / 4096) ciphertexts).
4. [server] in ``get_x_prev_and_pred_x0_enc``: ``remain_x_prev = factor * remain_x + add_part`` on the whole
   dense tensor, then ``coo_x_prev = factor * coo_x + add_part``, which goes through the container's operators:
   ``factor * coo`` -> ``scalar * CKKSVector`` (multiply + rescale) wrapped in a new container, ``coo + add_part``
   -> ``add_part[indices.T]`` gathered (see the torch departure below), ``CKKSVector + torch tensor`` (TenSEAL
   converts the tensor to a list and adds it as plaintext), wrapped in a new container.
5. [decrypt] ``coo_x_prev.decrypt()``: ``CKKSVector.decrypt()`` to a Python list, wrapped in a new container.
6. [merge] ``merge_tensor(remain_x_prev)``: ``copy.deepcopy`` of the dense remainder, then a per-element Python
   loop ``dense[tuple(index)] = value`` over the n decrypted values.

The container matters for the timing: its constructor keeps a torch index tensor as ``np.array(indices)``, but
rebuilds any other index array element by element, ``np.array([tuple(index) for index in indices])``. The
derived containers of steps 4 and 5 (scalar product, sum, decryption) are all built from the numpy index array
of their parent, so every step runs that per-element loop three times over the n indices.

Not timed, as it is the same in every path: computing ``add_part`` (our ``b``) from the guided noise prediction
(``dir_xt + noise - factor * sqrt(1 - abar_t) * e_t``, with ``noise = 0 * randn(...)`` at eta = 0), a handful of
dense elementwise torch ops (~0.1 ms at 4 x 64 x 64). ``sparse_step`` takes ``f`` (the reference's ``factor``, a
Python float) and ``b`` ready made, and, in the reference's order, updates the dense remainder before the COO part.

Baseline (``baseline_step``): the reference's dense HE path (``sparse=False``): ``ts.ckks_tensor(context, img)``,
TenSEAL's default ``batch=False``, i.e. one ciphertext per latent element; ``factor * enc + add_part``;
``torch.tensor(enc.decrypt().tolist())``. ``baseline_vector_step`` is our variant with one size-1 ``ts.ckks_vector``
per element in a Python loop (the reference only has this idea in a commented-out line of
``COOSparseTensor.encrypt``, with size-1 ``ckks_tensor`` objects).

Departures from the reference, and why:
* torch 2.x: the reference gathers ``add_part`` at the COO indices with ``other[self.indices.T]``, a (4, n) numpy
  array used as the index. torch <= 2.1 treated a short non-tuple sequence whose items are sequences (a numpy
  array included) as a tuple of per-dimension indices (NumPy's legacy heuristic in ``treatSequenceAsTuple``);
  since pytorch PR #108954 (Sept 2023, so torch 2.2 on; release not checked) a numpy array is one index tensor
  into dimension 0, and the same line raises ``IndexError: index 1 is out of bounds for dimension 0``. We write
  the same gather as ``other[tuple(self.indices.T)]``, which is what torch 1.x did with it. Likewise
  ``np.array(torch_tensor)`` is written ``np.array(tensor.numpy())`` (the same copy; numpy 2 warns on the former).
* no Galois keys: the reference calls ``context.generate_galois_keys()`` (enc_plms.py ``plms_sampling``, and
  ``get_encryption_context`` in coo_sparse.py) but nothing rotates. They are made once per run, take ~1.5 s to
  generate here, and grow the serialised public context from ~4.4 MB to ~97 MB; they change no per-step cost.
  ``paper_context(galois_keys=True)`` makes them. (``scripts/enc_txt2img.py`` also builds a second context,
  N = 16384 with Galois keys, that is never used.)
* batch of one image: the reference samples ``n_samples = 3`` images per batch and selects over the whole batch
  at once (one budget shared by the 3 latents); every per-element cost below scales with the batch. ``sparse_step``
  accepts a (B, C, H, W) batch.
* no prints: the reference prints progress lines per step, and TenSEAL prints a 3-line warning for every vector
  that needs several ciphertexts (captured and dropped here).
* ``enc_txt2img.py`` runs the whole sampler inside ``autocast("cpu")`` by default (``--precision autocast``), under
  which the three ``conv2d`` of each HILL cost map run in bfloat16 on CPU (if their torch could reflect-pad
  bfloat16 at all; not checked). We run them in float32: the time is the same here (~1 ms per cost map either
  way), and float32 is the cost map the paper describes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import time
from dataclasses import dataclass, field

import numpy as np
import tenseal as ts
import torch
import torch.nn.functional as F

PAPER_POLY_MODULUS_DEGREE = 8192
PAPER_COEFF_MOD_BIT_SIZES = (31, 26, 26, 26, 26, 26, 26, 31)
PAPER_SCALE_BITS = 26
PAPER_SLOTS = PAPER_POLY_MODULUS_DEGREE // 2
DEFAULT_TAU = 0.01  # enc_plms.py calls remove_points(img_cpu, threshold=0.01) (the function's default is 0.005)


def paper_context(galois_keys: bool = False) -> ts.Context:
    """A secret-key-holding context with the reference code's parameters (it also makes Galois keys; off here)."""
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=PAPER_POLY_MODULUS_DEGREE,
        coeff_mod_bit_sizes=list(PAPER_COEFF_MOD_BIT_SIZES),
    )
    ctx.global_scale = 2**PAPER_SCALE_BITS
    if galois_keys:
        ctx.generate_galois_keys()
    return ctx


def as_reference_tensor(latent: np.ndarray) -> torch.Tensor:
    """(C, H, W) numpy -> (1, C, H, W) float32 torch, the reference's layout (done outside the timed region)."""
    x = torch.as_tensor(np.asarray(latent, dtype=np.float32))
    return x.unsqueeze(0) if x.dim() == 3 else x


# --- selection (ldm/distortion.py) ----------------------------------------------------------------------------


def _reflect_conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Reflect-pad by half the kernel (at most size - 1), then a valid convolution."""
    kh, kw = kernel.size(2), kernel.size(3)
    ph, pw = min(kh // 2, x.size(2) - 1), min(kw // 2, x.size(3) - 1)
    return F.conv2d(F.pad(x, pad=[pw, pw, ph, ph], mode="reflect"), kernel, padding=0)


def hill_cost_reference(x: torch.Tensor) -> torch.Tensor:
    """HILL cost with C x C kernels (each output channel sums over all input channels), reflect padding.

    The kernels are built on every call, as in the reference.
    """
    while x.dim() < 4:
        x = x.unsqueeze(0)
    c = x.size(1)
    highpass = torch.tensor([[-1, 2, -1], [2, -4, 2], [-1, 2, -1]], dtype=torch.float32)[None, None].repeat(c, c, 1, 1)
    box3 = torch.ones(c, c, 3, 3, dtype=torch.float32) / 9
    box15 = torch.ones(c, c, 15, 15, dtype=torch.float32) / 225
    m3 = _reflect_conv(torch.abs(_reflect_conv(x, highpass)), box3)
    zero = torch.where(m3 == 0)
    m3[zero] = 1.0
    m4 = 1 / m3
    m4[zero] = 0
    return _reflect_conv(m4, box15)


def _distortion(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, map) of |x - y| * HILL cost of x."""
    d = torch.abs(x - y) * hill_cost_reference(x)
    return torch.sum(d), d


def greedy_plaintext_selection(x: torch.Tensor, tau: float = DEFAULT_TAU) -> torch.Tensor:
    """The encrypted part of ``x``: a copy with the greedily chosen plaintext elements set to 0 (see module doc)."""
    hill_cost_reference(x)  # the reference computes a cost map here that it never uses, then again below
    total, d = _distortion(x, torch.zeros_like(x))
    encrypted = copy.deepcopy(x)
    budget = total * tau

    # a. one threshold pass
    take = torch.where(d * d.numel() / total < tau)
    encrypted[take] = 0
    moved = d[take].numel()
    n_remaining = d.numel() - moved
    spent = torch.sum(d[take])
    d[take] = math.inf
    left = budget - spent

    # b. repeated threshold passes while the last one moved more than 1000 elements
    while moved > 1000:
        left = budget - spent
        take = torch.where(d * n_remaining < left)
        spent += torch.sum(d[take])
        encrypted[take] = 0
        d[take] = math.inf
        moved = d[take].numel()
        n_remaining = d.numel() - moved  # sic: the reference's count, see module doc

    # c. top-k halving (``left`` is still the value from before the last pass of b, as in the reference)
    k = n_remaining // 2
    while spent < budget and k > 20:
        smallest, flat = torch.topk(d.flatten(), k, largest=False)
        where = np.unravel_index(flat.numpy(), d.shape)
        if torch.sum(smallest) < left:
            encrypted[where] = 0
            d[where] = math.inf
            n_remaining -= d[where].numel()
            spent += torch.sum(smallest)
            left = budget - spent
            if k >= n_remaining:
                k = n_remaining // 2
        else:
            k //= 2

    # d. one element at a time
    while spent < budget:
        where = np.unravel_index(torch.argmin(d).item(), encrypted.shape)
        spent += d[where]
        encrypted[where] = 0
        d[where] = math.inf
    return encrypted


def count_zeros(x: torch.Tensor, epsilon: float = 1e-6) -> int:
    """What the reference computes every step for its ``print("zeros: ", ...)``."""
    return torch.sum(torch.abs(x) < epsilon).item()


# --- COO container and the sparse step (ldm/coo_sparse.py, enc_plms.py) -----------------------------------------


class CooLatent:
    """Values (plaintext torch tensor, CKKSVector, or decrypted list) at COO indices of a dense shape.

    As the reference's container: a torch index tensor is copied into a numpy array; any other index array is
    rebuilt with a per-element Python loop, one tuple per index ("np.array([tuple(index) for index in indices])").
    """

    def __init__(self, values, indices, shape):
        self.values = values
        if isinstance(indices, torch.Tensor):
            self.indices = np.array(indices.numpy())
        else:
            self.indices = np.array([tuple(row) for row in indices])
        self.shape = shape

    def __len__(self) -> int:
        return len(self.indices)

    def scaled(self, factor: float) -> CooLatent:
        """``factor * coo`` for a Python scalar: ciphertext x plaintext scalar, in a new container."""
        return CooLatent(factor * self.values, self.indices, self.shape)

    def plus(self, dense: torch.Tensor) -> CooLatent:
        """``coo + dense``: the dense tensor gathered at the indices and added to the values, in a new container."""
        gathered = dense[tuple(self.indices.T)]  # torch 1.x: ``dense[self.indices.T]`` (module doc)
        return CooLatent(self.values + gathered, self.indices, self.shape)


def dense_to_coo(dense: torch.Tensor) -> CooLatent:
    """The nonzero elements of ``dense``: ``nonzero`` twice (as a tuple for the gather, then as an (n, ndim) tensor)."""
    values = dense[dense.nonzero(as_tuple=True)]
    return CooLatent(values, dense.nonzero(), dense.shape)


def encrypt_coo(coo: CooLatent, ctx: ts.Context) -> CooLatent:
    """One CKKSVector over all the values, in place (the container is returned for convenience)."""
    with contextlib.redirect_stdout(io.StringIO()):  # TenSEAL warns that > 4096 values take several ciphertexts
        coo.values = ts.ckks_vector(ctx, coo.values)
    return coo


def server_update(coo: CooLatent, remainder: torch.Tensor, f: float, b: torch.Tensor) -> tuple[CooLatent, torch.Tensor]:
    """f * x + b on the plaintext remainder (dense), then on the encrypted COO values (b gathered at the indices)."""
    remainder_next = f * remainder + b
    return coo.scaled(f).plus(b), remainder_next


def decrypt_coo(coo: CooLatent) -> CooLatent:
    return CooLatent(coo.values.decrypt(), coo.indices, coo.shape)


def merge_coo(coo: CooLatent, dense: torch.Tensor) -> torch.Tensor:
    """A deep copy of ``dense`` with every COO value written into it, one element at a time."""
    out = copy.deepcopy(dense)
    for value, index in zip(coo.values, coo.indices):
        out[tuple(index)] = value
    return out


SPARSE_STAGES = ("select", "pack", "encrypt", "server", "decrypt", "merge")


@dataclass
class SparseResult:
    latent: torch.Tensor  # (B, C, H, W) float32, the updated latent
    n_encrypted: int
    n_ciphertexts: int
    times: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.times.values())


def sparse_step(x: torch.Tensor, f: float, b: torch.Tensor, ctx: ts.Context, tau: float = DEFAULT_TAU) -> SparseResult:
    """One denoising update on the paper's sparse path, timed stage by stage (all on one process)."""
    f = float(f)  # the reference's ``factor`` is ``math.sqrt(...)``, a Python float (its COO ``*`` tests for it)
    t0 = time.perf_counter()
    encrypted_part = greedy_plaintext_selection(x, tau)
    t1 = time.perf_counter()
    remainder = x - encrypted_part
    count_zeros(encrypted_part)
    coo = dense_to_coo(encrypted_part)
    t2 = time.perf_counter()
    encrypt_coo(coo, ctx)
    t3 = time.perf_counter()
    enc_next, remainder_next = server_update(coo, remainder, f, b)
    t4 = time.perf_counter()
    dec = decrypt_coo(enc_next)
    t5 = time.perf_counter()
    out = merge_coo(dec, remainder_next)
    t6 = time.perf_counter()
    times = {name: z - a for name, a, z in zip(SPARSE_STAGES, (t0, t1, t2, t3, t4, t5), (t1, t2, t3, t4, t5, t6))}
    return SparseResult(latent=out, n_encrypted=len(coo), n_ciphertexts=-(-len(coo) // PAPER_SLOTS), times=times)


# --- per-element baseline (enc_plms.py, sparse=False) --------------------------------------------------------------


BASELINE_STAGES = ("encrypt", "server", "decrypt")


def baseline_step(
    values: torch.Tensor, f: float, b: torch.Tensor, ctx: ts.Context
) -> tuple[list[float], dict[str, float]]:
    """The reference's dense path on the given elements: one ciphertext per element (CKKSTensor, no batching)."""
    f = float(f)
    t0 = time.perf_counter()
    enc = ts.ckks_tensor(ctx, values)  # TenSEAL's default batch=False, as in the reference
    t1 = time.perf_counter()
    upd = f * enc + b
    t2 = time.perf_counter()
    out = torch.tensor(upd.decrypt().tolist())
    t3 = time.perf_counter()
    return out.tolist(), dict(zip(BASELINE_STAGES, (t1 - t0, t2 - t1, t3 - t2)))


def baseline_vector_step(
    values: torch.Tensor, f: float, b: torch.Tensor, ctx: ts.Context
) -> tuple[list[float], dict[str, float]]:
    """Our variant: one size-1 CKKSVector per element, looped in Python (not a path the reference runs)."""
    xs, bs = values.flatten().tolist(), b.flatten().tolist()
    t0 = time.perf_counter()
    enc = [ts.ckks_vector(ctx, [v]) for v in xs]
    t1 = time.perf_counter()
    upd = [f * ct + [bv] for ct, bv in zip(enc, bs)]
    t2 = time.perf_counter()
    out = [ct.decrypt()[0] for ct in upd]
    t3 = time.perf_counter()
    return out, dict(zip(BASELINE_STAGES, (t1 - t0, t2 - t1, t3 - t2)))
