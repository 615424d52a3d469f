"""Many clients at once through one backend: every generation completes, every step is accounted for, and each
final latent equals a single-client run with the same seed (bit for bit in plaintext split mode, within the CKKS
noise of fresh encryptions when encrypted). Then the session limits under a burst: clear 429s with Retry-After.

    python -m bench.load [--clients 16] [--steps 10] [--model tiny] [--out bench/results]

The backend runs as its own process (`hediff serve`); the clients are threads of this one.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from hediff.desktop.core.backend_client import BackendClient, BackendError
from hediff.desktop.core.engine import GenerationParams, Generator

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a large red circle at the top left on a blue background"
CKKS_TOLERANCE = 1e-3  # fresh encryptions differ by CKKS noise; tests/test_e2e.py uses the same bound


@dataclass
class ClientRun:
    index: int
    params: GenerationParams
    steps_seen: list[int] = field(default_factory=list)
    total_steps: int = 0
    latent: np.ndarray | None = None
    error: str | None = None
    wall_s: float = 0.0


def client_params(i: int, steps: int, size: int = 32) -> GenerationParams:
    """Client ``i``'s settings: encryption modes and seeds alternate, so equal seeds meet under load."""
    encryption = ("full", "none", "min-distortion")[i % 3]
    return GenerationParams(
        prompt=PROMPT, steps=steps, seed=i % 2, width=size, height=size, scheduler="ddim", encryption=encryption
    )


def run_clients(client_model, url: str, tokens: list[str], params: list[GenerationParams]) -> list[ClientRun]:
    """One thread per entry of ``params``, all started together (client i uses token i mod len(tokens))."""
    runs = [ClientRun(i, p) for i, p in enumerate(params)]
    barrier = threading.Barrier(len(runs))

    def work(run: ClientRun) -> None:
        def on_step(update) -> None:
            run.steps_seen.append(update.index)
            run.total_steps = update.total

        try:
            with BackendClient(url, tokens[run.index % len(tokens)]) as client:
                barrier.wait(60)
                t0 = time.perf_counter()
                result = Generator(client_model, client).generate(run.params, on_step=on_step)
                run.wall_s = time.perf_counter() - t0
                run.latent = result.latent
        except (BackendError, ValueError, RuntimeError, threading.BrokenBarrierError) as e:
            run.error = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=work, args=(r,), name=f"client-{r.index}") for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return runs


def reference_latents(client_model, url: str, token: str, params: list[GenerationParams]) -> dict:
    """Single-client runs, one per distinct setting, on the same backend."""
    refs = {}
    with BackendClient(url, token) as client:
        gen = Generator(client_model, client)
        for p in params:
            if p not in refs:
                refs[p] = gen.generate(p).latent
    return refs


def check_runs(runs: list[ClientRun], refs: dict) -> list[str]:
    """Everything wrong with the concurrent runs, as sentences (empty: all good)."""
    problems = []
    for run in runs:
        if run.error:
            problems.append(f"client {run.index}: {run.error}")
            continue
        if run.steps_seen != list(range(run.total_steps)) or run.total_steps == 0:
            problems.append(f"client {run.index}: saw steps {run.steps_seen} of {run.total_steps}")
        diff = float(np.abs(run.latent - refs[run.params]).max())
        allowed = 0.0 if run.params.encryption == "none" else CKKS_TOLERANCE
        if diff > allowed:
            problems.append(f"client {run.index} ({run.params.encryption}): latent differs by {diff:.2e}")
    return problems


def max_diff(runs: list[ClientRun], refs: dict, encryption: str) -> float:
    chosen = [r for r in runs if r.latent is not None and r.params.encryption == encryption]
    return float(max((np.abs(r.latent - refs[r.params]).max() for r in chosen), default=0.0))


def session_burst(url: str, token: str, n: int, open_frame_bytes: bytes) -> tuple[Counter, list[dict]]:
    """``n`` session requests at once with one token: status counts and the 429 answers (Retry-After, detail)."""
    from hediff.common.protocol import FRAME_CONTENT_TYPE

    barrier = threading.Barrier(n)
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def one() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
            barrier.wait(30)
            r = c.post("/v1/sessions", content=open_frame_bytes, headers={"content-type": FRAME_CONTENT_TYPE})
            with lock:
                answers.append(r)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [
        {"retry_after": r.headers.get("retry-after"), "detail": r.json().get("detail")}
        for r in answers
        if r.status_code == 429
    ]
    opened = [r.json()["session_id"] for r in answers if r.status_code == 201]
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as c:
        for sid in opened:
            c.delete(f"/v1/sessions/{sid}")
    return Counter(r.status_code for r in answers), refused


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model", default="tiny", help="'tiny' (built here, seed 0) or a diffusers folder")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)

    from bench.fuzz import open_frame, served_target
    from bench.report import command_line, machine_info, save_report
    from hediff.desktop.core.client_model import ClientModel

    limit = args.clients
    with served_target(args.model, "--max-sessions-per-token", str(limit)) as (served, target, model):
        client_model = ClientModel(model, "conv_in")
        params = [client_params(i, args.steps) for i in range(args.clients)]
        refs = reference_latents(client_model, served.url, served.token, params)
        t0 = time.perf_counter()
        runs = run_clients(client_model, served.url, [served.token], params)
        wall = time.perf_counter() - t0
        problems = check_runs(runs, refs)
        burst, refused = session_burst(served.url, served.token, 2 * limit, open_frame(target, "full", "fast").encode())
    steps_expected = sum(r.total_steps for r in runs)
    report = {
        "command": command_line("bench.load", argv),
        "machine": machine_info(),
        "clients": args.clients,
        "steps_per_generation": args.steps,
        "wall_s": round(wall, 2),
        "client_wall_s": {"min": min(r.wall_s for r in runs), "max": max(r.wall_s for r in runs)},
        "errors": [r.error for r in runs if r.error],
        "steps_answered": sum(len(r.steps_seen) for r in runs),
        "steps_expected": steps_expected,
        "max_latent_diff": {e: max_diff(runs, refs, e) for e in ("none", "full", "min-distortion")},
        "problems": problems,
        "burst": {"requests": 2 * limit, "by_status": dict(burst), "refused_sample": refused[:2]},
        "server_alive_after": not served.died_early,
    }
    markdown = "\n".join(
        [
            f"| clients | steps each | wall (s) | errors | steps answered / expected | max latent diff (none / full / "
            f"min-distortion) | burst of {2 * limit} session requests |",
            "|---|---|---|---|---|---|---|",
            f"| {args.clients} | {args.steps} | {wall:.1f} | {len(report['errors'])} | "
            f"{report['steps_answered']} / {steps_expected} | "
            + " / ".join(f"{v:.1e}" for v in report["max_latent_diff"].values())
            + f" | {dict(burst)} |",
            "",
            f"`{report['command']}`",
            "",
        ]
    )
    save_report(args.out, "load", report, markdown)
    for p in problems:
        print("PROBLEM:", p)
    return 0 if not problems and not served.died_early else 1


if __name__ == "__main__":
    sys.exit(main())
