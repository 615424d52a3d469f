"""HE work per denoising step, ours against the paper's paths, side by side in one run.

    python -m bench.he_step [--sizes 32,64,96,128,160] [--repeats 5] [--out bench/results] [--quick]

Per latent size 4 x s x s (image 8s x 8s px) it times one denoising update y = f * x + b done under CKKS:

* ours (``common.he`` / ``common.latent`` / ``common.selection``), in three configurations: ``fast`` preset with
  the full latent encrypted, ``fast`` with min-distortion selection (tau 0.01), ``paper`` preset (N=8192,
  [31, 26x6, 31], scale 2^26, the server multiplies) with the full latent. Stages, each timed on its own:
  select, encrypt (``encrypt_latent``: split + pack + add the values to precomputed encryptions of zero),
  server update (``update_latent``), decrypt (``ClientKey.decrypt``), merge (``merge_values``, and the client's
  multiply by f when the server only adds; ``decrypt_latent`` is exactly decrypt + merge). The encryptions of
  zero (``ClientKey.prepare``) are message-independent and made while the server works, so they are timed apart.
  Ciphertexts cross a wire in the real system: serialising them (plus the mask bitmap and the float64
  remainder) and loading them on the other side is a stage of its own, both ways. Columns:
    critical   = select + encrypt + update + decrypt + merge
    +precomp   = critical + making the encryptions of zero
    serialise  = serialise + load, client->server and server->client
    all        = critical + precompute + serialise
* the paper's sparse COO path (``bench.paper_reference.sparse_step``): greedy selection, COO packing, one big
  CKKS vector, server update, decrypt, per-element merge loop, all in one process (no serialisation; the paper
  has none).
* the paper's baseline, one ciphertext per latent element (``bench.paper_reference.baseline_step``, TenSEAL
  CKKSTensor without batching, as the reference code; and ``baseline_vector_step``, one size-1 CKKSVector per
  element). Far too slow for the whole latent: a fixed random sample of elements is timed and the time is
  extrapolated linearly to the full latent (labelled as such).
* micro-costs per ciphertext, fast preset (``micro_costs``): our own per-ciphertext operations (an encryption
  of zero, encrypt with a prepared zero, the server's update, serialise, load, decrypt), to say where time goes.

Speed-ups are paper time / our time; the target is >= 50x against the sparse path at 4x64x64, stated for each
of the critical, +precompute and all columns of ours-fast-full.

Every path is checked inside the benchmark: the decrypted result against f * x + b in float64, within the
preset's tolerance; a failing check is reported and makes the command exit with status 1.

Inputs: x ~ N(0, 1) (a latent early in sampling looks like this), b = c * eps with eps ~ N(0, 1), and f, c the
DDIM coefficients of the SD v1 scaled-linear schedule at a middle step (t = 501 -> 481 of 50 steps).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tenseal as ts
import torch

from bench import paper_reference as ref
from hediff.common import he
from hediff.common.latent import EncryptedLatent, encrypt_latent, merge_values, pack_mask, unpack_mask, update_latent
from hediff.common.selection import select_mask

DEFAULT_SIZES = (32, 64, 96, 128, 160)
QUICK_SIZES = (32, 64)
TOLERANCE = {"fast": 1e-6, "paper": 2e-2}  # max |decrypted - (f x + b)|; paper: per-step CKKS error ~3-5e-3
OURS = (
    ("ours-fast-full", "fast", "full"),
    ("ours-fast-mindist", "fast", "min-distortion"),
    ("ours-paper-full", "paper", "full"),
)
OUR_STAGES = (
    "prepare",
    "select",
    "encrypt",
    "ser_up",
    "load_up",
    "update",
    "ser_down",
    "load_down",
    "decrypt",
    "merge",
)
CRITICAL = ("select", "encrypt", "update", "decrypt", "merge")
SERIALISE = ("ser_up", "load_up", "ser_down", "load_down")
TARGET_SIZE, TARGET_SPEEDUP = 64, 50.0
MICRO_OPS = ("fresh_zero", "prepare", "encrypt_prepared", "update", "serialize", "load", "decrypt")


def step_coefficients(t: int = 501, t_prev: int = 481) -> tuple[float, float]:
    """DDIM (eta 0) coefficients f, c of x_prev = f x + c eps, SD v1 scaled-linear betas."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1.0 - betas)
    a_t, a_prev = abar[t], abar[t_prev]
    f = float(np.sqrt(a_prev / a_t))
    c = float(np.sqrt(1.0 - a_prev) - f * np.sqrt(1.0 - a_t))
    return f, c


