"""Per-step cost of every split and encryption mode: client time, server time, bytes each way.

Modes: the paper's splits (``conv_in`` with full, min-distortion, random-mask or no encryption; ``down0.resnet0``
with full encryption) and the U-shaped splits ``u1``/``u2``/``u3`` (no HE: the latent stays on the client, which also
runs the tail, the guidance and the scheduler step). Timing runs the real split modules and the real HE code in
one process (no HTTP: transfer time depends on the link, bytes do not); bytes are the lengths of the real encoded
request and answer frames with real ciphertexts, fp32 activations (fp16 halves the activation share).

Models: the tiny test model (``common.models.build_tiny_model``) and the SD 1.5 UNet configuration with random
weights (timing only). On a 2-core CPU the SD 1.5 UNet takes seconds per step at a 64x64 latent, so timing uses
``--sd15-latent`` (default 32, i.e. 256 px); bytes are also counted at 64x64 (512 px) from frames of that size.

    python -m bench.split_cost [--repeats 2] [--threads 2] [--sd15-latent 32] [--skip-sd15] [--out bench/results]
    python -m bench.split_cost --flops-only     # client share of UNet FLOPs per split: tiny, embedded, SD 1.5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import command_line, machine_info, save_report

REPO = Path(__file__).resolve().parents[1]
MODES = (
    ("conv_in", "full"),
    ("conv_in", "min-distortion"),
    ("conv_in", "random-mask"),
    ("conv_in", "none"),
    ("down0.resnet0", "full"),
    ("u1", "none"),
    ("u2", "none"),
    ("u3", "none"),
)
TIMESTEP = 801
GUIDANCE = 7.5


def _median_time(fn, repeats: int):
    out, times = fn(), []  # warm-up: first-call allocations and kernel selection are not per-step costs
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def unet_cost(unet, split_name: str, latent_hw: tuple[int, int], repeats: int) -> dict:
    """Seconds per step of the client's and the server's UNet layers (guidance batch 2), and what travels."""
    from hediff.common.split import UNetBody, UNetHead, UNetHeadTail, is_u_shaped

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, int(unet.config.in_channels), *latent_hw, generator=g)
    ehs = torch.randn(2, 77, int(unet.config.cross_attention_dim), generator=g)
    body = UNetBody.from_unet(unet, split_name)

    def guide(noise):
        uncond, cond = noise.chunk(2)
        return uncond + GUIDANCE * (cond - uncond)

    with torch.no_grad():
        if is_u_shaped(split_name):
            client = UNetHeadTail.from_unet(unet, split_name)
            (sent, kept), head_s = _median_time(lambda: client.head(x, TIMESTEP, ehs), repeats)
            hidden, body_s = _median_time(lambda: body(sent, TIMESTEP, ehs, latent_size=latent_hw), repeats)
            _, tail_s = _median_time(lambda: guide(client.tail(hidden, kept, ehs)), repeats)
            back = {"hidden": hidden}
        else:
            head = UNetHead.from_unet(unet, split_name)
            sent, head_s = _median_time(lambda: head(x, TIMESTEP), repeats)
            _, body_s = _median_time(lambda: guide(body(sent, TIMESTEP, ehs)), repeats)
            tail_s, back = 0.0, {}
    return {
        "client_unet_s": head_s + tail_s,
        "head_s": head_s,
        "tail_s": tail_s,
        "server_unet_s": body_s,
        "sent": {k: v.numpy() for k, v in sent.items()},
        "back": {k: v.numpy() for k, v in back.items()},
    }


def unet_flops(unet_config, split_name: str, latent_hw: tuple[int, int]) -> dict:
    """Floating-point operations per step on each side (guidance batch 2), counted on a meta-device UNet.

    Exact and independent of machine load, unlike the times.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from hediff.common.split import is_u_shaped, meta_unet, split_unet

    unet = meta_unet(unet_config)
    x = torch.zeros(1, int(unet.config.in_channels), *latent_hw, device="meta")
    ehs = torch.zeros(2, 77, int(unet.config.cross_attention_dim), device="meta")
    client, body = split_unet(unet, split_name)
    # one counter per part: entering a FlopCounterMode resets it
    head, server, tail = (FlopCounterMode(display=False) for _ in range(3))
    with torch.no_grad():
        if is_u_shaped(split_name):
            with head:
                sent, kept = client.head(x, TIMESTEP, ehs)
            with server:
                hidden = body(sent, TIMESTEP, ehs, latent_size=latent_hw)
            with tail:
                client.tail(hidden, kept, ehs)
        else:
            with head:
                sent = client(x, TIMESTEP)
            with server:
                body(sent, TIMESTEP, ehs)
    return {"client": head.get_total_flops() + tail.get_total_flops(), "server": server.get_total_flops()}


