"""The split's costs on the client and the wire for SDXL's real UNet configuration at 1024 px (latent 4x128x128),
next to SD 1.5's at 512 px (4x64x64), measured in the same run.

Per step and model: the client's UNet time (conv_in: the head; u1: head and tail, both guidance branches, SDXL's
added conditioning included), the bytes of the head activations on the wire (real encoded frames, fp32 and fp16),
and the encrypted latent's ciphertexts and bytes (real CKKS ciphertexts of a latent of that size, each preset, full
and min-distortion). Only the client's layers are built (random weights; the rest of the UNet stays on the meta
device), so the 2.6 B-parameter SDXL UNet is never allocated: the server's body time is not measured here (it is
the whole UNet's: see bench/sd15_split.py for SD 1.5's on this machine's CPU). SDXL's down0.resnet0 split is
refused by the product (its resnet would need each guidance branch's added embedding on the client).

    python -m bench.sdxl_split [--repeats 3] [--threads 2] [--out bench/results]
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

#: stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the values that differ from diffusers' defaults)
SDXL_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
MODELS = {  # name -> (UNet config, image side in px, pooled text embedding width or None)
    "SD 1.5": (None, 512, None),
    "SDXL": (SDXL_UNET_CONFIG, 1024, 1280),
}
SPLITS = {"SD 1.5": ("conv_in", "down0.resnet0", "u1"), "SDXL": ("conv_in", "u1")}
TIMESTEP = 801


def _client_part(config: dict, split_name: str):
    """The client's layers of ``split_name`` with random weights; the rest of the UNet is never allocated."""
    from hediff.common.split import UNetHead, UNetHeadTail, is_u_shaped, meta_unet

    meta = meta_unet(config)
    n_params = sum(p.numel() for p in meta.parameters())
    part = (UNetHeadTail if is_u_shaped(split_name) else UNetHead).from_unet(meta, split_name)
    part = part.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in part.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return part.eval(), n_params


def _median(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _frame_bytes(acts: dict) -> dict[str, int]:
    from hediff.common import protocol

    out = {}
    for dtype in protocol.ACTIVATION_DTYPES:
        np_dtype = np.float16 if dtype == "float16" else np.float32
        frame = protocol.Frame(meta={"step": 0}, tensors={k: v.numpy().astype(np_dtype) for k, v in acts.items()})
        out[dtype] = len(frame.encode())
    return out


def split_costs(config: dict, side: int, pooled_dim: int | None, split_name: str, repeats: int) -> dict:
    from hediff.common.models import add_time_ids
    from hediff.common.split import is_u_shaped, return_shape

    part, n_params = _client_part(config, split_name)
    latent_side = side // 8
    x = torch.randn(1, 4, latent_side, latent_side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if not is_u_shaped(split_name):
            acts = part(x, TIMESTEP)
            seconds = _median(lambda: part(x, TIMESTEP), repeats)
        else:  # both guidance branches: the head runs on the prompt batch, the tail on the server's answer
            ehs = torch.randn(2, 77, config["cross_attention_dim"])
            added = None
            if pooled_dim is not None:
                added = {
                    "text_embeds": torch.randn(2, pooled_dim),
                    "time_ids": torch.tensor([add_time_ids(side, side)] * 2),
                }
            acts, kept = part.head(x, TIMESTEP, ehs, added)
            # stands in for the server's answer
            hidden = torch.randn(return_shape(config, split_name, (2, 4, latent_side, latent_side)))

            def client_step():
                _, k = part.head(x, TIMESTEP, ehs, added)
                part.tail(hidden, k, ehs)

            del kept
            seconds = _median(client_step, repeats)
    return {
        "unet_parameters": n_params,
        "client_parameters": sum(p.numel() for p in part.parameters()),
        "client_s": seconds,
        "activation_shapes": {k: list(v.shape) for k, v in acts.items()},
        "activation_bytes": _frame_bytes(acts),
    }


def latent_costs(latent_side: int) -> dict:
    """Up/down bytes and ciphertext counts of the encrypted latent, from real ciphertexts."""
    from hediff.common import he, protocol
    from hediff.common.latent import encrypt_latent, pack_mask
    from hediff.common.selection import min_distortion_mask

    latent = np.random.default_rng(0).standard_normal((4, latent_side, latent_side))
    out = {}
    for preset in he.PRESETS:
        key = he.ClientKey(preset)
        for mode in ("full", "min-distortion"):
            mask = None if mode == "full" else min_distortion_mask(latent, 0.01)
            enc = encrypt_latent(latent, mask, key)
            up = protocol.Frame(blobs={f"ct{i}": c.serialize() for i, c in enumerate(enc.ciphertexts)})
            if mask is not None:
                up.tensors["mask"] = pack_mask(mask)
                up.tensors["remainder"] = enc.remainder
            out[f"{preset}/{mode}"] = {"ciphertexts": len(enc.ciphertexts), "up": len(up.encode())}
    out["plaintext latent (fp64)"] = {"ciphertexts": 0, "up": latent.nbytes}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)

    from hediff.common.models import SD15_UNET_CONFIG

    torch.set_num_threads(args.threads)
    results: dict = {}
    for name, (config, side, pooled_dim) in MODELS.items():
        config = config or SD15_UNET_CONFIG
        model = {"size_px": side, "latent_shape": [4, side // 8, side // 8], "splits": {}}
        for split_name in SPLITS[name]:
            model["splits"][split_name] = split_costs(config, side, pooled_dim, split_name, args.repeats)
            s = model["splits"][split_name]
            print(f"{name} {split_name}: client {s['client_s']:.3f} s/step", flush=True)
        model["latent"] = latent_costs(side // 8)
        results[name] = model
    report = {"command": command_line("bench.sdxl_split", argv), "machine": machine_info(), "results": results}
    save_report(args.out, "sdxl_split", report, _markdown(report))
    return 0


def _markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Command: `{report['command']}` ({m['date']}, {m['cpu']}, {m['torch_threads']} torch threads). Random "
        "weights; only the client's layers are built. Client time: conv_in runs the head; u1 runs head and tail on "
        "both guidance branches (SDXL's added conditioning included).",
        "",
        "| model | size | split | UNet params | client params | client s/step | activations fp32 | activations fp16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, model in report["results"].items():
        for split_name, s in model["splits"].items():
            lines.append(
                f"| {name} | {model['size_px']} px | {split_name} | {s['unet_parameters'] / 1e6:.0f} M | "
                f"{s['client_parameters'] / 1e6:.2f} M | {s['client_s']:.3f} | "
                f"{s['activation_bytes']['float32'] / 2**20:.2f} MiB | "
                f"{s['activation_bytes']['float16'] / 2**20:.2f} MiB |"
            )
    lines += [
        "",
        "| model | latent | latent on the wire | ciphertexts | up / step |",
        "|---|---|---|---|---|",
    ]
    for name, model in report["results"].items():
        shape = "x".join(map(str, model["latent_shape"]))
        for mode, b in model["latent"].items():
            lines.append(f"| {name} | {shape} | {mode} | {b['ciphertexts']} | {b['up'] / 2**20:.3f} MiB |")
    lines.append("")
    lines.append(
        "The answer carries as many ciphertexts back (the paper's splits); u1 sends no latent. min-distortion: tau "
        "0.01 on a Gaussian latent (its mask and plaintext remainder travel too)."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
