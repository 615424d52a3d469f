"""Scale-out: N clients stepping at once through the single-process backend and through the Ray Serve backend.

    python -m bench.ray_scale [--model embedded] [--clients 1,4,8,16] [--generations 2] [--steps 10]
                              [--device auto] [--session-replicas 2] [--unet-replicas 1] [--max-batch-size 8]
                              [--batch-wait-ms 10] [--out bench/results]

Each client replays a real encrypted generation (requests recorded once from the single-process backend: a real
client's head, encryption and ciphertexts), so the clients spend no CPU on the model and the numbers are the
server's. Reported per backend and N: steps/s, p50/p99 step round trip, and for Ray the UNet tier's mean and
largest batch and the share of a step's time spent in the session store (Redis). Both backends run as separate
processes from the clients (`hediff serve`, and Ray's own workers). The same script runs on a GPU machine
(`--device cuda`, one GPU per UNet replica), where batching is where the gain is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench.replay import RecordingASGI, replay
from bench.report import command_line, machine_info, save_report

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a large red circle at the top left on a blue background",
    "a small green square at the bottom right on a white background",
    "a large yellow star in the center on a black background",
    "a small purple triangle at the top right on a gray background",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record(model_path: Path, model_id: str, steps: int, n: int) -> list:
    """``n`` real encrypted generations against an in-process backend, as recorded exchanges."""
    from hediff.backend.app import create_app
    from hediff.backend.auth import TokenStore
    from hediff.backend.engine import ServerModel
    from hediff.backend.serve import start_in_thread
    from hediff.desktop.core.backend_client import BackendClient
    from hediff.desktop.core.client_model import ClientModel
    from hediff.desktop.core.engine import GenerationParams, Generator

    tokens, token = TokenStore.ephemeral("bench")
    recorder = RecordingASGI(create_app(ServerModel(model_path, model_id, device="cpu", dtype="float32"), tokens))
    running = start_in_thread(recorder)
    client_model = ClientModel(model_path, "conv_in")
    recorded = []
    try:
        with BackendClient(running.url, token) as client:
            for i in range(n):
                recorder.exchanges.clear()
                params = GenerationParams(
                    prompt=PROMPTS[i % len(PROMPTS)],
                    steps=steps,
                    seed=i,
                    guidance=2.0,
                    scheduler="ddim",
                    encryption="full",
                )
                Generator(client_model, client).generate(params)
                recorded.append(list(recorder.exchanges))
    finally:
        running.stop()
    return recorded


def load(url: str, tokens: list[str], recorded: list, clients: int, generations: int) -> dict:
    """``clients`` threads, each replaying ``generations`` recorded generations back to back."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    barrier = threading.Barrier(clients)

    def work(i: int) -> None:
        barrier.wait()
        try:
            for g in range(generations):
                replay(url, tokens[i], recorded[(i + g) % len(recorded)], latencies[i])
        except Exception as e:  # noqa: BLE001 - counted and reported
            errors.append(f"client {i}: {e!r}"[:300])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    flat = np.array([x for per in latencies for x in per])
    return {
        "clients": clients,
        "steps": int(flat.size),
        "wall_s": wall,
        "steps_per_s": flat.size / wall,
        "step_s_total": float(flat.sum()),
        "p50_s": float(np.percentile(flat, 50)) if flat.size else None,
        "p99_s": float(np.percentile(flat, 99)) if flat.size else None,
        "errors": errors,
    }