def flop_shares(unet_config, latent_hw: tuple[int, int]) -> dict[str, dict]:
    """Per split this UNet supports: client and server FLOPs per step and the client's share of the UNet's."""
    from hediff.common.split import SPLIT_POINTS, UnsupportedUNetError, check_unet_config

    out = {}
    for split_name in SPLIT_POINTS:
        try:
            check_unet_config(unet_config, split_name)
        except UnsupportedUNetError:
            continue
        f = unet_flops(unet_config, split_name, latent_hw)
        out[split_name] = {**f, "client_share": round(f["client"] / (f["client"] + f["server"]), 4)}
    return out


def run_flops_only(out_dir: Path, argv) -> None:
    from hediff.common import models

    with tempfile.TemporaryDirectory(prefix="hediff-bench-") as tmp:
        configs = {
            "tiny": (models.load_unet_config(models.build_tiny_model(Path(tmp) / "tiny", seed=0)), 16),
            "embedded": (models.load_unet_config(models.EMBEDDED_MODEL_DIR), 16),
            "sd15": (dict(models.SD15_UNET_CONFIG), 64),
        }
        results = {}
        for name, (cfg, side) in configs.items():
            results[name] = {"latent": [4, side, side], "splits": flop_shares(cfg, (side, side))}
    report = {"command": command_line("bench.split_cost", argv), "machine": machine_info(), "results": results}
    lines = [
        f"Command: `{report['command']}`",
        "",
        "Client's share of the UNet's FLOPs per step (guidance batch 2):",
        "",
    ]
    lines += ["| model (latent) | " + " | ".join(f"`{s}`" for s in results["sd15"]["splits"]) + " |"]
    lines += ["|---|" + "---|" * len(results["sd15"]["splits"])]
    for name, r in results.items():
        cells = [
            f"{100 * r['splits'][s]['client_share']:.2f} %" if s in r["splits"] else "n/a"
            for s in results["sd15"]["splits"]
        ]
        lines.append(f"| {name} ({'x'.join(map(str, r['latent']))}) | " + " | ".join(cells) + " |")
    save_report(out_dir, "split_flops", report, "\n".join(lines) + "\n")


def he_cost(latent_shape: tuple[int, ...], encryption: str, repeats: int) -> dict:
    """Seconds per step of the client's and the server's latent handling (fast preset), and what travels."""
    from hediff.common import he
    from hediff.common.latent import decrypt_latent, encrypt_latent, pack_mask, update_latent
    from hediff.common.selection import DEFAULT_MASK_FRACTION, min_distortion_mask, new_mask_seed, random_mask

    rng = np.random.default_rng(0)
    x = rng.standard_normal(latent_shape)
    offset = 0.01 * rng.standard_normal(latent_shape)
    if encryption == "none":  # the plaintext latent travels both ways (the paper's split without HE)
        return {"client_he_s": 0.0, "server_he_s": 0.0, "up": {"latent": x}, "down": {"latent": x}, "blobs": {}}
    key = he.ClientKey("fast")
    ctx = he.EvaluationContext(key.evaluation_context(), "fast")
    fixed = random_mask(latent_shape, DEFAULT_MASK_FRACTION, new_mask_seed()) if encryption == "random-mask" else None
    client, server = [], []
    for _ in range(repeats):
        n_cts = key.preset.ciphertexts_for(x.size)
        key.prepare(n_cts)  # the client makes encryptions of zero while the server works, as the engine does
        t0 = time.perf_counter()
        mask = fixed if fixed is not None else (None if encryption == "full" else min_distortion_mask(x))
        enc = encrypt_latent(x, mask, key)
        blobs = [c.serialize() for c in enc.ciphertexts]
        t1 = time.perf_counter()
        enc.ciphertexts = ctx.load(blobs)
        updated = update_latent(enc, ctx, 1.0, offset)
        back = [c.serialize() for c in updated.ciphertexts]
        t2 = time.perf_counter()
        updated.ciphertexts = key.deserialize(back)
        decrypt_latent(updated, key)
        t3 = time.perf_counter()
        client.append((t1 - t0) + (t3 - t2))
        server.append(t2 - t1)
    up: dict = {}
    down: dict = {}
    if mask is not None:
        up = {"mask": pack_mask(mask), "remainder": enc.remainder}
        down = {"remainder": updated.remainder}
    return {
        "client_he_s": statistics.median(client),
        "server_he_s": statistics.median(server),
        "up": up,
        "down": down,
        "blobs": {f"ct{i}": b for i, b in enumerate(blobs)},
        "encrypted_fraction": enc.encrypted_fraction,
    }