def make_inputs(size: int, seed: int = 0) -> tuple[np.ndarray, float, np.ndarray]:
    rng = np.random.default_rng(seed + size)
    f, c = step_coefficients()
    x = rng.standard_normal((4, size, size))
    b = c * rng.standard_normal((4, size, size))
    return x, f, b


# --- ours ------------------------------------------------------------------------------------------------------


def ours_step(key: he.ClientKey, ctx: he.EvaluationContext, x, f, b, mode, tau, n_pool) -> dict:
    """One step, stage by stage, through a simulated wire. Returns times, bytes, the result and its error."""
    multiplies = key.preset.server_multiplies
    t = {}
    c = time.perf_counter
    t0 = c()
    key.prepare(n_pool)  # top up the pool of encryptions of zero (what the client does while the server works)
    t1 = c()
    mask = select_mask(x, mode, tau)
    t2 = c()
    package = encrypt_latent(x, mask, key)
    t3 = c()
    up_cts = he.serialize_ciphertexts(package.ciphertexts)
    up_mask = pack_mask(mask).tobytes() if mask is not None else b""
    up_rem = package.remainder.tobytes() if mask is not None else b""
    t4 = c()
    srv_mask = unpack_mask(np.frombuffer(up_mask, dtype=np.uint8), x.shape) if mask is not None else None
    srv = EncryptedLatent(
        shape=x.shape,
        mask=srv_mask,
        ciphertexts=ctx.load(up_cts),
        remainder=np.frombuffer(up_rem, dtype=np.float64) if mask is not None else np.zeros(0),
    )
    t5 = c()
    scalar, offset = (f, b) if multiplies else (1.0, b * (1.0 / f))
    updated = update_latent(srv, ctx, scalar, offset)
    t6 = c()
    down_cts = he.serialize_ciphertexts(updated.ciphertexts)
    down_rem = updated.remainder.tobytes() if mask is not None else b""
    t7 = c()
    cts = key.deserialize(down_cts)
    rem = np.frombuffer(down_rem, dtype=np.float64) if mask is not None else np.zeros(0)
    t8 = c()
    enc = key.decrypt(cts, package.n_encrypted)
    t9 = c()
    y = merge_values(x.shape, mask, enc, rem)
    if not multiplies:
        y = f * y
    t10 = c()
    stamps = (t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10)
    t = {name: stamps[i + 1] - stamps[i] for i, name in enumerate(OUR_STAGES)}
    return {
        "times": t,
        "bytes_up": sum(map(len, up_cts)) + len(up_mask) + len(up_rem),
        "bytes_down": sum(map(len, down_cts)) + len(down_rem),
        "ciphertext_bytes_up": sum(map(len, up_cts)),
        "mask_bytes": len(up_mask),
        "remainder_bytes": len(up_rem),
        "n_ciphertexts": len(package.ciphertexts),
        "encrypted_fraction": package.encrypted_fraction,
        "max_error": float(np.abs(y - (f * x + b)).max()),
    }


def summarise(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "n": len(values)}


