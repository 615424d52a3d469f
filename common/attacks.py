"""Honest-but-curious server attacks: what the server can rebuild from what one generation sends it.

The server knows the public weights, the scheduler and the prompt embeddings. These functions take exactly
what a mode puts on the wire and try to get the latent (and the prompt) back:

* :func:`invert_linear_conv`: least-squares inversion of a linear head (``conv_in``), exact up to rounding.
* :func:`invert_by_gradient`: Adam on the latent to match the activations of a non-linear head.
* :func:`recover_tokens_greedy`: the prompt's tokens from its per-token text-encoder states, position by
  position (the CLIP text encoder is causal, so state ``i`` depends on tokens ``0..i`` only).
* :func:`recover_from_plaintext_history`: the start noise from the plaintext share of every step when the
  server also knows the noise predictions (the paper's reference-code setting).
* :func:`train_activation_decoder`: a learned decoder (:class:`ActivationDecoder`) from a sent activation to
  latents, trained on pairs the server makes itself by running the public pipeline on prompts of its choosing.
* :func:`invert_linear_projection`: the inputs of a public linear map from its outputs (prompt embeddings from
  cross-attention keys or values), with the rank that decides whether the answer is unique.
* :func:`nearest_template`: which of the server's own candidate encodings is nearest a (noised) observation.
* :func:`add_relative_noise`: Gaussian noise at a multiple of a tensor's own standard deviation (the defence the
  measurements try).
* :func:`psnr`, :func:`ssim`: how close a reconstruction is.

Qt-free and web-free: used by ``bench/leakage.py`` and the tests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ActivationDecoder",
    "add_relative_noise",
    "invert_by_gradient",
    "invert_linear_conv",
    "invert_linear_projection",
    "nearest_embedding_tokens",
    "nearest_template",
    "psnr",
    "recover_from_plaintext_history",
    "recover_tokens_greedy",
    "ssim",
    "train_activation_decoder",
]


# --------------------------------------------------------------------------------------------------------
# Similarity measures
# --------------------------------------------------------------------------------------------------------


def _as_batch(x: Tensor | np.ndarray) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).detach().to(torch.float64)
    if t.dim() == 2:
        t = t[None, None]
    elif t.dim() == 3:
        t = t[None]
    if t.dim() != 4:
        raise ValueError(f"expected a 2-D, 3-D or 4-D array, got shape {tuple(t.shape)}")
    return t


def psnr(estimate: Tensor | np.ndarray, reference: Tensor | np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; ``data_range`` defaults to the reference's max - min.

    An exact match gives ``inf``; callers that write JSON cap it.
    """
    a, b = _as_batch(estimate), _as_batch(reference)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    rng = float(b.max() - b.min()) if data_range is None else float(data_range)
    mse = float(((a - b) ** 2).mean())
    if mse == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(rng**2 / mse))