def frame_bytes(tensors: dict, blobs: dict, meta: dict) -> int:
    from hediff.common import protocol

    return len(protocol.Frame(meta=meta, tensors=dict(tensors), blobs=dict(blobs)).encode())


def wire_bytes(unet_config, split_name: str, encryption: str, latent_shape, he_part: dict) -> dict:
    """Request and answer sizes per step for a latent of ``latent_shape`` (C, H, W), fp32 and fp16 activations."""
    from hediff.common.split import activation_shapes, is_u_shaped, return_shape

    u = is_u_shaped(split_name)
    batch = 2 if u else 1
    out = {}
    for dtype in (np.float32, np.float16):
        sent = {
            k: np.zeros(s, dtype) for k, s in activation_shapes(unet_config, split_name, (batch, *latent_shape)).items()
        }
        meta_up = {"step": 0}
        meta_down = {"step": 0, "pivot": 0, "timings": dict.fromkeys(("parse", "body", "he", "total"), 0.123456)}
        if u:
            back = {"hidden": np.zeros(return_shape(unet_config, split_name, (2, *latent_shape)), dtype)}
            up = frame_bytes(sent, {}, meta_up)
            down = frame_bytes(back, {}, meta_down)
        else:
            up = frame_bytes({**sent, **he_part["up"]}, he_part["blobs"], meta_up)
            down = frame_bytes(he_part["down"], he_part["blobs"], meta_down)
        out[np.dtype(dtype).name] = {"up": up, "down": down}
    return out