def run_config(name, stepper, n_pool_for, tolerance, sizes, repeats, log) -> dict:
    """Time ``stepper(x, f, b, n_pool)`` (a dict like ``ours_step``'s) at every size, after one warm-up step."""
    per_size = {}
    for size in sizes:
        x, f, b = make_inputs(size)
        n_pool = n_pool_for(x.size)  # the client keeps enough encryptions of zero for the whole latent
        stepper(x, f, b, n_pool)  # warm-up, and fills the pool to its steady state
        runs = []
        for _ in range(repeats):
            gc.collect()
            runs.append(stepper(x, f, b, n_pool))
        totals = {
            "critical": [sum(r["times"][s] for s in CRITICAL) for r in runs],
            "precompute": [r["times"]["prepare"] for r in runs],
            "serialise": [sum(r["times"][s] for s in SERIALISE) for r in runs],
        }
        totals["critical+precompute"] = [a + p for a, p in zip(totals["critical"], totals["precompute"])]
        totals["all"] = [a + p + s for a, p, s in zip(totals["critical"], totals["precompute"], totals["serialise"])]
        err = max(r["max_error"] for r in runs)
        last = runs[-1]
        entry = {
            "stages": {s: summarise([r["times"][s] for r in runs]) for s in OUR_STAGES},
            "totals": {k: summarise(v) for k, v in totals.items()},
            **{
                k: last[k]
                for k in (
                    "bytes_up",
                    "bytes_down",
                    "ciphertext_bytes_up",
                    "mask_bytes",
                    "remainder_bytes",
                    "n_ciphertexts",
                    "encrypted_fraction",
                )
            },
            "max_error": err,
            "correct": err <= tolerance,
        }
        per_size[str(size)] = entry
        tt = entry["totals"]
        log(
            f"  {name:20s} {size:4d}: critical {1e3 * tt['critical']['median']:8.2f} ms"
            f"  +precomp {1e3 * tt['critical+precompute']['median']:8.2f} ms"
            f"  all {1e3 * tt['all']['median']:8.2f} ms  max error {err:.2e}" + ("" if entry["correct"] else "  WRONG")
        )
    return {"tolerance": tolerance, "sizes": per_size}


def run_ours(name, preset, mode, sizes, repeats, tau, log) -> dict:
    # What the product uses: flooded decryptions, keys rotated before their decryption bound.
    key = he.RotatingKey(preset)
    ctx = he.EvaluationContext(key.evaluation_context(), preset)

    def stepper(x, f, b, n_pool):
        return ours_step(key, ctx, x, f, b, mode, tau, n_pool)

    out = {"preset": preset, "mode": mode, "tau": tau if mode == "min-distortion" else None}
    # The flood is part of the result: allow 8 sigma of it on top of the CKKS error.
    tolerance = TOLERANCE[preset] + 8 * key.flood_sigma
    out.update(run_config(name, stepper, key.preset.ciphertexts_for, tolerance, sizes, repeats, log))
    return out


# --- the paper's paths -------------------------------------------------------------------------------------------


def run_sparse(sizes, repeats, tau, log) -> dict:
    ctx = ref.paper_context()
    out = {"tau": tau, "tolerance": TOLERANCE["paper"], "sizes": {}}
    for size in sizes:
        x, f, b = make_inputs(size)
        xt, bt = ref.as_reference_tensor(x), ref.as_reference_tensor(b)
        ref.sparse_step(xt, f, bt, ctx, tau)  # warm-up
        runs = []
        for _ in range(repeats):
            gc.collect()
            runs.append(ref.sparse_step(xt, f, bt, ctx, tau))
        err = max(float(np.abs(r.latent.numpy()[0].astype(np.float64) - (f * x + b)).max()) for r in runs)
        out["sizes"][str(size)] = {
            "stages": {s: summarise([r.times[s] for r in runs]) for s in ref.SPARSE_STAGES},
            "total": summarise([r.total for r in runs]),
            "encrypted_fraction": runs[-1].n_encrypted / x.size,
            "n_ciphertexts": runs[-1].n_ciphertexts,
            "max_error": err,
            "correct": err <= TOLERANCE["paper"],
        }
        s = out["sizes"][str(size)]
        log(
            f"  {'paper-sparse':18s} {size:4d}: total {1e3 * s['total']['median']:8.2f} ms  "
            + " ".join(f"{k} {1e3 * v['median']:.1f}" for k, v in s["stages"].items())
            + f"  max error {err:.2e}"
            + ("" if s["correct"] else "  WRONG")
        )
    return out


