"""Measured leakage: what an honest-but-curious server rebuilds from what each mode sends it.

One DDIM generation per prompt (single-shape captions of the embedded model's grammar, guidance: the model's
recommendation) is run in plaintext to know the truth; for every mode the server's view at each step is formed
from it and attacked with the public weights:

* split ``conv_in`` / ``down0.resnet0``: least-squares inversion of ``conv_in(x_t)`` (``skip0`` for the latter);
* split ``u1`` / ``u2`` / ``u3`` (U-shaped): gradient inversion of the sent activation (both branches); a learned
  decoder the server trains on activations of its own generations (random prompts of the public grammar); and
  gradient inversion started from the decoder's estimate;
* the paper's reference-code setting (the server sees the noise prediction, the plaintext share and the index
  set): the start noise from every step's plaintext values, then the whole trajectory;
* the index set alone: how much the HILL mask correlates with the image's edges and the latent's magnitude;
* the prompt: greedy per-position token search through the public (causal) text encoder, from the embeddings
  and from cross-attention keys sent instead of them; a template match against noised embeddings.

Every verdict is relative to the prompt-only baseline: a server that holds only the prompt runs the sampler
itself (zero start, and the mean image of several random starts). A mode "leaks the image" when its best attack
beats that baseline by at least ``LEAK_MARGIN_DB``. The noise sweep adds Gaussian noise to the U-shaped splits'
sent activation and reports the attack, the baseline and the damage to the image itself.

From a reconstructed ``x_t`` the server predicts ``x_0`` with its own noise prediction and, better, runs the rest
of the sampler itself; both are decoded with the public VAE and compared with the true final image.

    python -m bench.leakage --model tiny --quick
    python -m bench.leakage --model embedded --few-eval-steps
    python -m bench.leakage --model sd15 --quick        # SD 1.5 UNet config, random weights, 32x32 latent
    python -m bench.leakage --update-app               # copy the results into desktop/core/data/leakage.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.report import command_line, machine_info
from hediff.common.attacks import (
    ActivationDecoder,
    add_relative_noise,
    invert_by_gradient,
    invert_linear_conv,
    invert_linear_projection,
    nearest_embedding_tokens,
    nearest_template,
    psnr,
    recover_from_plaintext_history,
    recover_tokens_greedy,
    ssim,
    train_activation_decoder,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
APP_DATA = REPO / "desktop" / "core" / "data" / "leakage.json"

#: PSNR of an exact reconstruction is infinite; JSON gets this cap ("at least").
PSNR_CAP = 100.0
#: Random-mask and min-distortion plaintext share (the paper's tau 0.01 encrypts ~88.6% on Gaussian latents).
RANDOM_MASK_ENCRYPTED = 0.886

APP_FORMAT = "he-diffusion/leakage/v2"
#: A mode leaks the image when its best attack beats the prompt-only baseline by this much (PSNR).
LEAK_MARGIN_DB = 3.0
IMAGE_LEAKS = "leaks the image"
#: Noise on the sent activation, in multiples of its standard deviation.
NOISE_SIGMAS = (0.25, 0.5, 1.0, 2.0, 3.0)
#: Noise on the prompt embeddings, in multiples of their standard deviation.
EMBEDDING_SIGMAS = (0.5, 1.0, 3.0)
#: The server's own caption stream (any seed but the victims').
ATTACKER_SEED = 2024


def _cap(v: float) -> float:
    return round(min(v, PSNR_CAP), 2) if math.isfinite(v) else PSNR_CAP


# --------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    label: str
    note: str
    unet: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    latent_hw: tuple[int, int]
    guidance: float = 7.5  # the model folder's recommendation


def load_setup(model: str, latent: int | None, workdir: Path) -> Setup:
    from hediff.common import models

    if model == "sd15":
        return _sd15_setup(latent or 32, workdir)
    if model == "tiny":
        path = models.build_tiny_model(workdir / "tiny", seed=0)
        note = "tiny random model (common.models.build_tiny_model, seed 0): untrained weights"
    else:
        path = models.resolve_model(model)
        trained = path == models.EMBEDDED_MODEL_DIR
        note = f"model folder {path.name}" + ("" if trained or model != "embedded" else " (tiny fallback: untrained)")
    unet = models.load_unet(path)
    size = latent or int(unet.config.sample_size)
    return Setup(
        label=model,
        note=note,
        unet=unet,
        vae=models.load_vae(path),
        text_encoder=models.load_text_encoder(path),
        tokenizer=models.load_tokenizer(path),
        scheduler_config=models.load_scheduler_config(path),
        latent_hw=(size, size),
        guidance=models.guidance_for(path),
    )


def _sd15_setup(size: int, workdir: Path) -> Setup:
    """SD 1.5 UNet config with random weights; a tiny CLIP-shaped (768-wide, 1 layer) text encoder; no VAE."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from hediff.common import models

    tiny = models.build_tiny_model(workdir / "tiny", seed=0)
    tokenizer = models.load_tokenizer(tiny)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(models.SD15_UNET_CONFIG).eval()
    torch.manual_seed(1)
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=1,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Setup(
        label="sd15",
        note=f"SD 1.5 UNet config, random weights, {size}x{size} latent; text encoder: 1-layer 768-wide CLIP, "
        "random; no VAE (final = latent)",
        unet=unet,
        vae=None,
        text_encoder=CLIPTextModel(cfg).eval(),
        tokenizer=tokenizer,
        scheduler_config=dict(models.SD15_SCHEDULER_CONFIG),
        latent_hw=(size, size),
    )


# --------------------------------------------------------------------------------------------------------
# The true generation and the server's own continuation
# --------------------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    timesteps: list[int]
    latents: list[torch.Tensor]  # x_i, the latent entering step i (1, 4, h, w)
    eps: list[torch.Tensor]  # guided noise prediction of step i
    final: torch.Tensor
    ehs: torch.Tensor  # cat([uncond, cond])