def run_model(name: str, unet, timing_hw: tuple[int, int], byte_sizes: list[int], repeats: int) -> dict:
    from hediff.common.split import UnsupportedUNetError

    channels = int(unet.config.in_channels)
    rows = {}
    unet_cache: dict = {}
    he_cache: dict = {}
    for split_name, encryption in MODES:
        mode = f"{split_name}/{encryption}" if encryption != "none" or split_name == "conv_in" else split_name
        if split_name not in unet_cache:
            try:
                unet_cache[split_name] = unet_cost(unet, split_name, timing_hw, repeats)
            except UnsupportedUNetError as e:
                unet_cache[split_name] = str(e)
        u = unet_cache[split_name]
        if isinstance(u, str):
            rows[mode] = {"unsupported": u}
            print(f"{name} {mode}: unsupported", flush=True)
            continue
        row = {
            "client_unet_s": u["client_unet_s"],
            "server_unet_s": u["server_unet_s"],
            "head_s": u["head_s"],
            "tail_s": u["tail_s"],
            "bytes": {},
        }
        for side in byte_sizes:
            shape = (channels, side, side)
            key = (encryption, shape)
            if key not in he_cache:
                he_cache[key] = he_cost(shape, encryption if not split_name.startswith("u") else "none", repeats)
            part = he_cache[key]
            if side == timing_hw[0]:
                row["client_he_s"] = 0.0 if split_name.startswith("u") else part["client_he_s"]
                row["server_he_s"] = 0.0 if split_name.startswith("u") else part["server_he_s"]
                row["encrypted_fraction"] = (
                    part.get("encrypted_fraction", 0.0) if not split_name.startswith("u") else 0.0
                )
            row["bytes"][f"{side}x{side}"] = wire_bytes(unet.config, split_name, encryption, shape, part)
            row.setdefault("flops", {})[f"{side}x{side}"] = unet_flops(unet.config, split_name, (side, side))
        row["client_s"] = row["client_unet_s"] + row["client_he_s"]
        row["server_s"] = row["server_unet_s"] + row["server_he_s"]
        rows[mode] = row
        print(f"{name} {mode}: client {row['client_s']:.4f} s, server {row['server_s']:.4f} s", flush=True)
    return {
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "down_blocks": len(unet.down_blocks),
        "timing_latent": [channels, *timing_hw],
        "modes": rows,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sd15-latent", type=int, default=32, help="latent side for SD 1.5 timing (64 = 512 px)")
    ap.add_argument("--skip-sd15", action="store_true", help="only the tiny model (quick check)")
    ap.add_argument("--flops-only", action="store_true", help="only count FLOPs per split (tiny, embedded, SD 1.5)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    if args.flops_only:
        run_flops_only(args.out, argv)
        return 0

    from diffusers import UNet2DConditionModel

    from hediff.common import models

    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory(prefix="hediff-bench-") as tmp:
        tiny = models.load_unet(models.build_tiny_model(Path(tmp) / "tiny", seed=0))
        results["tiny"] = run_model("tiny", tiny, (16, 16), [16], args.repeats)
    if not args.skip_sd15:
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(models.SD15_UNET_CONFIG).eval()
        side = args.sd15_latent
        results["sd15"] = run_model("sd15", unet, (side, side), sorted({side, 64}), args.repeats)
    report = {
        "command": command_line("bench.split_cost", argv),
        # the load average says whether other work shared the cores while this ran
        "machine": machine_info(load_average=[round(v, 2) for v in os.getloadavg()]),
        "guidance_batch": 2,
        "he_preset": "fast",
        "results": results,
    }
    save_report(args.out, "split_cost", report, _markdown(report))
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f}" if n < 2**20 * 10 else f"{n / 2**20:.1f}"


def _markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Command: `{report['command']}` ({m['date']}, {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch "
        f"threads, load average {' / '.join(map(str, m.get('load_average', [])))} at the end)",
        "Per denoising step, guidance batch 2, `fast` HE preset, one process (no HTTP). Client: its UNet layers "
        "(+ select, encrypt, decrypt and merge; U-shaped: + tail, guidance and scheduler step). Server: its UNet "
        "layers (+ the HE update). Bytes: encoded request / answer frames, fp32 activations (fp16 in brackets).",
    ]
    for name, r in report["results"].items():
        c, h, w = r["timing_latent"]
        label = "tiny test model" if name == "tiny" else "SD 1.5 UNet configuration, random weights"
        lines += [
            "",
            f"**{label}** ({r['unet_parameters'] / 1e6:.1f} M parameters, {r['down_blocks']} down blocks); "
            f"times at a {c}x{h}x{w} latent.",
            "",
        ]
        sizes = sorted(
            {s for row in r["modes"].values() for s in row.get("bytes", {})}, key=lambda s: int(s.split("x")[0])
        )
        big = sizes[-1]
        head = f"| mode | client s/step | server s/step | client / server GFLOP at {big} (client share) | "
        head += " | ".join(f"up / down MiB at {s}" for s in sizes) + " |"
        lines += [head, "|" + "---|" * (4 + len(sizes))]
        for mode, row in r["modes"].items():
            if "unsupported" in row:
                lines.append(f"| {mode} | n/a: needs more down blocks | | | " + " | ".join("" for _ in sizes) + " |")
                continue
            cells = []
            for s in sizes:
                b = row["bytes"][s]
                cells.append(
                    f"{_mib(b['float32']['up'])} / {_mib(b['float32']['down'])} "
                    f"({_mib(b['float16']['up'])} / {_mib(b['float16']['down'])})"
                )
            f = row["flops"][big]
            share = f["client"] / (f["client"] + f["server"])
            flops = f"{f['client'] / 1e9:.3g} / {f['server'] / 1e9:.3g} ({100 * share:.1f} %)"
            lines.append(
                f"| {mode} | {row['client_s']:.4f} | {row['server_s']:.4f} | {flops} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
