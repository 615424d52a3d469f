"""Train the embedded model from scratch on synthetic shapes and write it to assets/embedded.

    python -m training.train                # full run (about 70 min on 2 CPU cores), resumes if interrupted
    python -m training.train --quick        # a few minutes, for checking the pipeline end to end

Stages (each resumable; state lives in --work, default build/embedded-train):
  1. render the training set (deterministic from --seed),
  2. train the VAE (MSE + a tiny KL term, like SD's autoencoder minus the GAN), on crops, then on whole images,
  3. encode the set to latents and derive the VAE scaling factor (1 / std of the latents),
  4. train the tiny preview decoder (latent -> RGB, a few hundred KB) on those latents,
  5. train the UNet and the text encoder together on latents (epsilon prediction, min-SNR-5 weighting,
     10% empty captions for classifier-free guidance, EMA of the weights): a cosine cycle, then a refinement
     phase at a constant learning rate,
  6. export a diffusers folder (safetensors) + the preview decoder + the fitted linear latent-to-RGB map +
     the training record.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hediff.common.models import EMBEDDED_MODEL_DIR, RECOMMENDED_SETTINGS_FILE, REPO_ROOT, SD15_SCHEDULER_CONFIG
from hediff.desktop.core.preview_decoder import PREVIEW_DECODER_DIR, TinyDecoder
from training.model import build_components, parameter_count
from training.shapes import IMAGE_SIZE, training_scene, vocabulary_words
from training.tokenizer import build_vocab, write_tokenizer


@dataclass
class TrainConfig:
    seed: int = 0
    images: int = 30000
    vae_steps: int = 2750
    # The first steps train on crops: the VAE is convolutional but for its 16x16 mid-block attention, and a
    # 64 px crop costs a quarter of a 128 px image (0.41 s for 32 crops vs 0.88 s for 16 images, 2 cores); the
    # rest on whole images, so the attention sees the whole latent.
    vae_crop_steps: int = 2500
    vae_crop: int = 64
    vae_batch: int = 32
    vae_full_batch: int = 16
    # Measured on the 128 px data: at 1e-3 the VAE drew only each image's mean colour for its first 500 steps
    # (MSE 0.3 on [-1, 1]); at 3e-4 it was at 0.09 by step 300, and after 1000 steps at 1e-3 it was still
    # blurred (24 dB).
    vae_lr: float = 4e-4
    vae_warmup: int = 100
    vae_foreground_weight: float = 10.0
    decoder_steps: int = 1500
    decoder_batch: int = 32
    decoder_lr: float = 2e-3
    # 4500 steps at 0.72 s (2 cores) keep the whole run under 90 minutes.
    unet_steps: int = 4500
    # Steps after the cosine cycle run at refine_lr. Measured on v1's held-out prompts: the model at the end of
    # the cosine cycle placed shapes right 70% of the time (mostly left/right swaps); 1000 more steps at 1.5e-4
    # gave 87%, with colour and shape unchanged or better.
    unet_cosine_steps: int = 4000
    refine_lr: float = 1.5e-4
    unet_batch: int = 64
    unet_lr: float = 6e-4
    warmup: int = 200
    ema_decay: float = 0.999
    uncond_fraction: float = 0.1
    min_snr_gamma: float = 5.0
    checkpoint_every: int = 250
    threads: int = 2


QUICK = {
    "images": 2000,
    "vae_steps": 60,
    "vae_crop_steps": 40,
    "vae_warmup": 10,
    "decoder_steps": 40,
    "unet_steps": 120,
    "unet_cosine_steps": 100,
    "checkpoint_every": 50,
    "warmup": 20,
}


def unet_lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.unet_lr * (step + 1) / cfg.warmup
    if step < cfg.unet_cosine_steps:
        frac = (step - cfg.warmup) / max(1, cfg.unet_cosine_steps - cfg.warmup)
        return cfg.unet_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
    return cfg.refine_lr


def _refine_generator(cfg: TrainConfig) -> torch.Generator:
    # Its own stream, so the refinement phase is reproducible from the checkpoint at the end of the cosine cycle.
    return torch.Generator().manual_seed(cfg.seed + 777)


class Progress:
    """One line per report: stage, step, loss, rate and ETA; stdout so that it can be followed in a log."""

    def __init__(self, stage: str, total: int, start: int = 0):
        self.stage, self.total, self.start, self.t0 = stage, total, start, time.monotonic()

    def report(self, step: int, **values: float) -> None:
        done = step - self.start
        elapsed = time.monotonic() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        vals = " ".join(f"{k}={v:.4f}" for k, v in values.items())
        print(
            f"[{self.stage}] {step}/{self.total} {vals} {rate:.2f} it/s elapsed {elapsed / 60:.1f} min "
            f"ETA {eta / 60:.1f} min",
            flush=True,
        )


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _render_chunk(args: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
    start, stop, seed = args
    imgs, caps = [], []
    for i in range(start, stop):
        scene, img = training_scene(i, seed)
        imgs.append(img)
        caps.append(scene.caption())
    return np.stack(imgs), caps


def render_dataset(cfg: TrainConfig, work: Path) -> tuple[np.ndarray, list[str]]:
    path = work / "dataset.npz"
    if path.is_file():
        data = np.load(path, allow_pickle=False)
        if len(data["captions"]) == cfg.images:
            return data["images"], [str(c) for c in data["captions"]]
    t0 = time.monotonic()
    chunks = [(s, min(s + 1000, cfg.images), cfg.seed) for s in range(0, cfg.images, 1000)]
    from multiprocessing import get_context

    with get_context("spawn").Pool(cfg.threads) as pool:
        parts = pool.map(_render_chunk, chunks)
    images = np.concatenate([p[0] for p in parts])
    captions = [c for p in parts for c in p[1]]
    tmp = work / "dataset.tmp.npz"
    np.savez(tmp, images=images, captions=np.array(captions))
    os.replace(tmp, path)
    print(f"[data] rendered {len(captions)} images in {time.monotonic() - t0:.0f} s", flush=True)
    return images, captions


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _random_crops(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """One ``size`` x ``size`` crop per image at a random position (multiples of 8, so a crop's latent pixels are
    whole latent pixels of the image)."""
    cells = (x.shape[-1] - size) // 8 + 1
    corners = torch.randint(0, cells, (len(x), 2), generator=gen) * 8
    return torch.stack([img[:, y : y + size, xx : xx + size] for img, (y, xx) in zip(x, corners.tolist())])


def train_vae(cfg: TrainConfig, vae, images: np.ndarray, work: Path) -> None:
    path = work / "vae.pt"
    state = torch.load(path, weights_only=False) if path.is_file() else None
    if state is not None and state["step"] >= cfg.vae_steps:
        vae.load_state_dict(state["model"])
        return
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    step = 0
    gen = torch.Generator().manual_seed(cfg.seed + 11)
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        gen.set_state(state["gen"])
    vae.train()
    progress = Progress("vae", cfg.vae_steps, step)
    while step < cfg.vae_steps:
        crop = step < cfg.vae_crop_steps
        idx = torch.randint(0, len(images), (cfg.vae_batch if crop else cfg.vae_full_batch,), generator=gen)
        x = _to_tensor(images[idx.numpy()])
        if crop:
            x = _random_crops(x, cfg.vae_crop, gen)
        lr = cfg.vae_lr * min(1.0, (step + 1) / cfg.vae_warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        # Shapes cover 5-15% of an image: without the weight the VAE learns backgrounds and blurs the shapes'
        # colours (measured: 21% colour accuracy on reconstructions after 700 unweighted steps).
        background = x.flatten(2).median(dim=2).values[:, :, None, None]
        foreground = ((x - background).abs().sum(dim=1, keepdim=True) > 0.1).float()
        weight = 1.0 + (cfg.vae_foreground_weight - 1.0) * foreground
        mse = F.mse_loss(rec, x)
        loss = (weight * (rec - x).pow(2)).mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0 or step == cfg.vae_steps:
            progress.report(step, mse=mse.item())
        if step % cfg.checkpoint_every == 0 or step == cfg.vae_steps:
            _atomic_save(
                {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "gen": gen.get_state()}, path
            )
    vae.eval()


@torch.no_grad()
def encode_latents(cfg: TrainConfig, vae, images: np.ndarray, work: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    path = work / "latents.pt"
    if path.is_file():
        d = torch.load(path, weights_only=True)
        if d["mean"].shape[0] == len(images):
            return d["mean"], d["std"], float(d["scaling_factor"])
    vae.eval()
    means, stds = [], []
    for s in range(0, len(images), 256):
        post = vae.encode(_to_tensor(images[s : s + 256])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    mean, std = torch.cat(means), torch.cat(stds)
    scaling_factor = float(1.0 / mean.std())
    _atomic_save({"mean": mean, "std": std, "scaling_factor": torch.tensor(scaling_factor)}, path)
    print(f"[latents] {tuple(mean.shape)} scaling_factor={scaling_factor:.4f}", flush=True)
    return mean, std, scaling_factor


def train_preview_decoder(
    cfg: TrainConfig, images: np.ndarray, mean: torch.Tensor, std: torch.Tensor, scaling_factor: float, work: Path
) -> TinyDecoder:
    """The per-step preview decoder: scaled latents (sampled like the UNet's training latents) to the image.

    Trained on 8x8-latent crops (64 px): it is all convolutions, and a crop costs a quarter of a whole image.
    """
    path = work / "preview_decoder.pt"
    torch.manual_seed(cfg.seed + 31)
    decoder = TinyDecoder(mean.shape[1])
    state = torch.load(path, weights_only=False) if path.is_file() else None
    if state is not None and state["step"] >= cfg.decoder_steps:
        decoder.load_state_dict(state["model"])
        return decoder.eval()
    opt = torch.optim.AdamW(decoder.parameters(), lr=cfg.decoder_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 37)
    step = 0
    if state is not None:
        decoder.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        gen.set_state(state["gen"])
    scale = decoder.scale_factor
    cells = mean.shape[-1] - 8 + 1
    progress = Progress("preview decoder", cfg.decoder_steps, step)
    decoder.train()
    while step < cfg.decoder_steps:
        idx = torch.randint(0, len(images), (cfg.decoder_batch,), generator=gen)
        corners = torch.randint(0, cells, (cfg.decoder_batch, 2), generator=gen).tolist()
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling_factor
        z = torch.stack([lat[:, y : y + 8, x : x + 8] for lat, (y, x) in zip(z, corners)])
        target = _to_tensor(images[idx.numpy()])
        target = torch.stack(
            [img[:, y * scale : (y + 8) * scale, x * scale : (x + 8) * scale] for img, (y, x) in zip(target, corners)]
        )
        lr = cfg.decoder_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.decoder_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = F.mse_loss(decoder(z), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0 or step == cfg.decoder_steps:
            progress.report(step, mse=loss.item())
        if step % cfg.checkpoint_every == 0 or step == cfg.decoder_steps:
            _atomic_save(
                {"model": decoder.state_dict(), "opt": opt.state_dict(), "step": step, "gen": gen.get_state()}, path
            )
    return decoder.eval()


def tokenize_all(tokenizer, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    return torch.tensor(ids["input_ids"])


def train_unet(cfg, unet, text_encoder, tokenizer, captions, mean, std, scaling_factor, work: Path, on_checkpoint=None):
    from diffusers import DDPMScheduler

    path = work / "unet.pt"
    noise_sched = DDPMScheduler.from_config(
        {k: v for k, v in SD15_SCHEDULER_CONFIG.items() if k not in ("skip_prk_steps", "steps_offset")}
    )
    alphas_cumprod = noise_sched.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr

    ids = tokenize_all(tokenizer, captions)
    empty_ids = tokenize_all(tokenizer, [""])[0]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(cfg.seed + 23)
    step = 0
    if path.is_file():
        state = torch.load(path, weights_only=False)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        ema = state["ema"]
        step = state["step"]
        gen.set_state(state["gen"])
    unet.train()
    text_encoder.train()
    progress = Progress("unet", cfg.unet_steps, step)
    running = None
    while step < cfg.unet_steps:
        if step == cfg.unet_cosine_steps:
            gen = _refine_generator(cfg)
        idx = torch.randint(0, len(captions), (cfg.unet_batch,), generator=gen)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling_factor
        batch_ids = ids[idx].clone()
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.uncond_fraction
        batch_ids[drop] = empty_ids
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        noisy = noise_sched.add_noise(latents, noise, t)
        lr = unet_lr(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        emb = text_encoder(batch_ids)[0]
        pred = unet(noisy, t, emb).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == cfg.unet_steps:
            progress.report(step, loss=running, lr=lr)
        if step % cfg.checkpoint_every == 0 or step == cfg.unet_steps:
            _atomic_save(
                {
                    "unet": unet.state_dict(),
                    "text_encoder": text_encoder.state_dict(),
                    "opt": opt.state_dict(),
                    "ema": ema,
                    "step": step,
                    "gen": gen.get_state(),
                },
                path,
            )
            if on_checkpoint is not None:
                on_checkpoint()
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()


@torch.no_grad()
def fit_preview_map(vae_latents: torch.Tensor, images: np.ndarray, scale: int) -> dict:
    """Least-squares linear map (4 -> 3 with bias) from scaled latents to the image averaged over each latent
    pixel's footprint, in [-1, 1]: what the client shows as the per-step preview."""
    n = min(len(images), 4000)
    x = vae_latents[:n].permute(0, 2, 3, 1).reshape(-1, vae_latents.shape[1]).double()
    img = _to_tensor(images[:n]).double()
    y = F.avg_pool2d(img, scale).permute(0, 2, 3, 1).reshape(-1, 3)
    a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    sol = torch.linalg.lstsq(a, y).solution
    resid = (a @ sol - y).pow(2).mean().sqrt().item()
    return {
        "factors": sol[:-1].tolist(),
        "bias": sol[-1].tolist(),
        "rms_error": resid,
        "note": "rgb[-1..1] = latent (scaled, C) @ factors (C x 3) + bias, per latent pixel",
    }


def export(cfg, vae, unet, text_encoder, tokenizer, scaling_factor, preview, decoder, record, out: Path) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scaling_factor)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    write_tokenizer(tmp / "tokenizer", vocabulary_words())
    (tmp / "preview.json").write_text(json.dumps(preview, indent=2) + "\n", encoding="utf-8")
    decoder.save(tmp / PREVIEW_DECODER_DIR)
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    # Written from the evaluation, not by training (the model card, the recommended guidance): keep them.
    for name in ("README.md", RECOMMENDED_SETTINGS_FILE):
        if (out / name).is_file():
            shutil.copy2(out / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=EMBEDDED_MODEL_DIR, help="where the model folder is written")
    p.add_argument("--work", type=Path, default=REPO_ROOT / "build" / "embedded-train", help="resumable state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny run to check the pipeline (not a usable model)")
    p.add_argument("--unet-steps", type=int, help="override the number of UNet/text-encoder steps")
    p.add_argument("--fresh", action="store_true", help="discard the state in --work and start over")
    args = p.parse_args(argv)

    cfg = TrainConfig(seed=args.seed, **(QUICK if args.quick else {}))
    if args.unet_steps:
        cfg.unet_steps = args.unet_steps
    work = args.work / ("quick" if args.quick else "full")
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / "config.json"
    if cfg_path.is_file() and json.loads(cfg_path.read_text()) != asdict(cfg):
        print(f"{work} holds a run with different settings; pass --fresh to start over.", file=sys.stderr)
        return 2
    cfg_path.write_text(json.dumps(asdict(cfg), indent=2))
    torch.set_num_threads(cfg.threads)
    t0 = time.monotonic()
    elapsed_before = json.loads((work / "elapsed.json").read_text())["s"] if (work / "elapsed.json").is_file() else 0

    from transformers import CLIPTokenizer

    tok_dir = work / "tokenizer"
    write_tokenizer(tok_dir, vocabulary_words())
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    vocab, _ = build_vocab(vocabulary_words())
    torch.manual_seed(cfg.seed)
    vae, unet, text_encoder = build_components(vocab)

    def checkpoint_time() -> float:
        total = elapsed_before + time.monotonic() - t0
        (work / "elapsed.json").write_text(json.dumps({"s": total}))
        return total

    images, captions = render_dataset(cfg, work)
    train_vae(cfg, vae, images, work)
    checkpoint_time()
    mean, std, scaling_factor = encode_latents(cfg, vae, images, work)
    decoder = train_preview_decoder(cfg, images, mean, std, scaling_factor, work)
    checkpoint_time()
    # elapsed.json follows every UNet checkpoint: a resumed run counts the time of the work it keeps
    train_unet(cfg, unet, text_encoder, tokenizer, captions, mean, std, scaling_factor, work, checkpoint_time)
    preview = fit_preview_map(mean * scaling_factor, images, IMAGE_SIZE // mean.shape[-1])
    total_s = checkpoint_time()
    record = {
        "command": "python -m training.train" + (" --quick" if args.quick else ""),
        "config": asdict(cfg),
        "tokenizer": f"CLIPTokenizer, word-level BPE merges ({len(vocab)} tokens)",
        "parameters": {
            "unet": parameter_count(unet),
            "vae": parameter_count(vae),
            "text_encoder": parameter_count(text_encoder),
            "preview_decoder": parameter_count(decoder),
        },
        "vae_scaling_factor": scaling_factor,
        "training_seconds": round(total_s, 1),
        "torch_threads": cfg.threads,
        "torch": torch.__version__,
    }
    export(cfg, vae, unet, text_encoder, tokenizer, scaling_factor, preview, decoder, record, args.out)
    print(f"[done] {args.out} in {total_s / 60:.1f} min (preview rms {preview['rms_error']:.3f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
