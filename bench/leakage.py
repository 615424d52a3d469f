"""Measured leakage: what an honest-but-curious server rebuilds from what each mode sends it.

One DDIM generation per prompt (guidance 7.5) is run in plaintext to know the truth; for every mode the server's
view at each step is formed from it and attacked with the public weights:

* split ``conv_in`` / ``down0.resnet0``: least-squares inversion of ``conv_in(x_t)`` (``skip0`` for the latter);
* split ``u1`` / ``u2`` (U-shaped): gradient inversion of the output of ``down_blocks[k-1]`` (both branches);
* the paper's reference-code setting (the server sees the noise prediction, the plaintext share and the index
  set): the start noise from every step's plaintext values, then the whole trajectory;
* the index set alone: how much the HILL mask correlates with the image's edges and the latent's magnitude;
* the prompt: greedy per-position token search through the public (causal) text encoder.

From a reconstructed ``x_t`` the server predicts ``x_0`` with its own noise prediction and, better, runs the rest
of the sampler itself; both are decoded with the public VAE and compared with the true final image.

    python -m bench.leakage --model tiny --quick
    python -m bench.leakage --model embedded
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
    invert_by_gradient,
    invert_linear_conv,
    nearest_embedding_tokens,
    psnr,
    recover_from_plaintext_history,
    recover_tokens_greedy,
    ssim,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
APP_DATA = REPO / "desktop" / "core" / "data" / "leakage.json"

#: PSNR of an exact reconstruction is infinite; JSON gets this cap ("at least").
PSNR_CAP = 100.0
#: Random-mask and min-distortion plaintext share (the paper's tau 0.01 encrypts ~88.6% on Gaussian latents).
RANDOM_MASK_ENCRYPTED = 0.886

PROMPTS = [
    "a red circle on a blue background",
    "a small green square",
    "two yellow triangles on white",
    "portrait of my neighbour anna at the clinic",
    "a purple star above a black line",
    "confidential product sketch: folding bicycle",
]


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
# Prompt
# --------------------------------------------------------------------------------------------------------


def _words(tokenizer, ids: list[int]) -> list[str]:
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    return tokenizer.decode([i for i in ids if i not in special]).split()


def prompt_leakage(setup: Setup, prompts: list[str]) -> dict:
    te, tok = setup.text_encoder, setup.tokenizer
    emb = te.get_input_embeddings().weight
    pos = (
        te.embeddings.position_embedding.weight
        if hasattr(te, "embeddings")
        else te.text_model.embeddings.position_embedding.weight
    )

    def encode(ids: torch.Tensor) -> torch.Tensor:
        return te(ids)[0]

    rows, tok_hits, tok_total, word_hits, word_total, nn_hits = [], 0, 0, 0, 0, 0
    t0 = time.perf_counter()
    for prompt in prompts:
        ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        true = ids.input_ids[0]
        with torch.no_grad():
            hidden = te(ids.input_ids)[0][0]
        n = int((true == tok.eos_token_id).nonzero()[0]) + 1  # up to and including the first end token
        rec = recover_tokens_greedy(encode, hidden, int(emb.shape[0]), tok.bos_token_id, tok.eos_token_id)
        rec = (rec + [tok.eos_token_id] * n)[:n]
        base = nearest_embedding_tokens(emb, pos, hidden)[:n]
        hits = sum(int(a == b) for a, b in zip(rec[1:], true[1:n].tolist()))
        nn = sum(int(a == b) for a, b in zip(base[1:], true[1:n].tolist()))
        tw, rw = _words(tok, true[:n].tolist()), _words(tok, rec)
        wh = sum(int(a == b) for a, b in zip(tw, rw))
        tok_hits, tok_total, nn_hits = tok_hits + hits, tok_total + n - 1, nn_hits + nn
        word_hits, word_total = word_hits + wh, word_total + len(tw)
        rows.append({"tokens": n - 1, "token_accuracy": round(hits / (n - 1), 4), "words_recovered": f"{wh}/{len(tw)}"})
    return {
        "attack": "greedy per-position search over the vocabulary through the public causal text encoder",
        "prompts": len(prompts),
        "vocab_size": int(emb.shape[0]),
        "token_accuracy": round(tok_hits / tok_total, 4),
        "word_accuracy": round(word_hits / word_total, 4),
        "baseline_nearest_input_embedding_token_accuracy": round(nn_hits / tok_total, 4),
        "seconds": round(time.perf_counter() - t0, 1),
        "per_prompt": rows,
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
    name: str, sampler: Sampler, setup: Setup, traj: Trajectory, image: torch.Tensor, estimate: Callable
) -> dict:
    """Scores of ``estimate(i) -> (x_i estimate, info)`` at the evaluated steps, and of the final images."""
    steps, x0_pred, run_on = [], [], []
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
    best = max(x0_pred + run_on, key=lambda r: (r["psnr"], r["ssim"]))
    print(f"  {name}: x_t PSNR {[r['psnr'] for r in steps]} final {best['psnr']} dB ({time.perf_counter() - t0:.0f} s)")
    return {
        "x_t": steps,
        "final_from_x0_prediction": x0_pred,
        "final_from_running_on": run_on,
        "final_image": {"psnr": best["psnr"], "ssim": best["ssim"], "from_step": best["step"]},
    }


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
    setup: Setup, sampler: Sampler, traj: Trajectory, image: torch.Tensor, md_masks: list[np.ndarray], iters: int
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
    for depth in (1, 2):
        if len(setup.unet.down_blocks) > depth:  # u2 needs a server-side down block left
            results[f"u{depth}"] = attack_mode(
                f"u{depth}: gradient",
                sampler,
                setup,
                traj,
                image,
                grad(lambda i, d=depth: u_view(setup, d, traj.timesteps[i], ehs)),
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
    from hediff.common.selection import min_distortion_mask

    sampler = Sampler(setup, args.steps, args.guidance)
    sampler.eval_steps = _eval_steps(len(sampler.timesteps), few=args.few_eval_steps)
    iters = args.grad_iters
    modes: dict[str, list[dict]] = {}
    index_runs, enc_fracs = [], []
    h, w = setup.latent_hw
    te, tok = setup.text_encoder, setup.tokenizer
    prompts = PROMPTS[: args.prompts]
    for p, prompt in enumerate(prompts):
        print(f"prompt {p + 1}/{len(prompts)}")
        with torch.no_grad():
            from hediff.common.models import encode_prompt

            cond, uncond = encode_prompt(tok, te, prompt)
        ehs = torch.cat([uncond, cond]).float()
        g = torch.Generator("cpu").manual_seed(args.seed + p)
        x_T = torch.randn((1, 4, h, w), generator=g) * float(sampler.scheduler.init_noise_sigma)
        traj = sampler.run(x_T, ehs)
        image = decode(setup, traj.final)
        md_masks = [min_distortion_mask(x[0].double().numpy()) for x in traj.latents]
        enc_fracs.append(float(np.mean([m.mean() for m in md_masks])))

        results = attack_all(setup, sampler, traj, image, md_masks, iters)
        for k, v in results.items():
            modes.setdefault(k, []).append(v)
        index_runs.append(index_set_leakage(setup, traj, md_masks, image))

    attacks = {k: _mean_rows(v) for k, v in modes.items()}
    prompt = None if args.no_prompt else prompt_leakage(setup, PROMPTS[: max(args.text_prompts, len(prompts))])
    return {
        "model": setup.label,
        "note": setup.note,
        "settings": {
            "scheduler": "ddim",
            "steps": args.steps,
            "guidance": args.guidance,
            "latent": [4, h, w],
            "prompts": len(prompts),
            "gradient_iterations": iters,
            "mean_min_distortion_encrypted_fraction": round(float(np.mean(enc_fracs)), 4),
        },
        "attacks": attacks,
        "modes": mode_table(attacks, prompt),
        "index_set": _mean_rows(index_runs),
        "prompt": prompt,
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
    "reference": "the noise prediction (the reference code runs the whole UNet in the clear), the plaintext share "
    "and the index set every step; no head activations",
}
_ENCRYPTION_SEES = {
    "full": "ciphertexts only",
    "min-distortion": "~11% of the latent in plaintext + the index set (a bitmap computed from x_t)",
    "random-mask": "~11% of the latent in plaintext at data-independent positions (one mask per generation)",
    "none": "the whole latent in plaintext",
}


def _verdict(psnr_db: float) -> str:
    if psnr_db >= 40:
        return "leaks the image: the server rebuilds it essentially exactly"
    if psnr_db >= 25:
        return "leaks the image: the server rebuilds a close likeness"
    if psnr_db >= 15:
        return "partial leak: the server rebuilds a rough likeness"
    return "no useful reconstruction by the measured attacks"


def mode_table(attacks: dict, prompt: dict | None) -> list[dict]:
    """One row per (split, encryption): what the server receives, the attack, and the measured numbers."""
    rows = []

    def add(split, encryption, key, attack, override: dict | None = None):
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
                "attack": attack,
                "x_t": xt,
                "final_image": final,
                "prompt_token_accuracy": None if prompt is None else prompt["token_accuracy"],
                "verdict": _verdict(final["psnr"]),
            }
        )

    exact = {"final": {"psnr": PSNR_CAP, "ssim": 1.0, "from_step": 0}, "x_t": None}
    for split in ("conv_in", "down0.resnet0"):
        for enc in ("full", "min-distortion", "random-mask", "none"):
            if enc == "none":
                steps = [{"step": r["step"], "psnr": PSNR_CAP, "ssim": 1.0} for r in attacks["conv_in"]["x_t"]]
                add(split, enc, "conv_in", "none needed: x_t is sent in plaintext", {**exact, "x_t": steps})
            else:
                what = "conv_in(x_t)" if split == "conv_in" else "skip0"
                add(split, enc, "conv_in", f"least-squares inversion of {what} (conjugate gradient, float64)")
    for split in ("u1", "u2"):
        if split in attacks:
            for enc in ("full", "min-distortion", "random-mask", "none"):
                add(split, enc, split, "gradient inversion of the sent activations (Adam from zeros)")
    for enc in ("full", "min-distortion", "random-mask"):
        add(
            "reference",
            enc,
            f"reference.{enc}",
            "start noise from every step's plaintext values via the public DDIM recursion, then the trajectory",
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
    lines = [
        f"### Leakage, model `{report['model']}` ({report['note']})",
        "",
        f"Command: `{report['command']}`  ",
        f"Settings: {json.dumps(report['settings'])}",
        "",
        "| split | encryption | x_t PSNR dB by step | final image PSNR dB / SSIM | verdict |",
        "|---|---|---|---|---|",
    ]
    for r in report["modes"]:
        steps = ", ".join(f"{s['step']}: {s['psnr']:g}" for s in r["x_t"])
        f = r["final_image"]
        lines.append(f"| {r['split']} | {r['encryption']} | {steps} | {f['psnr']:g} / {f['ssim']:g} | {r['verdict']} |")
    lines += ["", "Attacks (mean over prompts): x_t PSNR per evaluated step, best final-image PSNR / SSIM", ""]
    lines += ["| attack | x_t PSNR dB by step | final image PSNR / SSIM (from step) |", "|---|---|---|"]
    for k, a in report["attacks"].items():
        steps = ", ".join(f"{s['step']}: {s['psnr']:g}" for s in a["x_t"])
        f = a["final_image"]
        lines.append(f"| {k} | {steps} | {f['psnr']:g} / {f['ssim']:g} ({f['from_step']}) |")
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
            f"Prompt: {p['prompts']} prompts, token accuracy {p['token_accuracy']}, word accuracy "
            f"{p['word_accuracy']} (nearest input embedding baseline: "
            f"{p['baseline_nearest_input_embedding_token_accuracy']}), {p['seconds']} s",
        ]
    return "\n".join(lines) + "\n"


def app_entry(report: dict) -> dict:
    """The part the desktop app ships: per (split, encryption) the final-image and x_t numbers and the verdict."""
    modes = []
    for r in report["modes"]:
        modes.append(
            {
                "split": r["split"],
                "encryption": r["encryption"],
                "final_psnr": r["final_image"]["psnr"],
                "final_ssim": r["final_image"]["ssim"],
                "x_t_psnr_min": min(s["psnr"] for s in r["x_t"]),
                "x_t_psnr_max": max(s["psnr"] for s in r["x_t"]),
                "prompt_token_accuracy": r["prompt_token_accuracy"],
                "verdict": r["verdict"],
            }
        )
    return {"model": report["model"], "note": report["note"], "command": report["command"], "modes": modes}


def update_app(results_dir: Path, target: Path = APP_DATA) -> Path:
    models = {}
    for f in sorted(results_dir.glob("leakage-*.json")):
        report = json.loads(f.read_text())
        if "modes" in report:  # heads-only reports have no per-mode final-image numbers
            models[report["model"]] = app_entry(report)
    if not models:
        raise SystemExit(f"no leakage-*.json in {results_dir}: run python -m bench.leakage --model tiny first")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"format": "he-diffusion/leakage/v1", "models": models}, indent=1) + "\n")
    print(f"wrote {target} ({', '.join(models)})")
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny, embedded, sd15, or a model folder")
    ap.add_argument("--quick", action="store_true", help="fewer steps, prompts and gradient iterations")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--grad-iters", type=int, default=None)
    ap.add_argument("--latent", type=int, default=None, help="latent side (default: the model's; sd15: 32)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-prompt", action="store_true", help="skip the prompt attack")
    ap.add_argument("--text-prompts", type=int, default=3, help="prompts for the prompt attack (at least --prompts)")
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
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hediff-leak-") as tmp:
        setup = load_setup(args.model, args.latent, Path(tmp))
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