def run_baseline(sizes, repeats, sample, log) -> dict:
    ctx = ref.paper_context()
    out = {"sample": sample, "tolerance": TOLERANCE["paper"], "extrapolated": True, "sizes": {}}
    for size in sizes:
        x, f, b = make_inputs(size)
        rng = np.random.default_rng(1000 + size)
        idx = np.sort(rng.choice(x.size, size=min(sample, x.size), replace=False))
        xs = torch.as_tensor(x.ravel()[idx], dtype=torch.float32)
        bs = torch.as_tensor(b.ravel()[idx], dtype=torch.float32)
        want = f * x.ravel()[idx] + b.ravel()[idx]
        entry = {"n_elements": int(x.size), "n_sampled": len(idx)}
        for variant, fn in (("tensor", ref.baseline_step), ("vector", ref.baseline_vector_step)):
            fn(xs[:8], f, bs[:8], ctx)  # warm-up (TenSEAL's thread pool, first-call costs)
            runs, err = [], 0.0
            for _ in range(repeats):
                gc.collect()
                got, times = fn(xs, f, bs, ctx)
                err = max(err, float(np.abs(np.asarray(got) - want).max()))
                runs.append(times)
            scale = x.size / len(idx)
            sampled = [sum(r.values()) for r in runs]
            entry[variant] = {
                "sampled_stages": {s: summarise([r[s] for r in runs]) for s in ref.BASELINE_STAGES},
                "sampled_total": summarise(sampled),
                "per_element": summarise([v / len(idx) for v in sampled]),
                "extrapolated_total": summarise([v * scale for v in sampled]),
                "max_error": err,
                "correct": err <= TOLERANCE["paper"],
            }
            log(
                f"  {'baseline-' + variant:18s} {size:4d}: "
                f"{1e3 * entry[variant]['per_element']['median']:.2f} ms/element, "
                f"extrapolated {entry[variant]['extrapolated_total']['median']:.1f} s  max error {err:.2e}"
                + ("" if entry[variant]["correct"] else "  WRONG")
            )
        out["sizes"][str(size)] = entry
    return out


# --- micro-costs per ciphertext (to say where our time goes) ---------------------------------------------------


def micro_costs(n: int = 200) -> dict:
    """Seconds per ciphertext (fast preset) of the product's own operations, one full ciphertext each.

    fresh_zero = ``ClientKey._fresh_zero_now``; prepare = ``ClientKey.prepare`` filling an empty pool, per
    ciphertext made; encrypt = ``ClientKey.encrypt`` of ``values_per_ciphertext`` values with a prepared zero;
    update = ``EvaluationContext.affine_update`` (scalar 1: the fast preset only adds); serialize / load =
    ``Ciphertext.serialize`` / ``Ciphertext.load``; decrypt = ``ClientKey.decrypt`` of one ciphertext.
    """
    # Timing only: a bound large enough for every timed decryption (the flood is sized for it, and costs the same).
    key = he.ClientKey("fast", max_decryptions=100 * n)
    ctx = he.EvaluationContext(key.evaluation_context(), "fast")
    width = key.preset.values_per_ciphertext
    rng = np.random.default_rng(0)
    values, offset = rng.standard_normal(width), rng.standard_normal(width)

    def timeit(fn, reps=n):
        fn()  # warm-up
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps

    key._zeros.clear()
    t = time.perf_counter()
    key.prepare(n)
    prepare = (time.perf_counter() - t) / n
    key.prepare(n + 1)  # a prepared zero for the warm-up and for every timed encryption
    encrypt = timeit(lambda: key.encrypt(values))
    if key._zeros:
        raise AssertionError("every timed encryption must have used a prepared zero")
    cts = key.encrypt(values)
    blob = cts[0].serialize()
    out = {
        "fresh_zero": timeit(key._fresh_zero_now),
        "prepare": prepare,
        "encrypt_prepared": encrypt,
        "update": timeit(lambda: ctx.affine_update(cts, 1.0, offset)),
        "serialize": timeit(cts[0].serialize),
        "load": timeit(lambda: he.Ciphertext.load(ctx._seal, blob)),
        "decrypt": timeit(lambda: key.decrypt(cts, width)),
    }
    got = key.decrypt(ctx.affine_update(key.deserialize([blob]), 1.0, offset), width)
    err = float(np.abs(got - (values + offset)).max())
    return out | {
        "values_per_ciphertext": width,
        "ciphertext_bytes": len(blob),
        "max_error": err,
        "correct": err <= TOLERANCE["fast"] + 8 * key.flood_sigma,
    }