class Sampler:
    """DDIM (eta 0) with classifier-free guidance, as the server can run it itself with the public model."""

    def __init__(self, setup: Setup, steps: int, guidance: float):
        from hediff.common.schedulers import make_scheduler

        self.setup, self.guidance = setup, guidance
        self.scheduler = make_scheduler("ddim", setup.scheduler_config)
        self.scheduler.set_timesteps(steps)
        self.timesteps = [int(t) for t in self.scheduler.timesteps]
        self.eval_steps = _eval_steps(len(self.timesteps))

    @torch.no_grad()
    def eps(self, x: torch.Tensor, t: int, ehs: torch.Tensor) -> torch.Tensor:
        out = self.setup.unet(torch.cat([x, x]), t, encoder_hidden_states=ehs).sample
        uncond, cond = out.chunk(2)
        return uncond + self.guidance * (cond - uncond)

    @torch.no_grad()
    def step(self, e: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        return self.scheduler.step(e, t, x).prev_sample

    @torch.no_grad()
    def run(self, x: torch.Tensor, ehs: torch.Tensor, start: int = 0) -> Trajectory:
        latents, eps = [], []
        for t in self.timesteps[start:]:
            e = self.eps(x, t, ehs)
            latents.append(x)
            eps.append(e)
            x = self.step(e, t, x)
        return Trajectory(self.timesteps, latents, eps, x, ehs)

    @torch.no_grad()
    def predict_x0(self, x: torch.Tensor, t: int, ehs: torch.Tensor) -> torch.Tensor:
        abar = float(self.scheduler.alphas_cumprod[t])
        return (x - math.sqrt(1 - abar) * self.eps(x, t, ehs)) / math.sqrt(abar)


@torch.no_grad()
def decode(setup: Setup, latent: torch.Tensor) -> torch.Tensor:
    """The image in [0, 1] (pipeline decode); the latent itself when the model has no VAE."""
    if setup.vae is None:
        return latent.double()
    image = setup.vae.decode(latent / setup.vae.config.scaling_factor, return_dict=False)[0]
    return (image / 2 + 0.5).clamp(0, 1).double()


def image_scores(setup: Setup, estimate: torch.Tensor, truth: torch.Tensor) -> dict:
    rng = 1.0 if setup.vae is not None else None
    return {"psnr": _cap(psnr(estimate, truth, rng)), "ssim": round(ssim(estimate, truth, rng), 4)}


# --------------------------------------------------------------------------------------------------------
# Server views and attacks
# --------------------------------------------------------------------------------------------------------


def u_view(setup: Setup, depth: int, t: int, ehs: torch.Tensor) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """What a U-shaped split sends: the output of ``down_blocks[depth-1]`` for both guidance branches."""
    from hediff.common.split import _time_embed

    unet = setup.unet

    def forward(x: torch.Tensor) -> list[torch.Tensor]:
        sample = unet.conv_in(torch.cat([x, x]))
        emb = _time_embed(unet.time_proj, unet.time_embedding, unet.time_embed_act, sample, t)
        for block in unet.down_blocks[:depth]:
            if getattr(block, "has_cross_attention", False):
                sample, _ = block(hidden_states=sample, temb=emb, encoder_hidden_states=ehs)
            else:
                sample, _ = block(hidden_states=sample, temb=emb)
        return [sample]

    return forward


def resnet0_view(setup: Setup, t: int) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """``down_blocks[0].resnets[0](conv_in(x))`` alone: split down0.resnet0 if it did not also send skip0."""
    from hediff.common.split import _time_embed

    unet = setup.unet

    def forward(x: torch.Tensor) -> list[torch.Tensor]:
        skip0 = unet.conv_in(x)
        emb = _time_embed(unet.time_proj, unet.time_embedding, unet.time_embed_act, skip0, t)
        return [unet.down_blocks[0].resnets[0](skip0, emb)]

    return forward


def attack_lstsq(setup: Setup, x: torch.Tensor, fp16: bool = False) -> torch.Tensor:
    with torch.no_grad():
        h = setup.unet.conv_in(x)
    if fp16:
        h = h.half().float()
    xr, _ = invert_linear_conv(setup.unet.conv_in, h)
    return xr.float()


def attack_gradient(forward: Callable, x: torch.Tensor, iters: int) -> tuple[torch.Tensor, dict]:
    with torch.no_grad():
        targets = forward(x)
    return invert_by_gradient(forward, targets, tuple(x.shape), steps=iters, lr=0.1)


def random_masks(shape: tuple[int, ...], n: int, fresh: bool, seed: int = 1234) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    masks = []
    for i in range(n):
        if i == 0 or fresh:
            m = np.zeros(size, dtype=bool)
            m[rng.permutation(size)[: round(RANDOM_MASK_ENCRYPTED * size)]] = True
            m = m.reshape(shape)
        masks.append(m)
    return masks


def reference_attack(
    sampler: Sampler, traj: Trajectory, enc_masks: list[np.ndarray | None]
) -> tuple[list[torch.Tensor], float]:
    """Paper's reference code: the server holds every noise prediction plus each step's plaintext share.

    DDIM makes every latent ``x_i = s_i x_0 + o_i`` with public ``s_i`` and ``o_i`` built from the server's noise
    predictions, so each plaintext value gives the start noise at its position. Returns the server's estimate
    of every ``x_i`` (and, last, of the final latent) and the share of the start noise it recovered exactly.
    """
    shape = tuple(traj.latents[0].shape)
    scales, offsets = [1.0], [torch.zeros(shape, dtype=torch.float64)]
    for t, e in zip(traj.timesteps, traj.eps):
        one = sampler.step(torch.zeros(shape, dtype=torch.float64), t, torch.ones(shape, dtype=torch.float64))
        scales.append(scales[-1] * float(one.flatten()[0]))
        offsets.append(sampler.step(e.double(), t, offsets[-1]))
    plain_masks, plain_values = [], []
    for x, m in zip(traj.latents, enc_masks):
        plain = np.zeros(shape, dtype=bool) if m is None else ~m
        plain_masks.append(plain)
        plain_values.append(x.double().numpy()[plain])
    x0, known = recover_from_plaintext_history(
        shape, plain_masks, plain_values, scales[:-1], [o.numpy() for o in offsets]
    )
    x0 = torch.from_numpy(x0)
    return [(s * x0 + o).float() for s, o in zip(scales, offsets)], round(float(known.mean()), 4)


# --------------------------------------------------------------------------------------------------------
# Index set
# --------------------------------------------------------------------------------------------------------


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return round(float((a * b).sum()) / den, 3) if den > 0 else 0.0


def edge_map(setup: Setup, image: torch.Tensor) -> np.ndarray:
    """Gradient magnitude of the final image (grey), averaged down to the latent grid."""
    grey = image.mean(dim=1, keepdim=True).double()
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    gx = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kx[None, None])
    gy = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kx.T[None, None])
    mag = (gx**2 + gy**2).sqrt()
    factor = mag.shape[-1] // setup.latent_hw[1]
    if factor > 1:
        mag = F.avg_pool2d(mag, factor)
    return mag[0, 0].numpy()


