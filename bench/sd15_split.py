"""The real SD 1.5 UNet configuration (random weights: timing only) at 512 px, split as the product splits it.

Per step: client head time, server body time (both guidance branches in one batch), and the bytes each way on
the wire for every mode, counted from real encoded frames with real ciphertexts.

    python -m bench.sd15_split [--repeats 2] [--threads 2] [--out bench/results]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import command_line, machine_info, save_report

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)

    from diffusers import UNet2DConditionModel

    from hediff.common import he, protocol
    from hediff.common.latent import encrypt_latent, pack_mask
    from hediff.common.models import SD15_UNET_CONFIG
    from hediff.common.selection import min_distortion_mask
    from hediff.common.split import PAPER_SPLITS, UNetBody, UNetHead

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(SD15_UNET_CONFIG).eval()
    n_params = sum(p.numel() for p in unet.parameters())
    side = args.size // 8
    x = torch.randn(1, 4, side, side)
    emb = torch.randn(2, 77, SD15_UNET_CONFIG["cross_attention_dim"])
    t = 801
    results: dict = {"unet_parameters": n_params, "latent_shape": [4, side, side], "splits": {}}
    with torch.no_grad():
        for split_name in PAPER_SPLITS:  # U-shaped splits: bench/split_cost.py
            head, body = UNetHead.from_unet(unet, split_name), UNetBody.from_unet(unet, split_name)
            head_s, body_s = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                acts = head(x, t)
                t1 = time.perf_counter()
                body(acts, t, emb)
                t2 = time.perf_counter()
                head_s.append(t1 - t0)
                body_s.append(t2 - t1)
            head_params = sum(p.numel() for p in head.parameters())
            wire = {}
            for dtype in protocol.ACTIVATION_DTYPES:
                np_dtype = np.float16 if dtype == "float16" else np.float32
                frame = protocol.Frame(
                    meta={"step": 0}, tensors={k: v.numpy().astype(np_dtype) for k, v in acts.items()}
                )
                wire[dtype] = len(frame.encode())
            results["splits"][split_name] = {
                "head_s": statistics.median(head_s),
                "body_s": statistics.median(body_s),
                "head_parameters": head_params,
                "activation_bytes": wire,
                "activation_shapes": {k: list(v.shape) for k, v in acts.items()},
            }
            print(
                f"{split_name}: head {statistics.median(head_s):.3f}s body {statistics.median(body_s):.2f}s", flush=True
            )

    latent = x[0].double().numpy()
    he_bytes = {}
    for preset in he.PRESETS:
        key = he.ClientKey(preset)
        for mode in ("full", "min-distortion"):
            mask = None if mode == "full" else min_distortion_mask(latent, 0.01)
            enc = encrypt_latent(latent, mask, key)
            up = protocol.Frame(blobs={f"ct{i}": c.serialize() for i, c in enumerate(enc.ciphertexts)})
            if mask is not None:
                up.tensors["mask"] = pack_mask(mask)
                up.tensors["remainder"] = enc.remainder
            down = protocol.Frame(blobs=dict(up.blobs))
            if mask is not None:
                down.tensors["remainder"] = enc.remainder
            he_bytes[f"{preset}/{mode}"] = {
                "up": len(up.encode()),
                "down": len(down.encode()),
                "ciphertexts": len(enc.ciphertexts),
            }
    he_bytes["plaintext latent (fp64)"] = {"up": latent.nbytes, "down": latent.nbytes, "ciphertexts": 0}
    results["latent_bytes"] = he_bytes

    report = {
        "command": command_line("bench.sd15_split", argv),
        "machine": machine_info(),
        "size_px": args.size,
        "results": results,
    }
    save_report(args.out, "sd15_split", report, _markdown(report))
    return 0


def _markdown(report: dict) -> str:
    r = report["results"]
    m = report["machine"]
    lines = [
        f"Command: `{report['command']}` ({report['machine']['date']}, {m['cpu']}, {m['torch_threads']} torch threads)",
        f"SD 1.5 UNet configuration, {r['unet_parameters'] / 1e6:.0f} M parameters, random weights, "
        f"{report['size_px']} px (latent {'x'.join(map(str, r['latent_shape']))}), guidance batch 2 on the server.",
        "",
        "| split | head params | head s/step (client) | body s/step (server) | activations fp32 | activations fp16 |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in r["splits"].items():
        lines.append(
            f"| {name} | {s['head_parameters'] / 1e3:.0f} K | {s['head_s']:.3f} | {s['body_s']:.2f} | "
            f"{s['activation_bytes']['float32'] / 2**20:.2f} MiB | {s['activation_bytes']['float16'] / 2**20:.2f} MiB |"
        )
    lines += ["", "| latent on the wire | ciphertexts | up / step | down / step |", "|---|---|---|---|"]
    for name, b in r["latent_bytes"].items():
        lines.append(f"| {name} | {b['ciphertexts']} | {b['up'] / 2**20:.3f} MiB | {b['down'] / 2**20:.3f} MiB |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