# --- report ------------------------------------------------------------------------------------------------------


def machine_info(argv: list[str]) -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model,
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "tenseal": ts.__version__,
        "numpy": np.__version__,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.he_step", *argv]),
        "load_average_start": os.getloadavg(),
    }


def speedups(results: dict) -> dict:
    """speed-up = paper path time / our time, per size, for each of our configurations and columns."""
    out = {}
    for size, sp in results["paper_sparse"]["sizes"].items():
        base = results["paper_baseline"]["sizes"].get(size, {}).get("tensor", {}).get("extrapolated_total", {})
        base_v = results["paper_baseline"]["sizes"].get(size, {}).get("vector", {}).get("extrapolated_total", {})
        row = {}
        for name, cfg in results["ours"].items():
            ours = cfg["sizes"].get(size)
            if ours is None:
                continue
            row[name] = {
                col: {
                    "vs_sparse": sp["total"]["median"] / ours["totals"][col]["median"],
                    "vs_sparse_min": sp["total"]["min"] / ours["totals"][col]["min"],
                    "vs_baseline_extrapolated": base["median"] / ours["totals"][col]["median"] if base else None,
                    "vs_baseline_vector_extrapolated": base_v["median"] / ours["totals"][col]["median"]
                    if base_v
                    else None,
                }
                for col in ("critical", "critical+precompute", "all")
            }
        out[size] = row
    return out


def _ms(v: float) -> str:
    return f"{1e3 * v:.1f}" if v >= 0.01 else f"{1e3 * v:.2f}"


def _kib(n: int) -> str:
    return f"{n / 1024:.0f}"