def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    import redis

    port = free_port()
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        cwd=folder,
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(200):
        try:
            redis.Redis.from_url(url).ping()
            return proc, url
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def wait_health(url: str, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the backend exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError("the backend did not start")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--clients", default="1,4,8,16")
    p.add_argument("--generations", type=int, default=2, help="generations each client replays")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--session-replicas", type=int, default=2)
    p.add_argument("--session-workers", type=int, default=4)
    p.add_argument("--unet-replicas", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads of the single-process server and of each UNet replica (the same, for a fair comparison)",
    )
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]

    from hediff.backend.auth import TokenStore
    from hediff.backend.ray_serve import batch_sizes, clear_metrics, step_store_times
    from hediff.common.models import resolve_model

    model_path = resolve_model(args.model)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"hediff-ray-scale-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    store = TokenStore(path=work / "tokens.json")
    tokens = [store.create(f"client-{i}") for i in range(max(counts))]
    print(f"recording {min(4, max(counts))} encrypted generations ...", flush=True)
    recorded = record(model_path, args.model, args.steps, min(4, max(counts)))
    rows = []
    hediff = [
        sys.executable,
        "-m",
        "hediff",
        "serve",
        "--model",
        str(model_path),
        "--tokens-file",
        str(work / "tokens.json"),
        "--device",
        args.device,
        "--max-sessions-per-token",
        "8",
        "--torch-threads",
        str(args.torch_threads),
    ]

    port = free_port()
    single = subprocess.Popen([*hediff, "--port", str(port)], stderr=subprocess.DEVNULL)
    try:
        wait_health(f"http://127.0.0.1:{port}", single)
        load(f"http://127.0.0.1:{port}", tokens, recorded, 1, 1)  # warm-up, not measured
        for n in counts:
            row = load(f"http://127.0.0.1:{port}", tokens, recorded, n, args.generations)
            rows.append({"backend": "single-process", **row})
            print(rows[-1], flush=True)
    finally:
        single.terminate()
        single.wait(30)

    redis_proc, redis_url = start_redis(work)
    port = free_port()
    ray_cmd = [
        *hediff,
        "--port",
        str(port),
        "--ray",
        "--redis",
        redis_url,
        "--session-replicas",
        str(args.session_replicas),
        "--session-workers",
        str(args.session_workers),
        "--unet-replicas",
        str(args.unet_replicas),
        "--max-batch-size",
        str(args.max_batch_size),
        "--batch-wait-ms",
        str(args.batch_wait_ms),
    ]
    t0 = time.perf_counter()
    on_ray = subprocess.Popen(ray_cmd, stderr=subprocess.DEVNULL)
    try:
        wait_health(f"http://127.0.0.1:{port}", on_ray, timeout_s=300)
        ray_start_s = time.perf_counter() - t0
        load(f"http://127.0.0.1:{port}", tokens, recorded, max(2, args.session_replicas), 1)  # warm every replica
        for n in counts:
            clear_metrics(redis_url)
            row = load(f"http://127.0.0.1:{port}", tokens, recorded, n, args.generations)
            sizes = batch_sizes(redis_url)
            store_times = step_store_times(redis_url)
            store_s = sum(s for s, _ in store_times)
            row.update(
                mean_batch=float(np.mean(sizes)) if sizes else None,
                max_batch=max(sizes) if sizes else None,
                store_share=store_s / row["step_s_total"] if row["steps"] else None,
                store_ms_per_step=1000 * store_s / max(1, len(store_times)),
            )
            rows.append({"backend": "ray-serve", **row})
            print(rows[-1], flush=True)
    finally:
        on_ray.send_signal(2)
        try:
            on_ray.wait(60)
        except subprocess.TimeoutExpired:
            on_ray.kill()
        redis_proc.terminate()

    md = [
        f"`{command_line('bench.ray_scale', argv)}`",
        "",
        f"Model {args.model}, DDIM {args.steps} steps, encrypted (full, fast preset); {args.generations} generations "
        f"per client, replayed; {args.torch_threads} torch thread(s) per UNet process. "
        f"Ray: {args.session_replicas} session replicas x {args.session_workers} workers, "
        f"{args.unet_replicas} UNet replica(s), batches up to {args.max_batch_size}, wait {args.batch_wait_ms:g} ms; "
        f"cluster and deployments ready in {ray_start_s:.0f} s. Machine: {machine_info()['cpu']}, "
        f"{os.cpu_count()} cores.",
        "",
        "| backend | clients | steps/s | p50 step | p99 step | mean batch | largest batch | store share (ms/step) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        batch = f"{r['mean_batch']:.2f}" if r.get("mean_batch") else "-"
        share = f"{100 * r['store_share']:.1f}% ({r['store_ms_per_step']:.1f})" if r.get("store_share") else "-"
        md.append(
            f"| {r['backend']} | {r['clients']} | {r['steps_per_s']:.1f} | {1000 * r['p50_s']:.0f} ms | "
            f"{1000 * r['p99_s']:.0f} ms | {batch} | {r.get('max_batch') or '-'} | {share} |"
        )
    errors = [e for r in rows for e in r["errors"]]
    md += ["", f"Errors: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""), ""]
    report = {
        "command": command_line("bench.ray_scale", argv),
        "machine": machine_info(),
        "rows": rows,
        "ray_start_s": ray_start_s,
    }
    save_report(args.out, "ray_scale", report, "\n".join(md))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
