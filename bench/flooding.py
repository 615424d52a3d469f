"""What noise-flooded decryption costs: the CKKS decryption error per preset, and the image PSNR with and without
flooding through the real generation path (client engine + loopback backend), against diffusers' own pipeline.

    python -m bench.flooding --measure-error [--trials 20]
    python -m bench.flooding [--model tiny|embedded|PATH] [--presets fast,paper] [--seeds 4] [--steps 20]
                             [--scheduler plms] [--kappas 20,30,40] [--out bench/results]

``--measure-error``: encrypt random latents (std 1 and 15), apply the server's update through a keyless context,
decrypt without flooding, and report the RMS and maximum error per decrypted value (the numbers behind
``HEPreset.decryption_error_rms``). Otherwise: for every preset and seed, one generation without flooding, one
with the preset's flooding (a fresh RotatingKey per generation, as the product does), one per extra kappa; PSNR of
each final image (8-bit RGB, as saved) against diffusers' image for the same seed before its 8-bit rounding, so
the rounding alone gives a finite ceiling (about 58.9 dB) and the cost of flooding is the drop from there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.report import command_line, machine_info, save_report
from hediff.common import he
from hediff.common.flooding import key_recovery_bits

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a large red circle at the top left on a blue background"


def psnr(a, b) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def measure_error(trials: int) -> dict:
    from hediff.common.latent import decrypt_latent, encrypt_latent, update_latent

    rng = np.random.default_rng(0)
    out = {}
    for name, preset in he.PRESETS.items():
        key = he.ClientKey(name, flooding=False, max_decryptions=10**9)
        server = he.EvaluationContext(key.evaluation_context(), name)
        rms, peak = [], []
        for _ in range(trials):
            for std in (1.0, 15.0):
                x = rng.standard_normal(preset.values_per_ciphertext) * std
                offset = rng.standard_normal(x.size) * 0.3
                scalar = 0.97 if preset.server_multiplies else 1.0
                latent = encrypt_latent(x, None, key)
                latent.ciphertexts = server.load([c.serialize() for c in latent.ciphertexts])
                updated = update_latent(latent, server, scalar, offset)
                updated.ciphertexts = key.deserialize([c.serialize() for c in updated.ciphertexts])
                err = decrypt_latent(updated, key) - (scalar * x + offset)
                rms.append(float(np.sqrt(np.mean(err**2))))
                peak.append(float(np.abs(err).max()))
        out[name] = {
            **_costs(name),
            "rms_error_max": max(rms),
            "rms_error_mean": float(np.mean(rms)),
            "max_abs_error": max(peak),
            "preset_decryption_error_rms": preset.decryption_error_rms,
            "error_norm_bound_B": preset.decryption_error_norm,
            "flood_kappa": preset.flood_kappa,
            "key_recovery_bits": key_recovery_bits(preset.flood_kappa),
            "flood_sigma": preset.flood_sigma(),
            "max_decryptions": preset.max_decryptions,
        }
        print(name, out[name], flush=True)
    return out


def _costs(name: str, reps: int = 50) -> dict:
    """Milliseconds: a new key (what a rotation costs), and decrypting one full ciphertext without and with flooding."""
    import time

    def per_call(fn) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return 1e3 * (time.perf_counter() - t) / reps

    preset = he.get_preset(name)
    plain = he.ClientKey(name, flooding=False, max_decryptions=10**9)
    flooded = he.ClientKey(name, max_decryptions=10**9)
    ct = plain.encrypt(np.zeros(preset.values_per_ciphertext))
    other = flooded.encrypt(np.zeros(preset.values_per_ciphertext))
    return {
        "new_key_ms": per_call(lambda: he.ClientKey(name)),
        "decrypt_ms": per_call(lambda: plain.decrypt(ct, preset.values_per_ciphertext)),
        "decrypt_flooded_ms": per_call(lambda: flooded.decrypt(other, preset.values_per_ciphertext)),
    }


def _model_path(spec: str, tmp: Path) -> Path:
    from hediff.common.models import build_tiny_model, resolve_model

    if spec == "tiny":
        return build_tiny_model(tmp / "tiny", seed=0)
    return resolve_model(spec)


def measure_psnr(args) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    from hediff.backend.app import create_app
    from hediff.backend.auth import TokenStore
    from hediff.backend.engine import Limits, ServerModel
    from hediff.backend.serve import start_in_thread
    from hediff.common.models import guidance_for
    from hediff.common.schedulers import make_scheduler
    from hediff.desktop.core.backend_client import BackendClient
    from hediff.desktop.core.client_model import ClientModel
    from hediff.desktop.core.engine import GenerationParams, Generator

    kappas = [float(k) for k in args.kappas.split(",")] if args.kappas else []
    presets = args.presets.split(",")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = _model_path(args.model, Path(tmp))
        guidance = guidance_for(path, args.guidance)
        pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
        client_model = ClientModel(path, "conv_in")
        size = client_model.native_size
        tokens, token = TokenStore.ephemeral("bench")
        running = start_in_thread(
            create_app(ServerModel(path, "bench", device="cpu", dtype="float32"), tokens, Limits())
        )
        try:
            with BackendClient(running.url, token) as client:
                gen = Generator(client_model, client)
                for preset in presets:
                    variants: dict[str, dict] = {"no flooding": {"flooding": False}, "flooding": {}}
                    for k in kappas:
                        variants[f"flooding kappa {k:g}"] = {"kappa": k}
                    rows = {name: {"psnr_db": [], "latent_max_abs_diff": []} for name in variants}
                    for seed in range(args.seeds):
                        kw = dict(prompt=PROMPT, num_inference_steps=args.steps, guidance_scale=guidance)
                        ref_latent = (
                            pipe(
                                **kw,
                                height=size,
                                width=size,
                                generator=torch.Generator("cpu").manual_seed(seed),
                                output_type="latent",
                            )
                            .images[0]
                            .double()
                            .numpy()
                        )
                        # diffusers' image before 8-bit rounding: the 8-bit image's own rounding (~58.9 dB) is then
                        # the ceiling, and a flood that stays under the rounding step costs (almost) nothing
                        ref_image = (
                            255.0
                            * pipe(
                                **kw,
                                height=size,
                                width=size,
                                generator=torch.Generator("cpu").manual_seed(seed),
                                output_type="np",
                            ).images[0]
                        )
                        params = GenerationParams(
                            prompt=PROMPT,
                            steps=args.steps,
                            guidance=guidance,
                            seed=seed,
                            scheduler=args.scheduler,
                            he_preset=preset,
                        )
                        for name, key_kw in variants.items():
                            key = he.RotatingKey(preset, **key_kw)
                            r = gen.generate(params, key=key)
                            rows[name]["psnr_db"].append(psnr(r.image, ref_image))
                            rows[name]["latent_max_abs_diff"].append(float(np.abs(r.latent - ref_latent).max()))
                            rows[name]["flood_sigma"] = key.flood_sigma
                            rows[name]["kappa"] = key_kw.get("kappa", he.get_preset(preset).flood_kappa)
                            rows[name]["rotations"] = key.rotations
                            rows[name]["decryptions"] = key.decryptions
                        print(
                            f"{preset} seed {seed}: "
                            + ", ".join(f"{n} {rows[n]['psnr_db'][-1]:.2f} dB" for n in variants),
                            flush=True,
                        )
                    for row in rows.values():
                        finite = [p for p in row["psnr_db"] if np.isfinite(p)]
                        row["mean_psnr_db"] = float(np.mean(finite)) if finite else float("inf")
                    base = rows["no flooding"]["mean_psnr_db"]
                    for row in rows.values():
                        row["psnr_cost_db"] = base - row["mean_psnr_db"]
                    results[preset] = rows
        finally:
            running.stop()
    return {"size": size, "guidance": guidance, "results": results}


def _markdown(report: dict) -> str:
    lines = [
        f"Command: `{report['command']}` ({report['machine']['date']}, {report['machine']['cpu']}, "
        f"{report['machine']['cores']} cores)",
        "",
    ]
    if "errors" in report:
        lines += [
            "| preset | measured RMS error / value (max over trials) | max abs error | B (L2, margin 2) | "
            "max decryptions Q | kappa | flood sigma | key-recovery bits kept | new key ms | decrypt ms (flooded) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, e in report["errors"].items():
            lines.append(
                f"| {name} | {e['rms_error_max']:.3g} | {e['max_abs_error']:.3g} | {e['error_norm_bound_B']:.3g} | "
                f"{e['max_decryptions']} | {e['flood_kappa']:g} | {e['flood_sigma']:.3g} | "
                f"{e['key_recovery_bits']:.1f} of 128 | {e['new_key_ms']:.2f} | {e['decrypt_ms']:.2f} "
                f"({e['decrypt_flooded_ms']:.2f}) |"
            )
    if "psnr" in report:
        p = report["psnr"]
        lines += [
            f"Model {report['model']} ({p['size']} px), {report['scheduler']}, {report['steps']} steps, "
            f"guidance {p.get('guidance', 7.5):g}, "
            f"seeds 0..{report['seeds'] - 1}; PSNR of the saved 8-bit image against diffusers' image for the same "
            "seed before 8-bit rounding (rounding alone: ~58.9 dB).",
            "",
            "| preset | decryption | flood sigma | key-recovery bits | mean PSNR dB | cost dB | "
            "max latent diff (worst seed) | keys used |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for preset, rows in p["results"].items():
            for name, r in rows.items():
                bits = "none" if r["flood_sigma"] == 0 else f"{key_recovery_bits(r['kappa']):.1f}"
                lines.append(
                    f"| {preset} | {name} | {r['flood_sigma']:.3g} | {bits} | {r['mean_psnr_db']:.2f} | "
                    f"{r['psnr_cost_db']:.2f} | {max(r['latent_max_abs_diff']):.3g} | {r['rotations'] + 1} |"
                )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure-error", action="store_true", help="only measure the decryption error per preset")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--model", default="tiny", help="tiny (built here), embedded (assets/embedded), or a folder")
    ap.add_argument("--presets", default="fast,paper")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scheduler", default="plms")
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's recommendation, else 7.5")
    ap.add_argument("--kappas", default="", help="extra flooding strengths to try, e.g. 20,40")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    report: dict = {"command": command_line("bench.flooding", argv), "machine": machine_info()}
    if args.measure_error:
        report["errors"] = measure_error(args.trials)
        name = "flooding_error"
    else:
        report.update(model=args.model, steps=args.steps, scheduler=args.scheduler, seeds=args.seeds)
        report["psnr"] = measure_psnr(args)
        name = f"flooding_psnr_{Path(args.model).name}_{args.presets.replace(',', '_')}"
    save_report(args.out, name, report, _markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
