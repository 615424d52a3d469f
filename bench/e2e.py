"""End to end on loopback: encrypted vs plaintext split vs diffusers alone, same model and settings, one run.

The backend runs as its own process (`hediff serve`), as it would on a server, so client and server each have
a core. Runs are interleaved (mode A, B, C, A, B, C, ...) so that machine noise hits every mode alike.

    python -m bench.e2e [--model embedded] [--sizes 32,128] [--steps 20] [--repeats 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import command_line, machine_info, save_report
from bench.served import serve_subprocess

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a large red circle at the top left on a blue background"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument(
        "--sizes", default="32,128", help="image sizes in px (the embedded model's VAE downsamples by its factor)"
    )
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scheduler", default="plms")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)

    from diffusers import StableDiffusionPipeline

    from hediff.common.models import resolve_model
    from hediff.common.schedulers import make_scheduler
    from hediff.desktop.core.backend_client import BackendClient
    from hediff.desktop.core.client_model import ClientModel
    from hediff.desktop.core.engine import GenerationParams, Generator

    torch.set_num_threads(1)  # the client's share of the machine; the backend process has the other core
    model_path = resolve_model(args.model)
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = {
        "diffusers": None,
        "plaintext split": "none",
        "encrypted full": "full",
        "encrypted min-distortion": "min-distortion",
    }
    results = {str(s): {m: {"wall_s": []} for m in modes} for s in sizes}

    pipe = StableDiffusionPipeline.from_pretrained(model_path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    client_model = ClientModel(model_path, "conv_in")
    with tempfile.TemporaryDirectory() as tmp:
        served = serve_subprocess(str(model_path), Path(tmp))
        try:
            with BackendClient(served.url, served.token) as client:
                gen = Generator(client_model, client)
                for size in sizes:
                    base = dict(
                        prompt=PROMPT, steps=args.steps, guidance=7.5, width=size, height=size, scheduler=args.scheduler
                    )
                    gen.generate(GenerationParams(**base, encryption="full", seed=99))  # warm-up
                    for rep in range(args.repeats):
                        for mode, enc in modes.items():
                            t = time.perf_counter()
                            if enc is None:
                                torch.set_num_threads(2)  # diffusers alone gets the whole machine
                                pipe(
                                    PROMPT,
                                    num_inference_steps=args.steps,
                                    guidance_scale=7.5,
                                    height=size,
                                    width=size,
                                    generator=torch.Generator("cpu").manual_seed(rep),
                                )
                                torch.set_num_threads(1)
                                results[str(size)][mode]["wall_s"].append(time.perf_counter() - t)
                                continue
                            r = gen.generate(GenerationParams(**base, encryption=enc, seed=rep))
                            entry = results[str(size)][mode]
                            entry["wall_s"].append(time.perf_counter() - t)
                            n = len(r.step_timings)
                            entry["bytes_sent_per_step"] = sum(r.bytes_sent) / n
                            entry["bytes_received_per_step"] = sum(r.bytes_received) / n
                            entry["per_step_ms"] = {k: 1e3 * v / n for k, v in r.timing_totals().items()}
                            entry["unet_calls"] = n
                            if r.encrypted_fractions:
                                entry["encrypted_fraction"] = float(np.mean(r.encrypted_fractions))
                        print(
                            f"size {size} rep {rep}: "
                            + ", ".join(f"{m} {results[str(size)][m]['wall_s'][-1]:.2f}s" for m in modes),
                            flush=True,
                        )
        finally:
            served.stop()

    for size in results.values():
        for entry in size.values():
            entry["median_wall_s"] = statistics.median(entry["wall_s"])
        plain = size["plaintext split"]["median_wall_s"]
        for m in ("encrypted full", "encrypted min-distortion"):
            size[m]["ratio_vs_plaintext_split"] = size[m]["median_wall_s"] / plain
    report = {
        "command": command_line("bench.e2e", argv),
        "machine": machine_info(),
        "model": args.model,
        "steps": args.steps,
        "scheduler": args.scheduler,
        "results": results,
    }
    save_report(args.out, "e2e", report, _markdown(report))
    return 0


def _markdown(report: dict) -> str:
    lines = [
        f"Command: `{report['command']}` ({report['machine']['date']}, {report['machine']['cpu']}, "
        f"{report['machine']['cores']} cores)",
        f"Model {report['model']}, {report['scheduler']}, {report['steps']} steps, guidance 7.5, "
        "median of the repeats.",
        "",
        "| size | mode | wall s / image | vs plaintext split | sent / step | received / step | encrypted |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, modes in report["results"].items():
        for mode, e in modes.items():
            ratio = f"{e['ratio_vs_plaintext_split']:.2f}x" if "ratio_vs_plaintext_split" in e else ""
            sent = f"{e['bytes_sent_per_step'] / 1024:.1f} KiB" if "bytes_sent_per_step" in e else ""
            recv = f"{e['bytes_received_per_step'] / 1024:.1f} KiB" if "bytes_received_per_step" in e else ""
            frac = f"{e['encrypted_fraction']:.3f}" if "encrypted_fraction" in e else ""
            lines.append(f"| {size} px | {mode} | {e['median_wall_s']:.2f} | {ratio} | {sent} | {recv} | {frac} |")
    lines += [
        "",
        "Per-step client timing breakdown (ms, last repeat):",
        "",
        "| size | mode | "
        + " | ".join(["head", "select", "encrypt", "upload", "server_body", "server_he", "download", "decrypt"])
        + " |",
        "|---|---|" + "---|" * 8,
    ]
    for size, modes in report["results"].items():
        for mode, e in modes.items():
            if "per_step_ms" in e:
                lines.append(
                    f"| {size} px | {mode} | " + " | ".join(f"{v:.1f}" for v in e["per_step_ms"].values()) + " |"
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
