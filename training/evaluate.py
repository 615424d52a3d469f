"""Prompt adherence of a shapes model on held-out prompts: diffusers' plaintext pipeline and our encrypted
generation side by side, same seeds, plus the PSNR between the two outputs.

    python -m training.evaluate                       # embedded model, all 240 held-out prompts, 20 steps
    python -m training.evaluate --limit 40 --no-encrypted

Writes a JSON report (default bench/results/embedded-eval.json) and a grid of the first images.
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
from training.checker import check
from training.shapes import Scene, held_out_scenes, training_scene


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def seen_scenes(n: int) -> list[Scene]:
    """Single-shape training-distribution scenes (for tuning settings without touching the held-out set)."""
    out, i = [], 0
    while len(out) < n:
        scene, _ = training_scene(10_000_000 + i, seed=1, two_shape_fraction=0.0)
        out.append(scene)
        i += 1
    return out


def plaintext_images(model_dir: Path, prompts: list[str], seeds: list[int], steps: int, guidance: float, batch: int):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    images = []
    for s in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(seed) for seed in seeds[s : s + batch]]
        out = pipe(
            prompts[s : s + batch], num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np"
        ).images
        images.extend((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
    return images


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
    verdicts = [check(img, scene) for img, scene in zip(images, scenes)]
    n = len(verdicts)
    return {
        "n": n,
        "colour": sum(v.colour for v in verdicts) / n,
        "shape": sum(v.shape for v in verdicts) / n,
        "position": sum(v.position for v in verdicts) / n,
        "all_three": sum(v.all for v in verdicts) / n,
        "per_prompt": [
            {"colour": v.colour, "shape": v.shape, "position": v.position, "read": v.reading.as_dict()}
            for v in verdicts
        ],
    }


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
    scenes = seen_scenes(args.limit or 240) if args.seen else held_out_scenes()
    if args.limit:
        scenes = scenes[: args.limit]
    prompts = [s.caption() for s in scenes]
    seeds = [args.seed + i for i in range(len(scenes))]
    report: dict = {
        "command": "python -m training.evaluate " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": str(args.model),
        "prompts": "seen (training distribution)" if args.seen else "held-out colour/shape pairs",
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": "plms",
    }
    t0 = time.monotonic()
    plain = plaintext_images(model_dir, prompts, seeds, args.steps, args.guidance, args.batch)
    report["plaintext_s"] = round(time.monotonic() - t0, 1)
    report["plaintext"] = score(plain, scenes)
    print(_summary("plaintext (diffusers)", report["plaintext"]), flush=True)
    save_grid(plain[:48], args.out.with_suffix(".plaintext.png"))
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
        save_grid(enc[:48], args.out.with_suffix(".encrypted.png"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


def _summary(name: str, s: dict) -> str:
    return (
        f"{name}: colour {s['colour']:.1%} shape {s['shape']:.1%} position {s['position']:.1%} "
        f"all three {s['all_three']:.1%} (n={s['n']})"
    )


if __name__ == "__main__":
    sys.exit(main())
