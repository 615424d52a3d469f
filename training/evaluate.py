"""Prompt adherence of a shapes model on held-out prompts: diffusers' plaintext pipeline and our encrypted
generation side by side, same seeds, plus the PSNR between the two outputs, and the preview decoder against the
full VAE decode of the same latents.

    python -m training.evaluate          # embedded model: 240 one-shape + 128 relation held-out prompts, 20 steps
    python -m training.evaluate --limit 40 --no-encrypted

Writes a JSON report (default bench/results/embedded-eval.json) and grids of the first images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hediff.common.models import REPO_ROOT, guidance_for, resolve_model
from training.checker import check, check_relation
from training.shapes import Scene, held_out_relation_scenes, held_out_scenes, training_scene


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def seen_scenes(n: int) -> list[Scene]:
    """Training-distribution scenes, one-shape and relation alike (for tuning settings without touching the
    held-out set)."""
    return [training_scene(10_000_000 + i, seed=1)[0] for i in range(n)]


def _to_u8(decoded: torch.Tensor) -> list[np.ndarray]:
    """diffusers' own post-processing: [-1, 1] -> [0, 1], clamped, then 8 bits."""
    out = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
    return list((out * 255).round().astype(np.uint8))


def plaintext_images(model_dir: Path, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch: int):
    """diffusers' pipeline: the images, and the final (scaled) latents they were decoded from."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    images, latents = [], []
    for s in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(seed) for seed in seeds[s : s + batch]]
        out = pipe(
            prompts[s : s + batch],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="latent",
        ).images
        latents.extend(out)
        # what the pipeline's output_type="np" does with them
        with torch.no_grad():
            images.extend(_to_u8(pipe.vae.decode(out / pipe.vae.config.scaling_factor).sample))
    return images, latents


@torch.no_grad()
def preview_decoder_report(model_dir: Path, latents: list[torch.Tensor]) -> dict | None:
    """The shipped preview decoder against the full VAE on the same final latents: PSNR, and decode time per
    image (batch 1, this process's torch threads)."""
    from diffusers import AutoencoderKL

    from hediff.common.models import vae_scale_factor
    from hediff.desktop.core.preview_decoder import load_preview_decoder

    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", local_files_only=True).eval()
    tiny = load_preview_decoder(model_dir, vae.config.latent_channels, vae_scale_factor(model_dir))
    if tiny is None:
        return None
    full, quick, t_full, t_tiny = [], [], 0.0, 0.0
    for lat in latents:
        t0 = time.perf_counter()
        full += _to_u8(vae.decode(lat[None] / vae.config.scaling_factor).sample)
        t1 = time.perf_counter()
        quick += _to_u8(tiny(lat[None]))
        t_full, t_tiny = t_full + t1 - t0, t_tiny + time.perf_counter() - t1
    values = [psnr(a, b) for a, b in zip(full, quick)]
    weights = sum(p.numel() for p in tiny.parameters())
    return {
        "psnr_db_vs_vae": {"mean": float(np.mean(values)), "min": float(min(values))},
        "decode_ms": {"preview_decoder": 1000 * t_tiny / len(latents), "vae": 1000 * t_full / len(latents)},
        "parameters": weights,
        "bytes_on_disk": sum(f.stat().st_size for f in (model_dir / "preview_decoder").iterdir()),
        "images": quick,
    }


def encrypted_images(model: str, prompts: list[str], seeds: list[int], steps: int, guidance: float, encryption: str):
    from hediff.desktop.core.api import HEDiffusion

    images = []
    with HEDiffusion(model, local_backend=True) as hd:
        for prompt, seed in zip(prompts, seeds):
            result = hd.generate(
                prompt, steps=steps, guidance=guidance, seed=seed, scheduler="plms", encryption=encryption
            )
            images.append(np.asarray(result.image.convert("RGB")))
    return images


def score(images: list[np.ndarray], scenes: list[Scene]) -> dict:
    """One-shape scenes: colour, background, shape, position. Relation scenes: both colours found, both shapes,
    the relation, background. Each a fraction of its scenes."""
    single = [(check(img, sc), sc) for img, sc in zip(images, scenes) if sc.relation is None]
    pairs = [(check_relation(img, sc), sc) for img, sc in zip(images, scenes) if sc.relation is not None]
    out: dict = {"n": len(scenes)}
    if single:
        n = len(single)
        out["one_shape"] = {
            "n": n,
            **{k: sum(getattr(v, k) for v, _ in single) / n for k in ("colour", "background", "shape", "position")},
            "all_three": sum(v.all for v, _ in single) / n,
        }
    if pairs:
        n = len(pairs)
        out["relation"] = {
            "n": n,
            **{k: sum(getattr(v, k) for v, _ in pairs) / n for k in ("colours", "shapes", "relation", "background")},
            "all": sum(v.all for v, _ in pairs) / n,
        }
    out["background"] = (sum(v.background for v, _ in single) + sum(v.background for v, _ in pairs)) / len(scenes)
    out["per_prompt"] = [
        {
            "prompt": sc.caption(),
            "colour": v.colour,
            "background": v.background,
            "shape": v.shape,
            "position": v.position,
            "read": v.reading.as_dict(),
        }
        for v, sc in single
    ] + [
        {
            "prompt": sc.caption(),
            "colours": v.colours,
            "background": v.background,
            "shapes": v.shapes,
            "relation": v.relation,
            "read": [r.as_dict() for r in v.readings],
        }
        for v, sc in pairs
    ]
    return out


def save_grid(images: list[np.ndarray], path: Path, columns: int = 12) -> None:
    from PIL import Image

    rows = [images[i : i + columns] for i in range(0, len(images), columns)]
    rows[-1] = rows[-1] + [np.zeros_like(images[0])] * (columns - len(rows[-1]))
    grid = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument(
        "--guidance", type=float, default=None, help="default: the model's recommendation (hediff.json), else 7.5"
    )
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N prompts (0: all)")
    p.add_argument("--seen", action="store_true", help="score training-distribution prompts instead (for tuning)")
    p.add_argument("--encryption", default="full", choices=["full", "min-distortion"])
    p.add_argument("--no-encrypted", action="store_true", help="plaintext pipeline only")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=1000, help="seed of prompt i is seed + i")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "embedded-eval.json")
    args = p.parse_args(argv)

    torch.set_num_threads(2)
    model_dir = resolve_model(args.model)
    args.guidance = guidance_for(model_dir, args.guidance)
    scenes = seen_scenes(args.limit or 368) if args.seen else held_out_scenes() + held_out_relation_scenes()
    if args.limit and not args.seen:  # the same share of each kind
        one, rel = held_out_scenes(), held_out_relation_scenes()
        k = max(1, args.limit * len(rel) // len(scenes))
        scenes = one[: args.limit - k] + rel[:k]
    prompts = [s.caption() for s in scenes]
    seeds = [args.seed + i for i in range(len(scenes))]
    report: dict = {
        "command": "python -m training.evaluate " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": str(args.model),
        "prompts": "seen (training distribution)"
        if args.seen
        else "held-out colour/shape pairs (one shape) and held-out colour pairs (relations)",
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": "plms",
    }
    t0 = time.monotonic()
    plain, latents = plaintext_images(model_dir, prompts, seeds, args.steps, args.guidance, args.batch)
    report["plaintext_s"] = round(time.monotonic() - t0, 1)
    report["plaintext"] = score(plain, scenes)
    print(_summary("plaintext (diffusers)", report["plaintext"]), flush=True)
    _save_grids(plain, scenes, args.out.with_suffix(".plaintext.png"))
    preview = preview_decoder_report(model_dir, latents)
    if preview is not None:
        save_grid(preview.pop("images")[:48], args.out.with_suffix(".preview-decoder.png"))
        report["preview_decoder"] = preview
        print(
            f"preview decoder: {preview['psnr_db_vs_vae']['mean']:.1f} dB vs the VAE (min "
            f"{preview['psnr_db_vs_vae']['min']:.1f}), {preview['decode_ms']['preview_decoder']:.1f} ms vs "
            f"{preview['decode_ms']['vae']:.1f} ms per image",
            flush=True,
        )
    if not args.no_encrypted:
        t0 = time.monotonic()
        enc = encrypted_images(args.model, prompts, seeds, args.steps, args.guidance, args.encryption)
        report["encrypted_s"] = round(time.monotonic() - t0, 1)
        report["encryption"] = args.encryption
        report["encrypted"] = score(enc, scenes)
        print(_summary(f"encrypted ({args.encryption})", report["encrypted"]), flush=True)
        values = [psnr(a, b) for a, b in zip(plain, enc)]
        finite = [v for v in values if np.isfinite(v)]
        report["psnr_db"] = {
            "mean": float(np.mean(finite)) if finite else float("inf"),
            "min": float(min(values)),
            "identical": len(values) - len(finite),
        }
        print(f"PSNR plaintext vs encrypted: mean {report['psnr_db']['mean']:.1f} dB, min {min(values):.1f} dB")
        _save_grids(enc, scenes, args.out.with_suffix(".encrypted.png"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


def _save_grids(images: list[np.ndarray], scenes: list[Scene], path: Path) -> None:
    """The first 48 one-shape images, then the first 48 relation images, as one grid each."""
    one = [img for img, sc in zip(images, scenes) if sc.relation is None][:48]
    rel = [img for img, sc in zip(images, scenes) if sc.relation is not None][:48]
    if one:
        save_grid(one, path)
    if rel:
        save_grid(rel, path.with_name(path.stem + "-relations.png"))


def _summary(name: str, s: dict) -> str:
    parts = [f"{name}: background {s['background']:.1%}"]
    if "one_shape" in s:
        o = s["one_shape"]
        parts.append(
            f"one shape (n={o['n']}): colour {o['colour']:.1%} shape {o['shape']:.1%} position {o['position']:.1%} "
            f"all three {o['all_three']:.1%}"
        )
    if "relation" in s:
        r = s["relation"]
        parts.append(
            f"relations (n={r['n']}): both colours {r['colours']:.1%} both shapes {r['shapes']:.1%} "
            f"relation {r['relation']:.1%} all {r['all']:.1%}"
        )
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