def index_set_leakage(setup: Setup, traj: Trajectory, masks: list[np.ndarray], image: torch.Tensor) -> dict:
    from hediff.common.selection import hill_cost

    edges = edge_map(setup, image)
    final = traj.final[0].double().numpy()
    texture = 1.0 / np.maximum(hill_cost(final), 1e-12)  # high where the final latent is busy
    density = [m.mean(axis=0) for m in masks]  # share of the 4 channels encrypted, per latent pixel
    late = np.mean(density[len(density) // 2 :], axis=0)
    rand = random_masks(masks[0].shape, 1, fresh=False)[0].mean(axis=0)
    per_step = []
    for i in _eval_steps(len(masks)):
        x = traj.latents[i][0].double().numpy()
        per_step.append(
            {
                "step": i,
                "encrypted_fraction": round(float(masks[i].mean()), 4),
                "r_mask_vs_abs_latent": _pearson(masks[i], np.abs(x)),
                "r_density_vs_final_edges": _pearson(density[i], edges),
            }
        )
    return {
        "r_late_density_vs_final_edges": _pearson(late, edges),
        "r_late_density_vs_final_texture": _pearson(late, texture),
        "r_random_mask_vs_final_edges": _pearson(rand, edges),
        "per_step": per_step,
    }


# --------------------------------------------------------------------------------------------------------
# Prompts: the victim's, the attacker's, and how much of them the server reads
# --------------------------------------------------------------------------------------------------------


def victim_scenes(n: int) -> list:
    """``n`` single-shape captions of held-out colour/shape pairs, spread over pairs, positions and backgrounds
    (single shapes so that training/checker.py can score the image)."""
    from training.shapes import held_out_scenes

    scenes = held_out_scenes()
    return [scenes[(i * 97) % len(scenes)] for i in range(n)]


def attacker_captions(n: int, seed: int = ATTACKER_SEED) -> list[str]:
    """The server's own prompts: random captions of the public grammar (training/shapes.py), not the victim's."""
    from training.shapes import training_scene

    return [training_scene(i, seed=seed)[0].caption() for i in range(n)]


def _words(tokenizer, ids: list[int]) -> list[str]:
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    return tokenizer.decode([i for i in ids if i not in special]).split()


def _cross_attention_projections(unet: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every cross-attention ``to_k`` / ``to_v`` weight: what the server would get instead of the embeddings."""
    out = []
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            out += [(f"{name}.to_k", module.to_k.weight), (f"{name}.to_v", module.to_v.weight)]
    return out


def prompt_leakage(setup: Setup, prompts: list[str]) -> dict:
    """Tokens back from the prompt embeddings, and from the cross-attention keys sent instead of them."""
    te, tok = setup.text_encoder, setup.tokenizer
    emb = te.get_input_embeddings().weight
    pos = (
        te.embeddings.position_embedding.weight
        if hasattr(te, "embeddings")
        else te.text_model.embeddings.position_embedding.weight
    )
    projections = _cross_attention_projections(setup.unet)
    w_k = projections[0][1] if projections else None

    def encode(ids: torch.Tensor) -> torch.Tensor:
        return te(ids)[0]

    def recovered_hits(hidden: torch.Tensor, true: torch.Tensor, n: int) -> tuple[int, list[int]]:
        rec = recover_tokens_greedy(encode, hidden, int(emb.shape[0]), tok.bos_token_id, tok.eos_token_id)
        rec = (rec + [tok.eos_token_id] * n)[:n]
        return sum(int(a == b) for a, b in zip(rec[1:], true[1:n].tolist())), rec

    rows, tok_hits, tok_total, word_hits, word_total, nn_hits, kv_hits, kv_err = [], 0, 0, 0, 0, 0, 0, 0.0
    t0 = time.perf_counter()
    for prompt in prompts:
        ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        true = ids.input_ids[0]
        with torch.no_grad():
            hidden = te(ids.input_ids)[0][0]
        n = int((true == tok.eos_token_id).nonzero()[0]) + 1  # up to and including the first end token
        hits, rec = recovered_hits(hidden, true, n)
        base = nearest_embedding_tokens(emb, pos, hidden)[:n]
        nn = sum(int(a == b) for a, b in zip(base[1:], true[1:n].tolist()))
        tw, rw = _words(tok, true[:n].tolist()), _words(tok, rec)
        wh = sum(int(a == b) for a, b in zip(tw, rw))
        tok_hits, tok_total, nn_hits = tok_hits + hits, tok_total + n - 1, nn_hits + nn
        word_hits, word_total = word_hits + wh, word_total + len(tw)
        row = {"tokens": n - 1, "token_accuracy": round(hits / (n - 1), 4), "words_recovered": f"{wh}/{len(tw)}"}
        if w_k is not None:
            # the server gets K = E W_k^T instead of E: least squares gives E back, then the same token search
            with torch.no_grad():
                keys = hidden.double() @ w_k.detach().double().T
            rebuilt, _ = invert_linear_projection(w_k, keys)
            err = float((rebuilt - hidden.double()).abs().max() / hidden.double().abs().max())
            kh, _ = recovered_hits(rebuilt.to(hidden.dtype), true, n)
            kv_hits, kv_err = kv_hits + kh, max(kv_err, err)
            row["kv_token_accuracy"] = round(kh / (n - 1), 4)
        rows.append(row)
    kv = None
    if projections:
        ranks = [invert_linear_projection(w, torch.zeros(1, w.shape[0]))[1] for _, w in projections]
        kv = {
            "attack": "least squares on the first cross-attention's keys (K = E W_k^T), then the same token search",
            "projections": len(projections),
            "full_column_rank": sum(int(r["rank"] == r["columns"]) for r in ranks),
            "max_relative_error": float(f"{kv_err:.3g}"),
            "tokens_recovered": f"{kv_hits}/{tok_total}",
            "token_accuracy": round(kv_hits / tok_total, 4),
        }
    return {
        "attack": "greedy per-position search over the vocabulary through the public causal text encoder",
        "prompts": len(prompts),
        "vocab_size": int(emb.shape[0]),
        "token_accuracy": round(tok_hits / tok_total, 4),
        "tokens_recovered": f"{tok_hits}/{tok_total}",
        "word_accuracy": round(word_hits / word_total, 4),
        "baseline_nearest_input_embedding_token_accuracy": round(nn_hits / tok_total, 4),
        "keys_instead_of_embeddings": kv,
        "seconds": round(time.perf_counter() - t0, 1),
        "per_prompt": rows,
    }


@torch.no_grad()
def embedding_noise_leakage(setup: Setup, n_prompts: int, sigmas: tuple[float, ...], seed: int = 0) -> dict:
    """Noise on the prompt embeddings vs a template match: the server encodes every single-shape caption of the
    public grammar itself and takes the nearest to what it received."""
    from training.shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Scene, ShapeSpec

    te, tok = setup.text_encoder, setup.tokenizer
    t0 = time.perf_counter()
    scenes = [
        Scene((ShapeSpec(c, s, p, z),), b)
        for c in COLOURS
        for s in SHAPES
        for p in POSITIONS
        for z in SIZES
        for b in BACKGROUNDS
        if b != c
    ]
    captions = [s.caption() for s in scenes]

    def encode(texts: list[str]) -> torch.Tensor:
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        return te(ids.input_ids)[0]

    candidates = torch.cat([encode(captions[i : i + 128]) for i in range(0, len(captions), 128)])
    victims = victim_scenes(n_prompts)
    index = {c: i for i, c in enumerate(captions)}
    g = torch.Generator().manual_seed(seed + 99)
    rows = []
    for sigma in sigmas:
        colour = caption = 0
        for v in victims:
            truth = candidates[index[v.caption()]]
            got = scenes[nearest_template(candidates, add_relative_noise(truth, sigma, g))]
            colour += int(got.shapes[0].colour == v.shapes[0].colour)
            caption += int(got.caption() == v.caption())
        rows.append(
            {
                "sigma": sigma,
                "colour_recovered": f"{colour}/{len(victims)}",
                "caption_recovered": f"{caption}/{len(victims)}",
            }
        )
    return {
        "attack": f"nearest of the server's own encodings of all {len(captions)} single-shape captions",
        "prompts": len(victims),
        "noise": "Gaussian, sigma x the embedding's std, added to the cond embedding",
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }


# --------------------------------------------------------------------------------------------------------
# The learned decoder: the server trains it on activations it makes itself
# --------------------------------------------------------------------------------------------------------


def u_splits(setup: Setup) -> dict[str, int]:
    """The U-shaped splits this UNet supports, with how many down blocks each runs on the client."""
    from hediff.common.split import U_SPLITS, UnsupportedUNetError, check_unet_config, u_depth

    out = {}
    for name in U_SPLITS:
        try:
            check_unet_config(setup.unet.config, name)
        except UnsupportedUNetError:
            continue
        out[name] = u_depth(name, len(setup.unet.down_blocks))
    return out


@dataclass
class Attacker:
    """One learned decoder per U-shaped split; each outputs the step's latent and the final latent (4 + 4)."""

    decoders: dict[str, ActivationDecoder]
    info: dict


@torch.no_grad()
def attacker_training_set(
    setup: Setup, sampler: Sampler, depths: dict[str, int], n: int, seed: int = ATTACKER_SEED, batch: int = 16
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """What the server would receive at every step of ``n`` generations of its own (random grammar captions,
    random start noise), paired with that step's latent and the final latent.

    Returns ``(activations per split (N, 2C, h, w), conditions (N, 1) = timestep / 1000, targets (N, 8, H, W))``,
    one row per (generation, step); the guidance branches are stacked on channels as the server receives them.
    """
    from hediff.common.models import encode_prompt

    h, w = setup.latent_hw
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        setup.unet.down_blocks[d - 1].register_forward_hook(lambda _m, _i, out, d=d: captured.__setitem__(d, out[0]))
        for d in set(depths.values())
    ]
    acts: dict[str, list[torch.Tensor]] = {name: [] for name in depths}
    conds, targets = [], []
    captions = attacker_captions(n, seed)
    try:
        for lo in range(0, n, batch):
            chunk = captions[lo : lo + batch]
            b = len(chunk)
            enc = [encode_prompt(setup.tokenizer, setup.text_encoder, c) for c in chunk]
            ehs = torch.cat([torch.cat([u for _, u in enc]), torch.cat([c for c, _ in enc])]).float()
            g = torch.Generator().manual_seed(seed * 7919 + lo)
            x = torch.randn((b, 4, h, w), generator=g) * float(sampler.scheduler.init_noise_sigma)
            latents, sent = [], {name: [] for name in depths}
            for t in sampler.timesteps:
                e = sampler.eps(x, t, ehs)
                for name, d in depths.items():
                    sent[name].append(torch.cat([captured[d][:b], captured[d][b:]], dim=1))
                latents.append(x)
                x = sampler.step(e, t, x)
            for i, t in enumerate(sampler.timesteps):
                targets.append(torch.cat([latents[i], x], dim=1))
                conds.append(torch.full((b, 1), t / 1000.0))
                for name in depths:
                    acts[name].append(sent[name][i])
    finally:
        for hook in hooks:
            hook.remove()
    return {k: torch.cat(v) for k, v in acts.items()}, torch.cat(conds), torch.cat(targets)


def train_attacker(
    setup: Setup, sampler: Sampler, prompts: int, steps: int, noise_sigmas: tuple[float, ...], seed: int = ATTACKER_SEED
) -> Attacker:
    t0 = time.perf_counter()
    depths = u_splits(setup)
    acts, conds, targets = attacker_training_set(setup, sampler, depths, prompts, seed)
    data_s = time.perf_counter() - t0
    # half the examples clean, the rest at the swept noise levels (the level is an input: the server knows it)
    levels = (0.0,) * max(1, len(noise_sigmas)) + tuple(noise_sigmas)
    decoders, per_split = {}, {}
    for name in depths:
        decoders[name], per_split[name] = train_activation_decoder(
            acts[name], conds, targets, steps=steps, noise_levels=levels, seed=seed
        )
        print(f"  decoder {name}: loss {per_split[name]['first_loss']} -> {per_split[name]['final_loss']}")
    return Attacker(
        decoders,
        {
            "training_prompts": prompts,
            "examples": int(conds.shape[0]),
            "decoder_steps": steps,
            "noise_levels": list(levels),
            "seconds_data": round(data_s, 1),
            "per_split": per_split,
        },
    )


@torch.no_grad()
def decode_activation(decoder: ActivationDecoder, sent: torch.Tensor, t: int, sigma: float = 0.0):
    """The decoder's ``(x_t, final latent)`` estimates from one step's sent activation ``(2, C, h, w)``."""
    act = sent.reshape(1, -1, *sent.shape[2:])
    pred = decoder(act, torch.tensor([[t / 1000.0, sigma]]))
    return pred[:, :4], pred[:, 4:]


# --------------------------------------------------------------------------------------------------------
# The prompt-only baseline and the verdict relative to it
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def prompt_only_images(setup: Setup, sampler: Sampler, ehs: torch.Tensor, starts: int, seed: int) -> dict:
    """What any server holding the prompt makes without any activation: the sampler from a zero start, and the
    mean image of ``starts`` random starts (seeds it picks, not the victim's)."""
    h, w = setup.latent_hw
    zero = decode(setup, sampler.run(torch.zeros(1, 4, h, w), ehs).final)
    g = torch.Generator().manual_seed(50_000 + seed)
    x = torch.randn((starts, 4, h, w), generator=g) * float(sampler.scheduler.init_noise_sigma)
    uncond, cond = ehs.chunk(2)
    batch_ehs = torch.cat([uncond.expand(starts, -1, -1), cond.expand(starts, -1, -1)])
    mean = decode(setup, sampler.run(x, batch_ehs).final).mean(dim=0, keepdim=True)
    return {"zero start": zero, f"mean of {starts} random starts": mean}


def baseline_scores(setup: Setup, images: dict, truth: torch.Tensor) -> dict:
    """Scores of each prompt-only image against ``truth``; ``best`` is the baseline a verdict is relative to."""
    scores = {name: image_scores(setup, img, truth) for name, img in images.items()}
    best = max(scores, key=lambda k: (scores[k]["psnr"], scores[k]["ssim"]))
    return {**scores, "best": {**scores[best], "from": best}}


def verdict(final_psnr: float, baseline_psnr: float) -> str:
    """Relative to what the prompt alone gives: a server that sees the prompt can always make that image."""
    return IMAGE_LEAKS if final_psnr >= baseline_psnr + LEAK_MARGIN_DB else "leaks little beyond the prompt"


# --------------------------------------------------------------------------------------------------------
# Noise on the sent activation
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def split_generation(
    setup: Setup, sampler: Sampler, split_name: str, x: torch.Tensor, ehs: torch.Tensor, sigma: float, seed: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The product's U-shaped generation (client head and tail, server body) with noise on every sent ``h``.

    Returns the final latent and what the server received at each step.
    """
    from hediff.common.split import split_unet

    client, body = split_unet(setup.unet, split_name)
    g = torch.Generator().manual_seed(seed)
    sent = []
    for t in sampler.timesteps:
        acts, kept = client.head(x, t, ehs)
        noisy = add_relative_noise(acts["h"], sigma, g)
        sent.append(noisy)
        out = client.tail(body({"h": noisy}, t, ehs, latent_size=setup.latent_hw), kept, ehs)
        uncond, cond = out.chunk(2)
        x = sampler.step(uncond + sampler.guidance * (cond - uncond), t, x)
    return x, sent


def _adherence(setup: Setup, image: torch.Tensor, scene) -> bool | None:
    """training/checker.py's verdict (colour, shape and position all right); None where it cannot read the size."""
    from training.checker import check
    from training.shapes import IMAGE_SIZE

    if image.shape[-1] != IMAGE_SIZE or image.shape[1] != 3:
        return None
    pixels = (image[0].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return check(pixels, scene).all


def noise_sweep(
    setup: Setup, sampler: Sampler, attacker: Attacker, victims: list[dict], sigmas: tuple[float, ...], iters: int
) -> dict:
    """Per U-shaped split and noise level: the attack (decoder, then gradient from it) and the prompt-only
    baseline against the image the user gets, and what the noise does to that image."""
    depths = u_splits(setup)
    step = (3 * len(sampler.timesteps)) // 4
    t = sampler.timesteps[step]
    out: dict[str, list[dict]] = {}
    t0 = time.perf_counter()
    for name, depth in depths.items():
        for sigma in sigmas:
            runs = []
            for v in victims:
                final, sent = split_generation(setup, sampler, name, v["x_T"], v["ehs"], sigma, seed=v["seed"] + 17)
                image = decode(setup, final)
                xt, fin = decode_activation(attacker.decoders[name], sent[step], t, sigma)
                view = u_view(setup, depth, t, v["ehs"])
                xg, _ = invert_by_gradient(view, [sent[step]], tuple(xt.shape), steps=iters, lr=0.05, init=xt)
                candidates = [decode(setup, fin)]
                candidates += [decode(setup, sampler.run(x, v["ehs"], start=step).final) for x in (xt, xg)]
                attack = max((image_scores(setup, c, image) for c in candidates), key=lambda s: (s["psnr"], s["ssim"]))
                base = baseline_scores(setup, v["baseline_images"], image)["best"]
                runs.append(
                    {
                        "attack_psnr": attack["psnr"],
                        "attack_ssim": attack["ssim"],
                        "baseline_psnr": base["psnr"],
                        "baseline_ssim": base["ssim"],
                        "image_psnr_vs_clean": image_scores(setup, image, v["image"])["psnr"],
                        "adherent": _adherence(setup, image, v["scene"]),
                    }
                )
            adherent = [r["adherent"] for r in runs if r["adherent"] is not None]
            row = {k: round(float(np.mean([r[k] for r in runs])), 2) for k in runs[0] if k != "adherent"}
            row["sigma"] = sigma
            row["adherence"] = f"{sum(adherent)}/{len(adherent)}" if adherent else None
            row["verdict"] = verdict(row["attack_psnr"], row["baseline_psnr"])
            out.setdefault(name, []).append(row)
            print(f"  noise {name} sigma {sigma}: attack {row['attack_psnr']} dB vs {row['baseline_psnr']} dB")
    clean = [_adherence(setup, v["image"], v["scene"]) for v in victims]
    return {
        "attacked_step": step,
        "prompts": len(victims),
        "clean_adherence": None if None in clean else f"{sum(clean)}/{len(clean)}",
        "attack": "learned decoder (trained with noise at these levels), then gradient inversion from its estimate; "
        "the best of its final latent and running the sampler on from either estimate",
        "splits": out,
        "seconds": round(time.perf_counter() - t0, 1),
    }


# --------------------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------------------


def _eval_steps(n: int, few: bool = False) -> list[int]:
    """First, 25%, 50%, 75% and last step (``few``: first, middle, last)."""
    return sorted({0, n // 2, n - 1}) if few else sorted({0, n // 4, n // 2, (3 * n) // 4, n - 1})


def _final_from(sampler: Sampler, setup: Setup, traj: Trajectory, i: int, xr: torch.Tensor, image: torch.Tensor):
    """Scores of the final image the server gets from its estimate of x_i: x_0 prediction, and running on."""
    t = traj.timesteps[i]
    x0 = sampler.predict_x0(xr, t, traj.ehs)
    run = sampler.run(xr, traj.ehs, start=i).final
    return image_scores(setup, decode(setup, x0), image), image_scores(setup, decode(setup, run), image)


def attack_mode(
    name: str,
    sampler: Sampler,
    setup: Setup,
    traj: Trajectory,
    image: torch.Tensor,
    estimate: Callable,
    direct: Callable[[int], torch.Tensor] | None = None,
) -> dict:
    """Scores of ``estimate(i) -> (x_i estimate, info)`` at the evaluated steps, and of the final images; with
    ``direct(i)`` (called after ``estimate(i)``), also of a final latent the attack estimates directly."""
    steps, x0_pred, run_on, direct_rows = [], [], [], []
    t0 = time.perf_counter()
    for i in sampler.eval_steps:
        xr, info = estimate(i)
        truth = traj.latents[i]
        row = {
            "step": i,
            "timestep": traj.timesteps[i],
            "psnr": _cap(psnr(xr, truth)),
            "ssim": round(ssim(xr, truth), 4),
        }
        row.update(info)
        steps.append(row)
        pred, run = _final_from(sampler, setup, traj, i, xr, image)
        x0_pred.append({"step": i, **pred})
        run_on.append({"step": i, **run})
        if direct is not None:
            direct_rows.append({"step": i, **image_scores(setup, decode(setup, direct(i)), image)})
    best = max(x0_pred + run_on + direct_rows, key=lambda r: (r["psnr"], r["ssim"]))
    print(f"  {name}: x_t PSNR {[r['psnr'] for r in steps]} final {best['psnr']} dB ({time.perf_counter() - t0:.0f} s)")
    out = {
        "x_t": steps,
        "final_from_x0_prediction": x0_pred,
        "final_from_running_on": run_on,
        "final_image": {"psnr": best["psnr"], "ssim": best["ssim"], "from_step": best["step"]},
    }
    if direct is not None:
        out["final_from_direct_estimate"] = direct_rows
    return out


def _mean_rows(runs: list[dict]) -> dict:
    """Average per-prompt mode results (same structure) field by field."""
    out = json.loads(json.dumps(runs[0]))

    def walk(dst, srcs):
        for k, v in dst.items() if isinstance(dst, dict) else enumerate(dst):
            if isinstance(v, (dict, list)):
                walk(v, [s[k] for s in srcs])
            elif isinstance(v, float) and k not in ("step", "timestep"):
                dst[k] = round(float(np.mean([s[k] for s in srcs])), 4)

    walk(out, runs)
    return out


def attack_all(
    setup: Setup,
    sampler: Sampler,
    traj: Trajectory,
    image: torch.Tensor,
    md_masks: list[np.ndarray],
    iters: int,
    attacker: Attacker | None = None,
) -> dict[str, dict]:
    """Every attack on one generation, keyed by attack name."""
    ehs, shape = traj.ehs, tuple(traj.latents[0][0].shape)

    def lstsq(i, fp16=False):
        return attack_lstsq(setup, traj.latents[i], fp16), {}

    def grad(view):
        def est(i):
            xr, info = attack_gradient(view(i), traj.latents[i], iters)
            return xr, {"final_loss": round(info["final_loss"], 6)}

        return est

    def prior(i):
        return torch.zeros_like(traj.latents[i]), {}

    results = {
        "conv_in": attack_mode("conv_in: lstsq", sampler, setup, traj, image, lstsq),
        "conv_in.fp16": attack_mode("conv_in fp16: lstsq", sampler, setup, traj, image, lambda i: lstsq(i, True)),
        "prior": attack_mode("prior mean baseline", sampler, setup, traj, image, prior),
        "down0.resnet0.h_only": attack_mode(
            "resnet0 output only: gradient",
            sampler,
            setup,
            traj,
            image,
            grad(lambda i: resnet0_view(setup, traj.timesteps[i])),
        ),
    }
    for name, depth in u_splits(setup).items():

        def view(i, d=depth):
            return u_view(setup, d, traj.timesteps[i], ehs)

        results[name] = attack_mode(f"{name}: gradient", sampler, setup, traj, image, grad(view))
        if attacker is None:
            continue
        estimates: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def learned(i, view=view, dec=attacker.decoders[name], estimates=estimates):
            with torch.no_grad():
                sent = view(i)(traj.latents[i])[0]
            estimates[i] = decode_activation(dec, sent, traj.timesteps[i])
            return estimates[i][0], {}

        def learned_then_gradient(i, view=view, estimates=estimates):
            with torch.no_grad():
                targets = view(i)(traj.latents[i])
            xr, info = invert_by_gradient(view(i), targets, tuple(traj.latents[i].shape), iters, 0.05, estimates[i][0])
            return xr, {"final_loss": round(info["final_loss"], 6)}

        results[f"{name}.decoder"] = attack_mode(
            f"{name}: learned decoder", sampler, setup, traj, image, learned, direct=lambda i, e=estimates: e[i][1]
        )
        results[f"{name}.decoder+gradient"] = attack_mode(
            f"{name}: gradient from the decoder's estimate", sampler, setup, traj, image, learned_then_gradient
        )
    for label, masks in (
        ("reference.min-distortion", md_masks),
        # the product draws one random mask per generation; a fresh one per step is measured to show why
        ("reference.random-mask", random_masks(shape, len(md_masks), fresh=False)),
        ("reference.random-mask-fresh-each-step", random_masks(shape, len(md_masks), fresh=True)),
        ("reference.full", [None] * len(md_masks)),
    ):
        est, known = reference_attack(sampler, traj, [None if m is None else m[None] for m in masks])
        results[label] = attack_mode(
            f"{label}: plaintext history",
            sampler,
            setup,
            traj,
            image,
            lambda i, e=est, k=known: (e[i], {"start_noise_recovered": k}),
        )
    return results


def run_heads_only(args, setup: Setup) -> dict:
    """Only the head attacks, on start-noise latents at the first, middle and last timestep: no sampler runs.

    For the SD 1.5 configuration on a CPU: the full UNet is too slow to run the sampler many times, and with
    random weights its images mean nothing, so this measures how well each head's activations give x_t back.
    """
    sampler = Sampler(setup, args.steps, args.guidance)
    h, w = setup.latent_hw
    cond = torch.randn(1, 77, setup.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(7))
    ehs = torch.cat([torch.zeros_like(cond), cond])
    heads: dict[str, list[dict]] = {}
    t0 = time.perf_counter()
    for i in _eval_steps(len(sampler.timesteps), few=True):
        t = sampler.timesteps[i]
        x = torch.randn((1, 4, h, w), generator=torch.Generator().manual_seed(args.seed + i))
        views = {"down0.resnet0.h_only": resnet0_view(setup, t)}
        views.update({f"u{d}": u_view(setup, d, t, ehs) for d in (1, 2) if len(setup.unet.down_blocks) > d})
        estimates = {"conv_in": attack_lstsq(setup, x), "conv_in.fp16": attack_lstsq(setup, x, fp16=True)}
        estimates["prior"] = torch.zeros_like(x)
        for name, view in views.items():
            estimates[name] = attack_gradient(view, x, args.grad_iters)[0]
        for name, xr in estimates.items():
            heads.setdefault(name, []).append(
                {"step": i, "timestep": t, "psnr": _cap(psnr(xr, x)), "ssim": round(ssim(xr, x), 4)}
            )
        print(f"  timestep {t}: " + ", ".join(f"{k} {v[-1]['psnr']}" for k, v in heads.items()))
    return {
        "model": setup.label,
        "note": setup.note + "; heads only: Gaussian latents, random prompt embeddings, no sampler run",
        "settings": {
            "steps": args.steps,
            "latent": [4, h, w],
            "gradient_iterations": args.grad_iters,
            "seconds_attacks": round(time.perf_counter() - t0, 1),
        },
        "heads": heads,
    }


def run_model(args, setup: Setup) -> dict:
    from hediff.common.models import encode_prompt
    from hediff.common.selection import min_distortion_mask

    sampler = Sampler(setup, args.steps, args.guidance)
    sampler.eval_steps = _eval_steps(len(sampler.timesteps), few=args.few_eval_steps)
    iters = args.grad_iters
    sigmas = () if args.no_noise else NOISE_SIGMAS
    attacker = None
    if not args.no_decoder:
        print(f"attacker: {args.attacker_prompts} generations of its own, {args.decoder_steps} training steps")
        attacker = train_attacker(setup, sampler, args.attacker_prompts, args.decoder_steps, sigmas)
    modes: dict[str, list[dict]] = {}
    index_runs, enc_fracs, baselines, victims = [], [], [], []
    h, w = setup.latent_hw
    scenes = victim_scenes(args.prompts)
    for p, scene in enumerate(scenes):
        print(f"prompt {p + 1}/{len(scenes)}: {scene.caption()}")
        with torch.no_grad():
            cond, uncond = encode_prompt(setup.tokenizer, setup.text_encoder, scene.caption())
        ehs = torch.cat([uncond, cond]).float()
        g = torch.Generator("cpu").manual_seed(args.seed + p)
        x_T = torch.randn((1, 4, h, w), generator=g) * float(sampler.scheduler.init_noise_sigma)
        traj = sampler.run(x_T, ehs)
        image = decode(setup, traj.final)
        md_masks = [min_distortion_mask(x[0].double().numpy()) for x in traj.latents]
        enc_fracs.append(float(np.mean([m.mean() for m in md_masks])))

        results = attack_all(setup, sampler, traj, image, md_masks, iters, attacker)
        for k, v in results.items():
            modes.setdefault(k, []).append(v)
        index_runs.append(index_set_leakage(setup, traj, md_masks, image))
        prompt_only = prompt_only_images(setup, sampler, ehs, args.baseline_starts, seed=p)
        baselines.append({k: image_scores(setup, v, image) for k, v in prompt_only.items()})
        victims.append(
            {
                "scene": scene,
                "ehs": ehs,
                "x_T": x_T,
                "seed": args.seed + p,
                "image": image,
                "baseline_images": prompt_only,
            }
        )
        print(f"  prompt-only baseline: {baselines[-1]}")

    attacks = {k: _mean_rows(v) for k, v in modes.items()}
    baseline = _mean_rows(baselines)
    best = max(baseline, key=lambda k: (baseline[k]["psnr"], baseline[k]["ssim"]))
    baseline["best"] = {**baseline[best], "from": best}
    noise = None
    if attacker is not None and sigmas:
        noise = noise_sweep(setup, sampler, attacker, victims[: args.noise_prompts], sigmas, max(1, iters // 2))
    prompt, template = None, None
    if not args.no_prompt:
        prompt = prompt_leakage(setup, [s.caption() for s in victim_scenes(max(args.text_prompts, len(scenes)))])
        template = embedding_noise_leakage(setup, args.template_prompts, EMBEDDING_SIGMAS)
    return {
        "model": setup.label,
        "note": setup.note,
        "settings": {
            "scheduler": "ddim",
            "steps": args.steps,
            "guidance": args.guidance,
            "latent": [4, h, w],
            "prompts": len(scenes),
            "eval_steps": sampler.eval_steps,
            "gradient_iterations": iters,
            "baseline_random_starts": args.baseline_starts,
            "noise_sweep_prompts": 0 if noise is None else noise["prompts"],
            "mean_min_distortion_encrypted_fraction": round(float(np.mean(enc_fracs)), 4),
        },
        "decoder": None if attacker is None else attacker.info,
        "baseline": baseline,
        "attacks": attacks,
        "modes": mode_table(attacks, baseline, prompt),
        "noise_sweep": noise,
        "index_set": _mean_rows(index_runs),
        "prompt": prompt,
        "prompt_embedding_noise": template,
    }


# --------------------------------------------------------------------------------------------------------
# The per-mode table (what the doc and the app show)
# --------------------------------------------------------------------------------------------------------

_SERVER_SEES = {
    "conv_in": "conv_in(x_t) every step (linear in x_t), its own noise prediction, the prompt embeddings",
    "down0.resnet0": "skip0 = conv_in(x_t) and resnets[0](skip0) every step, its own noise prediction, the prompt "
    "embeddings",
    "u1": "the output of down_blocks[0] (both guidance branches), the prompt embeddings; no latent, no noise "
    "prediction",
    "u2": "the output of down_blocks[1] (both guidance branches), the prompt embeddings; no latent, no noise "
    "prediction",
    "u3": "the output of the last down block (both guidance branches), the prompt embeddings; it runs only the mid "
    "block; no latent, no noise prediction",
    "reference": "the noise prediction (the reference code runs the whole UNet in the clear), the plaintext share "
    "and the index set every step; no head activations",
}
_ENCRYPTION_SEES = {
    "full": "ciphertexts only",
    "min-distortion": "~11% of the latent in plaintext + the index set (a bitmap computed from x_t)",
    "random-mask": "~11% of the latent in plaintext at data-independent positions (one mask per generation)",
    "none": "the whole latent in plaintext",
}
_U_ATTACKS = {
    "": "gradient inversion of the sent activations (Adam from zeros)",
    ".decoder": "learned decoder trained on the server's own generations (random prompts of the public grammar)",
    ".decoder+gradient": "gradient inversion started from the learned decoder's estimate",
}


def mode_table(attacks: dict, baseline: dict, prompt: dict | None) -> list[dict]:
    """One row per (split, encryption): what the server receives, its best measured attack, the prompt-only
    baseline, and the verdict relative to that baseline."""
    rows = []
    base = baseline["best"]
    kv = (prompt or {}).get("keys_instead_of_embeddings") or {}

    def add(split, encryption, candidates: dict[str, str], override: dict | None = None):
        key = max(candidates, key=lambda k: (attacks[k]["final_image"]["psnr"], attacks[k]["final_image"]["ssim"]))
        a = attacks[key]
        latent = _ENCRYPTION_SEES[encryption]
        if split.startswith("u"):
            latent = "stays on the client (the encryption setting does not apply)"
        final = dict(a["final_image"])
        xt = [{"step": r["step"], "psnr": r["psnr"], "ssim": r["ssim"]} for r in a["x_t"]]
        if override:
            final, xt = override["final"], override["x_t"]
        rows.append(
            {
                "split": split,
                "encryption": encryption,
                "server_receives": f"{_SERVER_SEES[split]}; latent: {latent}",
                "attack": candidates[key],
                "x_t": xt,
                "final_image": final,
                "baseline": {"psnr": base["psnr"], "ssim": base["ssim"], "from": base["from"]},
                "prompt_token_accuracy": None if prompt is None else prompt["token_accuracy"],
                "prompt_kv_token_accuracy": kv.get("token_accuracy"),
                "verdict": verdict(final["psnr"], base["psnr"]),
            }
        )

    exact = {"final": {"psnr": PSNR_CAP, "ssim": 1.0, "from_step": 0}, "x_t": None}
    for split in ("conv_in", "down0.resnet0"):
        what = "conv_in(x_t)" if split == "conv_in" else "skip0"
        for enc in ("full", "min-distortion", "random-mask", "none"):
            if enc == "none":
                steps = [{"step": r["step"], "psnr": PSNR_CAP, "ssim": 1.0} for r in attacks["conv_in"]["x_t"]]
                add(split, enc, {"conv_in": "none needed: x_t is sent in plaintext"}, {**exact, "x_t": steps})
            else:
                add(split, enc, {"conv_in": f"least-squares inversion of {what} (conjugate gradient, float64)"})
    for split in ("u1", "u2", "u3"):
        candidates = {split + k: v for k, v in _U_ATTACKS.items() if split + k in attacks}
        if candidates:
            for enc in ("full", "min-distortion", "random-mask", "none"):
                add(split, enc, candidates)
    for enc in ("full", "min-distortion", "random-mask"):
        add(
            "reference",
            enc,
            {
                f"reference.{enc}": "start noise from every step's plaintext values via the public DDIM recursion, "
                "then the trajectory"
            },
        )
    return rows


# --------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    if "heads" in report:
        lines = [
            f"### Head inversion, model `{report['model']}` ({report['note']})",
            "",
            f"Command: `{report['command']}`  ",
            f"Settings: {json.dumps(report['settings'])}",
            "",
            "| server view (attack) | x_t PSNR dB / SSIM by step |",
            "|---|---|",
        ]
        for k, rows in report["heads"].items():
            lines.append(f"| {k} | " + ", ".join(f"{r['step']}: {r['psnr']:g} / {r['ssim']:g}" for r in rows) + " |")
        return "\n".join(lines) + "\n"
    base = report["baseline"]["best"]
    lines = [
        f"### Leakage, model `{report['model']}` ({report['note']})",
        "",
        f"Command: `{report['command']}`  ",
        f"Settings: {json.dumps(report['settings'])}",
        "",
        f"Prompt-only baseline (a server that holds only the prompt runs the sampler itself): {base['psnr']:g} dB / "
        f"{base['ssim']:g} ({base['from']}); "
        + ", ".join(f"{k}: {v['psnr']:g} dB / {v['ssim']:g}" for k, v in report["baseline"].items() if k != "best"),
        "",
        "| split | encryption | best attack | x_t PSNR dB by step | final image PSNR dB / SSIM | prompt only "
        "| verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["modes"]:
        steps = ", ".join(f"{s['step']}: {s['psnr']:g}" for s in r["x_t"])
        f, b = r["final_image"], r["baseline"]
        lines.append(
            f"| {r['split']} | {r['encryption']} | {r['attack']} | {steps} | {f['psnr']:g} / {f['ssim']:g} | "
            f"{b['psnr']:g} / {b['ssim']:g} | {r['verdict']} |"
        )
    lines += ["", "Attacks (mean over prompts): x_t PSNR per evaluated step, best final-image PSNR / SSIM", ""]
    lines += ["| attack | x_t PSNR dB by step | final image PSNR / SSIM (from step) |", "|---|---|---|"]
    for k, a in report["attacks"].items():
        steps = ", ".join(f"{s['step']}: {s['psnr']:g}" for s in a["x_t"])
        f = a["final_image"]
        lines.append(f"| {k} | {steps} | {f['psnr']:g} / {f['ssim']:g} ({f['from_step']}) |")
    if report.get("decoder"):
        d = report["decoder"]
        losses = ", ".join(
            f"{k} {v['first_loss']:g} -> {v['final_loss']:g} ({v['seconds']:g} s)" for k, v in d["per_split"].items()
        )
        lines += [
            "",
            f"Learned decoder: {d['training_prompts']} generations of the server's own ({d['examples']} examples, "
            f"{d['seconds_data']:g} s), {d['decoder_steps']} Adam steps per split; training loss {losses}",
        ]
    noise = report.get("noise_sweep")
    if noise:
        lines += [
            "",
            f"Noise on the sent activation (sigma x its std), attacked at step {noise['attacked_step']}, "
            f"{noise['prompts']} prompts; clean adherence {noise['clean_adherence']}:",
            "",
            "| split | sigma | attack PSNR / SSIM | prompt only | image vs clean PSNR | adherence | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for split, rows in noise["splits"].items():
            for r in rows:
                lines.append(
                    f"| {split} | {r['sigma']:g} | {r['attack_psnr']:g} / {r['attack_ssim']:g} | "
                    f"{r['baseline_psnr']:g} / {r['baseline_ssim']:g} | {r['image_psnr_vs_clean']:g} | "
                    f"{r['adherence']} | {r['verdict']} |"
                )
    ix = report["index_set"]
    lines += [
        "",
        "Index set alone (min-distortion, tau 0.01): Pearson r of the encrypted-channel density (late steps) with "
        f"the final image's edges {ix['r_late_density_vs_final_edges']}, with the final latent's texture "
        f"{ix['r_late_density_vs_final_texture']}; a random mask: {ix['r_random_mask_vs_final_edges']}; per step "
        "r(mask, |x_t|): " + ", ".join(f"{s['step']}: {s['r_mask_vs_abs_latent']}" for s in ix["per_step"]),
    ]
    if report["prompt"]:
        p = report["prompt"]
        lines += [
            "",
            f"Prompt: {p['prompts']} prompts, tokens {p['tokens_recovered']} (accuracy {p['token_accuracy']}), word "
            f"accuracy {p['word_accuracy']} (nearest input embedding baseline: "
            f"{p['baseline_nearest_input_embedding_token_accuracy']}), {p['seconds']} s",
        ]
        kv = p.get("keys_instead_of_embeddings")
        if kv:
            lines.append(
                f"Keys instead of embeddings: {kv['full_column_rank']}/{kv['projections']} cross-attention "
                f"projections have full column rank; embeddings back to {kv['max_relative_error']:g} (relative), "
                f"tokens {kv['tokens_recovered']}"
            )
    if report.get("prompt_embedding_noise"):
        t = report["prompt_embedding_noise"]
        lines.append(
            f"Noise on the embeddings ({t['attack']}): "
            + ", ".join(
                f"sigma {r['sigma']:g}: colour {r['colour_recovered']}, caption {r['caption_recovered']}"
                for r in t["rows"]
            )
        )
    return "\n".join(lines) + "\n"


def app_entry(report: dict) -> dict:
    """The part the desktop app ships: per (split, encryption) the best attack, the prompt-only baseline, the
    prompt recovery and the verdict."""
    modes = []
    for r in report["modes"]:
        modes.append(
            {
                "split": r["split"],
                "encryption": r["encryption"],
                "attack": r["attack"],
                "final_psnr": r["final_image"]["psnr"],
                "final_ssim": r["final_image"]["ssim"],
                "baseline_psnr": r["baseline"]["psnr"],
                "baseline_ssim": r["baseline"]["ssim"],
                "x_t_psnr_min": min(s["psnr"] for s in r["x_t"]),
                "x_t_psnr_max": max(s["psnr"] for s in r["x_t"]),
                "prompt_token_accuracy": r["prompt_token_accuracy"],
                "leaks_image": r["verdict"] == IMAGE_LEAKS,
                "verdict": r["verdict"],
            }
        )
    return {"model": report["model"], "note": report["note"], "command": report["command"], "modes": modes}


def update_app(results_dir: Path, target: Path = APP_DATA) -> Path:
    models = {}
    for f in sorted(results_dir.glob("leakage-*.json")):
        report = json.loads(f.read_text())
        # heads-only reports have no per-mode final-image numbers; reports from before the prompt-only baseline
        # have no verdict the app may show
        if "modes" in report and "baseline" in report:
            models[report["model"]] = app_entry(report)
    if not models:
        raise SystemExit(f"no leakage-*.json in {results_dir}: run python -m bench.leakage --model tiny first")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"format": APP_FORMAT, "models": models}, indent=1) + "\n")
    print(f"wrote {target} ({', '.join(models)})")
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny, embedded, sd15, or a model folder")
    ap.add_argument("--quick", action="store_true", help="fewer steps, prompts, iterations and decoder training")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--grad-iters", type=int, default=None)
    ap.add_argument("--latent", type=int, default=None, help="latent side (default: the model's; sd15: 32)")
    ap.add_argument("--guidance", type=float, default=None, help="default: the model folder's recommendation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attacker-prompts", type=int, default=None, help="generations the server makes to train on")
    ap.add_argument("--decoder-steps", type=int, default=None, help="Adam steps per learned decoder")
    ap.add_argument("--no-decoder", action="store_true", help="skip the learned-decoder attack (and the noise sweep)")
    ap.add_argument("--baseline-starts", type=int, default=4, help="random starts the prompt-only baseline averages")
    ap.add_argument("--no-noise", action="store_true", help="skip the noise sweep on the sent activation")
    ap.add_argument("--noise-prompts", type=int, default=None, help="prompts for the noise sweep")
    ap.add_argument("--no-prompt", action="store_true", help="skip the prompt attacks")
    ap.add_argument("--text-prompts", type=int, default=3, help="prompts for the prompt attack (at least --prompts)")
    ap.add_argument("--template-prompts", type=int, default=30, help="prompts for the embedding-noise template match")
    ap.add_argument("--few-eval-steps", action="store_true", help="attack the first, middle and last step only")
    ap.add_argument("--heads-only", action="store_true", help="only invert the heads (no sampler; for sd15 on a CPU)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--update-app", action="store_true", help="only copy bench/results/leakage-*.json into the app")
    args = ap.parse_args(argv)
    if args.update_app:
        update_app(args.out)
        return 0
    args.steps = args.steps or (10 if args.quick else 20)
    args.prompts = args.prompts or (2 if args.quick else 3)
    args.grad_iters = args.grad_iters or (150 if args.quick else 300)
    args.attacker_prompts = args.attacker_prompts or (16 if args.quick else 64)
    args.decoder_steps = args.decoder_steps or (200 if args.quick else 800)
    args.noise_prompts = args.noise_prompts or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hediff-leak-") as tmp:
        setup = load_setup(args.model, args.latent, Path(tmp))
        args.guidance = setup.guidance if args.guidance is None else args.guidance
        report = run_heads_only(args, setup) if args.heads_only else run_model(args, setup)
    report["command"] = command_line("bench.leakage", argv)
    report["machine"] = machine_info(seconds=round(time.perf_counter() - t0, 1))
    name = f"leakage-{Path(args.model).name}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    (args.out / f"{name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