def markdown(results: dict) -> str:
    m = results["machine"]
    sizes = list(results["paper_sparse"]["sizes"])
    base = results["paper_baseline"]
    lines = [
        "### HE work per denoising step (select + pack + encrypt + server update + decrypt + merge)",
        "",
        (
            f"Measured with `{m['command']}` on {m['date'][:10]}: {m['cpu_model']}, {m['nproc']} cores, "
            f"Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads), TenSEAL {m['tenseal']}. "
            "Milliseconds per step, median over repeats (min in brackets). Latent x ~ N(0, 1), one image."
        ),
        "",
        (
            "Columns: **critical** = select + encrypt + server update + decrypt + merge, with the encryptions of "
            "zero made beforehand (the client makes them while the server works); **+precomp** adds making them; "
            "**serialise** = serialising and loading ciphertexts, mask and remainder both ways (ours crosses a "
            "wire; the paper's code runs in one process and has none); **all** = critical + precompute + serialise."
        ),
        "",
        "| latent | image | path | critical | +precomp | serialise | all | encrypted | ciphertexts "
        "| KiB up | KiB down | max error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        s = int(size)
        lat, px = f"4x{s}x{s}", f"{8 * s} px"
        for name, cfg in results["ours"].items():
            r = cfg["sizes"][size]
            tt = r["totals"]

            def cell(k: str, tt=tt) -> str:
                return f"{_ms(tt[k]['median'])} ({_ms(tt[k]['min'])})"

            lines.append(
                f"| {lat} | {px} | {name} | {cell('critical')} | {cell('critical+precompute')} "
                f"| {cell('serialise')} | {cell('all')} | {100 * r['encrypted_fraction']:.1f}% "
                f"| {r['n_ciphertexts']} | {_kib(r['bytes_up'])} | {_kib(r['bytes_down'])} | {r['max_error']:.1e} |"
            )
        sp = results["paper_sparse"]["sizes"][size]
        lines.append(
            f"| {lat} | {px} | paper sparse (COO, one process, n={sp['total']['n']}) | "
            f"{_ms(sp['total']['median'])} ({_ms(sp['total']['min'])}) | same | - | same | "
            f"{100 * sp['encrypted_fraction']:.1f}% | {sp['n_ciphertexts']} | - | - | {sp['max_error']:.1e} |"
        )
        bt = base["sizes"][size]["tensor"]
        lines.append(
            f"| {lat} | {px} | paper baseline, 1 ct/element, **extrapolated** from {base['sizes'][size]['n_sampled']} "
            f"elements | {bt['extrapolated_total']['median']:.1f} s ({bt['extrapolated_total']['min']:.1f} s) "
            f"| same | - | same | 100% | {4 * s * s} | - | - | {bt['max_error']:.1e} |"
        )
    lines += [
        "",
        "Paper sparse path, stage medians (ms):",
        "",
        "| latent | " + " | ".join(ref.SPARSE_STAGES) + " | total |",
        "|---|" + "---|" * (len(ref.SPARSE_STAGES) + 1),
    ]
    for size in sizes:
        sp = results["paper_sparse"]["sizes"][size]
        lines.append(
            f"| 4x{size}x{size} | "
            + " | ".join(_ms(sp["stages"][k]["median"]) for k in ref.SPARSE_STAGES)
            + f" | {_ms(sp['total']['median'])} |"
        )
    lines += [
        "",
        "Our stages, medians (ms):",
        "",
        "| latent | path | " + " | ".join(OUR_STAGES) + " |",
        "|---|---|" + "---|" * len(OUR_STAGES),
    ]
    for size in sizes:
        for name, cfg in results["ours"].items():
            st = cfg["sizes"][size]["stages"]
            lines.append(f"| 4x{size}x{size} | {name} | " + " | ".join(_ms(st[k]["median"]) for k in OUR_STAGES) + " |")
    lines += [
        "",
        (
            "Speed-up = paper time / our time (medians). Against the sparse path, and against the per-element "
            "baseline (extrapolated from a sample; CKKSTensor without batching as in the reference code)."
        ),
        "",
        "| latent | ours | vs sparse: critical | +precomp | all | vs baseline (extrap.): critical | +precomp | all |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        for name, cols in results["speedups"][size].items():
            lines.append(
                f"| 4x{size}x{size} | {name} | "
                + " | ".join(f"{cols[c]['vs_sparse']:.1f}x" for c in ("critical", "critical+precompute", "all"))
                + " | "
                + " | ".join(
                    f"{cols[c]['vs_baseline_extrapolated']:.0f}x" for c in ("critical", "critical+precompute", "all")
                )
                + " |"
            )
    t = results.get("target")
    if t:
        lines += ["", f"**Target** ({t['what']}): {t['verdict']}"]
    mc = results.get("micro_costs")
    if mc:
        lines += [
            "",
            f"Per ciphertext, fast preset ({mc['values_per_ciphertext']} values, {mc['ciphertext_bytes']} bytes "
            f"serialised), microseconds: {micro_costs_text(mc)}.",
        ]
    lines += [
        "",
        "Per-element baseline, time per element (median): CKKSTensor "
        + ", ".join(f"{1e3 * base['sizes'][s]['tensor']['per_element']['median']:.1f} ms" for s in sizes)
        + "; size-1 CKKSVector loop "
        + ", ".join(f"{1e3 * base['sizes'][s]['vector']['per_element']['median']:.1f} ms" for s in sizes)
        + f" (sizes {', '.join(sizes)}).",
    ]
    return "\n".join(lines) + "\n"


def micro_costs_text(mc: dict) -> str:
    return ", ".join(f"{k} {1e6 * mc[k]:.0f}" for k in MICRO_OPS)


def target_verdict(results: dict) -> dict | None:
    """The target, column by column, for ours-fast-full (our fastest configuration) against the sparse path."""
    size = str(TARGET_SIZE)
    if size not in results["speedups"]:
        return None
    row = results["speedups"][size]["ours-fast-full"]
    labels = {"critical": "critical", "critical+precompute": "+precompute", "all": "all"}
    met = {c: row[c]["vs_sparse"] >= TARGET_SPEEDUP for c in labels}
    parts = [f"{lab} {row[c]['vs_sparse']:.1f}x ({'met' if met[c] else 'NOT met'})" for c, lab in labels.items()]
    verdict = "ours-fast-full: " + "; ".join(parts) + "."
    return {
        "what": f">= {TARGET_SPEEDUP:.0f}x faster than the paper's sparse path at 4x{size}x{size}",
        "met": met,
        "verdict": verdict,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.he_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=None, help="latent sides, comma-separated (default 32,64,96,128,160)")
    p.add_argument("--repeats", type=int, default=None, help="repeats for our paths (default 5)")
    p.add_argument("--sparse-repeats", type=int, default=None, help="repeats for the paper's sparse path (default 3)")
    p.add_argument(
        "--baseline-repeats", type=int, default=None, help="repeats for the per-element baseline (default 2)"
    )
    p.add_argument("--baseline-sample", type=int, default=None, help="elements timed for the baseline (default 256)")
    p.add_argument("--tau", type=float, default=0.01, help="min-distortion threshold (default 0.01)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads for the reference path (default 1)")
    p.add_argument("--out", default="bench/results", help="folder for he_step.json and he_step.md ('' = none)")
    p.add_argument("--quick", action="store_true", help="smoke test: sizes 32,64, 2 repeats, baseline sample 32")
    a = p.parse_args(argv)

    q = a.quick
    sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else list(QUICK_SIZES if q else DEFAULT_SIZES)
    repeats = a.repeats or (2 if q else 5)
    sparse_repeats = a.sparse_repeats or (1 if q else 3)
    baseline_repeats = a.baseline_repeats or (1 if q else 2)
    sample = a.baseline_sample or (32 if q else 256)
    torch.set_num_threads(a.torch_threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    started = time.perf_counter()
    results = {
        "machine": machine_info(argv),
        "settings": {
            "sizes": sizes,
            "repeats": repeats,
            "sparse_repeats": sparse_repeats,
            "baseline_repeats": baseline_repeats,
            "baseline_sample": sample,
            "tau": a.tau,
            "quick": q,
            "step": dict(zip(("f", "c"), step_coefficients())),
        },
    }
    log(
        f"HE work per step, sizes {sizes}; ours x{repeats}, sparse x{sparse_repeats}, baseline x{baseline_repeats} "
        f"on {sample} sampled elements"
    )
    log("ours:")
    results["ours"] = {name: run_ours(name, preset, mode, sizes, repeats, a.tau, log) for name, preset, mode in OURS}
    log("paper sparse path:")
    results["paper_sparse"] = run_sparse(sizes, sparse_repeats, a.tau, log)
    log("paper per-element baseline (sampled, extrapolated):")
    results["paper_baseline"] = run_baseline(sizes, baseline_repeats, sample, log)
    log("micro-costs per ciphertext (fast preset):")
    results["micro_costs"] = micro_costs(50 if q else 200)
    mc = results["micro_costs"]
    log(
        f"  us per ciphertext ({mc['values_per_ciphertext']} values, {mc['ciphertext_bytes']} B): "
        + micro_costs_text(mc)
    )
    results["speedups"] = speedups(results)
    results["target"] = target_verdict(results)
    results["machine"]["load_average_end"] = os.getloadavg()
    results["machine"]["wall_s"] = time.perf_counter() - started

    checks = [
        (f"{n} {s}", r["correct"], r["max_error"]) for n, c in results["ours"].items() for s, r in c["sizes"].items()
    ]
    checks.append(("micro-costs fast", mc["correct"], mc["max_error"]))
    checks += [(f"paper-sparse {s}", r["correct"], r["max_error"]) for s, r in results["paper_sparse"]["sizes"].items()]
    checks += [
        (f"baseline-{v} {s}", r[v]["correct"], r[v]["max_error"])
        for s, r in results["paper_baseline"]["sizes"].items()
        for v in ("tensor", "vector")
    ]
    results["all_correct"] = all(ok for _, ok, _ in checks)

    log("max error per path:")
    for label, ok, err in checks:
        log(f"  {label:28s} {err:.2e} {'ok' if ok else 'WRONG'}")
    if results["target"]:
        log(f"target {results['target']['what']}: {results['target']['verdict']}")

    md = markdown(results)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = "he_step_quick" if q else "he_step"
        (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
        (out / f"{stem}.md").write_text(md)
        log(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    else:
        print(md)
    log(f"done in {results['machine']['wall_s']:.0f} s")
    if not results["all_correct"]:
        log("FAILED: at least one path decrypted to the wrong values")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