def ssim(estimate: Tensor | np.ndarray, reference: Tensor | np.ndarray, data_range: float | None = None) -> float:
    """Mean structural similarity (Wang et al. 2004: Gaussian window, sigma 1.5, K1 0.01, K2 0.03), per channel.

    The window is 11 pixels, or the image size when smaller (latents can be 8x8); valid positions only.
    """
    a, b = _as_batch(estimate), _as_batch(reference)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    rng = float(b.max() - b.min()) if data_range is None else float(data_range)
    rng = rng if rng > 0 else 1.0
    size = min(11, a.shape[-1], a.shape[-2])
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    channels = a.shape[1]
    window = (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, window, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


# --------------------------------------------------------------------------------------------------------
# Latent reconstruction
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def invert_linear_conv(
    conv: torch.nn.Conv2d, activations: Tensor, max_iter: int = 500, rtol: float = 1e-10
) -> tuple[Tensor, dict]:
    """The least-squares latent ``x`` with ``conv(x) ~= activations`` (conjugate gradient on the normal equations).

    ``conv`` is the public ``conv_in`` (stride 1, any padding). The system has ``C_out * H * W`` equations for
    ``C_in * H * W`` unknowns; with ``C_out > C_in`` and a generic kernel it has one solution, which CG in
    float64 finds to rounding. Returns ``(x, info)`` with the iterations used and the final relative residual.
    """
    if not isinstance(conv, torch.nn.Conv2d) or conv.stride != (1, 1) or conv.groups != 1:
        raise ValueError("invert_linear_conv needs a stride-1, ungrouped Conv2d")
    w = conv.weight.detach().to(torch.float64)
    pad = conv.padding
    y = activations.detach().to(torch.float64)
    if conv.bias is not None:
        y = y - conv.bias.detach().to(torch.float64)[None, :, None, None]

    def forward(x: Tensor) -> Tensor:
        return F.conv2d(x, w, padding=pad)

    def adjoint(r: Tensor) -> Tensor:
        return F.conv_transpose2d(r, w, padding=pad)

    b = adjoint(y)
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = float((r * r).sum())
    b_norm = max(float(b.norm()), 1e-300)
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 (the count is reported)
        ap = adjoint(forward(p))
        alpha = rs / float((p * ap).sum())
        x += alpha * p
        r -= alpha * ap
        rs_new = float((r * r).sum())
        if rs_new**0.5 <= rtol * b_norm:
            rs = rs_new
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x, {"iterations": iterations, "relative_residual": rs**0.5 / b_norm}


def invert_by_gradient(
    forward: Callable[[Tensor], Sequence[Tensor]],
    targets: Sequence[Tensor],
    shape: tuple[int, ...],
    steps: int = 300,
    lr: float = 0.1,
    init: Tensor | None = None,
) -> tuple[Tensor, dict]:
    """Find ``x`` with ``forward(x) ~= targets`` by Adam (cosine-decayed step) from ``init`` (zeros: the prior mean).

    Each target's squared error is divided by its variance so activations of different scales count alike.
    ``forward`` must be differentiable (public weights, no ``torch.no_grad``). Returns ``(x, info)``.
    """
    targets = [t.detach() for t in targets]
    scales = [float(t.var()) or 1.0 for t in targets]
    x = (torch.zeros(shape) if init is None else init.detach().clone()).to(targets[0].dtype).requires_grad_(True)

    def loss() -> Tensor:
        return sum(((o - t) ** 2).mean() / s for o, t, s in zip(forward(x), targets, scales))

    first, last = _minimise([x], loss, steps, lr)
    return x.detach(), {"steps": steps, "first_loss": first, "final_loss": last}


def _minimise(params: Sequence[Tensor], loss: Callable[[], Tensor], steps: int, lr: float) -> tuple[float, float]:
    """Adam with a cosine-decayed step on ``loss()``; returns its first and last value."""
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    first = last = float("nan")
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        opt.step()
        sched.step()
        last = float(value.detach())
        if i == 0:
            first = last
    return first, last


def recover_from_plaintext_history(
    shape: tuple[int, ...],
    plain_masks: Sequence[np.ndarray],
    plain_values: Sequence[np.ndarray],
    scales: Sequence[float],
    offsets: Sequence[np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """The start noise ``x_0`` where any step sent it in plaintext, given the server's knowledge of the trajectory.

    With a deterministic sampler and a server that knows every noise prediction, each step's latent is
    ``x_i = scales[i] * x_0 + offsets[i]`` elementwise with public ``scales`` and server-known ``offsets``. So a
    value of ``x_i`` sent in plaintext at position ``k`` gives ``x_0[k]``. ``plain_masks[i]`` is True where step
    ``i`` sent the value in plaintext, ``plain_values[i]`` those values in flat order. Returns ``(x_0 estimate,
    recovered)``: unrecovered positions are 0, the prior mean of the start noise.
    """
    est = np.zeros(int(np.prod(shape)))
    known = np.zeros(est.size, dtype=bool)
    for m, v, s, o in zip(plain_masks, plain_values, scales, offsets):
        flat = np.asarray(m, dtype=bool).ravel()
        est[flat] = (np.asarray(v, dtype=np.float64) - np.asarray(o, dtype=np.float64).ravel()[flat]) / s
        known |= flat
    return est.reshape(shape), known.reshape(shape)


# --------------------------------------------------------------------------------------------------------
# Prompt reconstruction
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def recover_tokens_greedy(
    encode: Callable[[Tensor], Tensor],
    hidden: Tensor,
    vocab_size: int,
    bos_id: int,
    eos_id: int,
    batch: int = 4096,
) -> list[int]:
    """Token ids whose encoder states match ``hidden`` (``(L, D)``), chosen one position at a time.

    ``encode(ids (B, n)) -> (B, n, D)`` is the public, causal text encoder. Position ``i`` tries every token
    after the already recovered prefix and keeps the one whose state ``i`` is nearest. Stops after the first
    end token: the tokenizer pads with end tokens, which the caller can check by re-encoding.
    """
    hidden = hidden.detach()
    ids = [bos_id]
    for i in range(1, hidden.shape[0]):
        best_tok, best_d = -1, float("inf")
        prefix = torch.tensor(ids, dtype=torch.long)
        for lo in range(0, vocab_size, batch):
            cand = torch.arange(lo, min(lo + batch, vocab_size), dtype=torch.long)
            seqs = torch.cat([prefix.expand(len(cand), -1), cand[:, None]], dim=1)
            states = encode(seqs)[:, i, :].to(hidden.dtype)
            d = ((states - hidden[i]) ** 2).sum(dim=-1)
            j = int(d.argmin())
            if float(d[j]) < best_d:
                best_tok, best_d = int(cand[j]), float(d[j])
        ids.append(best_tok)
        if best_tok == eos_id:
            break
    return ids


@torch.no_grad()
def nearest_embedding_tokens(token_embedding: Tensor, position_embedding: Tensor, hidden: Tensor) -> list[int]:
    """Baseline: per position, the token whose input embedding (+ position embedding) is nearest the state."""
    inputs = token_embedding.detach()[None, :, :] + position_embedding.detach()[: hidden.shape[0], None, :]
    d = ((inputs - hidden.detach()[:, None, :].to(inputs.dtype)) ** 2).sum(dim=-1)
    return [int(v) for v in d.argmin(dim=1)]


@torch.no_grad()
def invert_linear_projection(weight: Tensor, outputs: Tensor) -> tuple[Tensor, dict]:
    """The inputs ``x`` with ``x @ weight.T ~= outputs`` by least squares (float64), and whether they are unique.

    ``weight`` is a public ``(out, in)`` projection such as a cross-attention ``to_k`` / ``to_v``; ``outputs`` is
    ``(..., out)``. With ``rank == in`` (full column rank) the least-squares answer is the only one, so sending
    keys or values instead of the prompt embeddings hides nothing. Returns ``(x, {"rank", "columns"})``.
    """
    w = weight.detach().to(torch.float64)
    y = outputs.detach().to(torch.float64)
    flat = y.reshape(-1, w.shape[0])
    x = torch.linalg.lstsq(w, flat.T).solution.T
    # numerical rank at the weight's own precision: float32 rounding must not count as extra dimensions
    rtol = torch.finfo(weight.dtype).eps * max(w.shape) if weight.dtype.is_floating_point else None
    rank = int(torch.linalg.matrix_rank(w, rtol=rtol))
    return x.reshape(*y.shape[:-1], w.shape[1]), {"rank": rank, "columns": int(w.shape[1])}


@torch.no_grad()
def nearest_template(candidates: Tensor, observed: Tensor) -> int:
    """Index of the candidate (``(M, ...)``, the server's own encodings of prompts it can guess) nearest
    ``observed`` in squared distance: under Gaussian noise, the most likely of the candidates."""
    d = (candidates.detach().to(torch.float64) - observed.detach().to(torch.float64)[None]) ** 2
    return int(d.reshape(d.shape[0], -1).sum(dim=1).argmin())


def add_relative_noise(x: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """``x`` plus Gaussian noise of standard deviation ``sigma`` times ``x``'s own (whole-tensor) std."""
    if sigma < 0:
        raise ValueError(f"noise sigma must be >= 0 (a multiple of the activation's std), got {sigma}")
    if sigma == 0:
        return x
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x + sigma * float(x.detach().std()) * noise


# --------------------------------------------------------------------------------------------------------
# Learned decoder
# --------------------------------------------------------------------------------------------------------


class ActivationDecoder(nn.Module):
    """A small convolutional decoder: a sent activation (guidance branches stacked on channels) plus a few
    per-example conditions (timestep, noise level) -> latent-shaped estimates.

    Inputs and targets are standardised per channel with the training set's statistics (kept as buffers), so
    one learning rate suits activations and latents of any scale.
    """

    def __init__(
        self,
        in_channels: int,
        in_hw: tuple[int, int],
        out_channels: int,
        out_hw: tuple[int, int],
        conditions: int = 2,
        width: int = 64,
    ):
        super().__init__()
        self.out_hw = (int(out_hw[0]), int(out_hw[1]))
        ups = max(0, round(math.log2(max(out_hw[0] / in_hw[0], 1.0))))
        c_in = in_channels + conditions
        layers: list[nn.Module] = [nn.Conv2d(c_in, width, 3, padding=1), nn.SiLU()]
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.SiLU()]
        # most of the work at the activation's (low) resolution, narrower at each doubling: cheap on a CPU
        c = width
        for _ in range(ups):
            narrower = max(c // 2, 16)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, narrower, 3, padding=1), nn.SiLU()]
            c = narrower
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(c, out_channels, 3, padding=1)
        self.register_buffer("in_mean", torch.zeros(1, in_channels, 1, 1))
        self.register_buffer("in_std", torch.ones(1, in_channels, 1, 1))
        self.register_buffer("out_mean", torch.zeros(1, out_channels, 1, 1))
        self.register_buffer("out_std", torch.ones(1, out_channels, 1, 1))

    def forward(self, activation: Tensor, conditions: Tensor) -> Tensor:
        """``activation`` ``(N, C, h, w)``, ``conditions`` ``(N, k)`` -> ``(N, C_out, H, W)`` in target units."""
        a = (activation - self.in_mean) / self.in_std
        cond = conditions[:, :, None, None].expand(-1, -1, a.shape[2], a.shape[3])
        y = self.body(torch.cat([a, cond.to(a.dtype)], dim=1))
        if tuple(y.shape[2:]) != self.out_hw:
            y = F.interpolate(y, size=self.out_hw, mode="nearest")
        return self.head(y) * self.out_std + self.out_mean


def _channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return mean, std


def train_activation_decoder(
    activations: Tensor,
    conditions: Tensor,
    targets: Tensor,
    steps: int = 600,
    batch: int = 32,
    lr: float = 2e-3,
    width: int = 64,
    noise_levels: Sequence[float] = (0.0,),
    seed: int = 0,
) -> tuple[ActivationDecoder, dict]:
    """Fit an :class:`ActivationDecoder` on ``(activations, conditions) -> targets`` with Adam (cosine decay).

    ``activations`` ``(N, C, h, w)`` are what the server would receive, ``conditions`` ``(N, k)`` what it knows
    besides (e.g. the timestep), ``targets`` ``(N, C_out, H, W)`` what it wants back. ``noise_levels``: each
    example is trained at a level drawn from it, noised by :func:`add_relative_noise`, and the level is appended
    to its conditions, so one decoder serves a client that adds noise at any of those levels (pass the level as
    the last condition at inference). Returns ``(decoder, info)`` with the first and final training loss.
    """
    if activations.shape[0] != targets.shape[0] or activations.shape[0] != conditions.shape[0]:
        raise ValueError(
            f"activations, conditions and targets need one row per example: got {activations.shape[0]}, "
            f"{conditions.shape[0]} and {targets.shape[0]}"
        )
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got {steps} and {batch}")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dec = ActivationDecoder(
            activations.shape[1],
            tuple(activations.shape[2:]),
            targets.shape[1],
            tuple(targets.shape[2:]),
            conditions=conditions.shape[1] + 1,
            width=width,
        )
    acts, tgts = activations.detach().float(), targets.detach().float()
    dec.in_mean, dec.in_std = _channel_stats(acts)
    dec.out_mean, dec.out_std = _channel_stats(tgts)
    levels = torch.tensor([float(v) for v in noise_levels])
    n = acts.shape[0]

    def loss() -> Tensor:
        idx = torch.randint(0, n, (min(batch, n),), generator=g)
        sigma = levels[torch.randint(0, len(levels), (len(idx),), generator=g)]
        a = acts[idx]
        std = a.flatten(1).std(dim=1)
        a = a + (sigma * std)[:, None, None, None] * torch.randn(a.shape, generator=g)
        cond = torch.cat([conditions[idx].float(), sigma[:, None]], dim=1)
        return (((dec(a, cond) - tgts[idx]) / dec.out_std) ** 2).mean()

    t0 = time.perf_counter()
    first, last = _minimise(list(dec.parameters()), loss, steps, lr)
    dec.eval()
    return dec, {
        "examples": n,
        "steps": steps,
        "batch": batch,
        "first_loss": round(first, 4),
        "final_loss": round(last, 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }
