"""Hostile load: slow-loris connections and upload floods against a real `hediff serve`, while legitimate clients
step. Reports the legitimate clients' step latency (p50/p99) quiet and under attack, the server's peak RSS, and
how much its log grew.

    python -m bench.hostile [--slow 200] [--addresses 4] [--uploaders 8] [--clients 4] [--steps 10]

Everything goes to 127.0.0.1 only (attackers use 127.0.0.2.. as source addresses, which are this machine too);
the attack stops with the legitimate run, and the whole bench by --max-seconds at the latest.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from hediff.common import protocol

REPO = Path(__file__).resolve().parents[1]
FRAME = {"content-type": protocol.FRAME_CONTENT_TYPE}


def proc_status(pid: int, field: str) -> int:
    """A /proc/<pid>/status memory field in bytes (VmRSS now, VmHWM the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


class SlowLoris:
    """``n`` connections spread over ``addresses`` loopback source addresses, each sending a partial request
    header one byte per ``interval_s``; a connection the server closes is reopened (and counted)."""

    def __init__(self, port: int, n: int, addresses: int, interval_s: float = 1.0):
        self.port, self.n, self.interval_s = port, n, interval_s
        self.sources = [f"127.0.0.{2 + i}" for i in range(addresses)]
        self.opened = self.closed_by_server = self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slow-loris", daemon=True)

    def _connect(self, i: int) -> socket.socket | None:
        s = socket.socket()
        s.setblocking(True)
        s.settimeout(2.0)
        try:
            s.bind((self.sources[i % len(self.sources)], 0))
            s.connect(("127.0.0.1", self.port))
            s.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ")
            s.setblocking(False)
            self.opened += 1
            return s
        except OSError:
            self.refused += 1
            s.close()
            return None

    def _run(self) -> None:
        socks: list[socket.socket | None] = [self._connect(i) for i in range(self.n)]
        while not self._stop.wait(self.interval_s):
            for i, s in enumerate(socks):
                if s is None:
                    socks[i] = self._connect(i)
                    continue
                try:
                    try:
                        answer = s.recv(4096)
                    except BlockingIOError:
                        answer = None  # nothing from the server yet: it is still waiting for our header
                    if answer is not None:
                        raise ConnectionResetError  # closed (b"") or answered (a 408): either way, it is over
                    s.send(b"a")
                except OSError:
                    self.closed_by_server += 1
                    s.close()
                    socks[i] = self._connect(i)
        for s in socks:
            if s is not None:
                s.close()

    def start(self) -> SlowLoris:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


class UploadFlood:
    """``n`` threads posting ``size``-byte bodies with a valid token, over and over: the in-flight budget must hold."""

    def __init__(self, url: str, token: str, n: int, size: int):
        self.url, self.token, self.n, self.size = url, token, n, size
        self.by_status: dict[int, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self) -> None:
        body = b"\0" * self.size
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60) as c:
            while not self._stop.is_set():
                try:
                    status = c.post("/v1/sessions", content=body, headers=FRAME).status_code
                except httpx.HTTPError:
                    status = 0
                with self._lock:
                    self.by_status[status] = self.by_status.get(status, 0) + 1
                if status == 429:
                    time.sleep(0.2)

    def start(self) -> UploadFlood:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def _attack(port: int, url: str, token: str, args: dict, stop, results) -> None:
    """The attacker's process: slow-loris and the upload flood until ``stop`` is set; counts go to ``results``."""
    loris = SlowLoris(port, args["slow"], args["addresses"]).start()
    flood = UploadFlood(url, token, args["uploaders"], args["upload_bytes"]).start()
    stop.wait()
    flood.stop()
    loris.stop()
    results.put(
        {
            "opened": loris.opened,
            "closed_by_server": loris.closed_by_server,
            "refused": loris.refused,
            "by_status": flood.by_status,
        }
    )


class Attack:
    """The attack in a process of its own, as a real attacker is: its threads do not share the legitimate
    clients' interpreter (their GIL), only the machine."""

    def __init__(self, port: int, url: str, token: str, **args):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._stop, self._results = ctx.Event(), ctx.Queue()
        self._proc = ctx.Process(target=_attack, args=(port, url, token, args, self._stop, self._results))

    def start(self) -> Attack:
        self._proc.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        counts = self._results.get(timeout=120)
        self._proc.join(30)
        return counts


def second_token(config_dir: Path) -> str:
    """A new token made with `hediff token create` while the server runs (it picks tokens up within a second)."""
    env = dict(os.environ, HEDIFF_CONFIG_DIR=str(config_dir))
    cmd = [sys.executable, "-m", "hediff.desktop.cli", "token", "create", "--label", "flood"]
    token = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip()
    time.sleep(2.0)
    return token


def legitimate_run(target, clients: int, steps: int, deadline: float) -> dict:
    """``clients`` threads, each opening its own session (full encryption, fast preset) and taking ``steps`` steps
    in order. Frames are encrypted before timing starts: the latency is the server's and the network's."""
    from bench.fuzz import open_frame

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def one(i: int) -> None:
        from bench.fuzz import LiveSession
        from hediff.common import he

        with httpx.Client(base_url=target.url, headers=target.auth(), timeout=120) as c:
            body = open_frame(target, "full", "fast", steps=steps).encode()
            r = c.post("/v1/sessions", content=body, headers=FRAME)
            while r.status_code in (429, 503) and time.monotonic() < deadline:
                time.sleep(float(r.headers.get("retry-after", "1")))
                r = c.post("/v1/sessions", content=body, headers=FRAME)
            if r.status_code != 201:
                with lock:
                    errors.append(f"open: HTTP {r.status_code} {r.text[:200]}")
                barrier.abort()
                return
            opened = r.json()
            live = LiveSession(opened["session_id"], "full", "fast", opened, he.ClientKey("fast"))
            frames = [live.step_frame(k).encode() for k in range(steps)]
            try:
                barrier.wait(120)
            except threading.BrokenBarrierError:
                return
            for k, body in enumerate(frames):
                if time.monotonic() > deadline:
                    break
                t0 = time.perf_counter()
                r = c.post(f"/v1/sessions/{live.id}/steps", content=body, headers=FRAME)
                while r.status_code in (429, 503) and time.monotonic() < deadline:  # as a real client: wait, retry
                    time.sleep(float(r.headers.get("retry-after", "1")))
                    r = c.post(f"/v1/sessions/{live.id}/steps", content=body, headers=FRAME)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                    else:
                        errors.append(f"step {k}: HTTP {r.status_code} {r.text[:200]}")
            c.delete(f"/v1/sessions/{live.id}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    arr = np.array(latencies) if latencies else np.array([np.nan])
    return {
        "steps": len(latencies),
        "errors": errors[:5],
        "n_errors": len(errors),
        "p50_s": round(float(np.percentile(arr, 50)), 4),
        "p99_s": round(float(np.percentile(arr, 99)), 4),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slow", type=int, default=200, help="slow-loris connections (at most 2000)")
    ap.add_argument("--addresses", type=int, default=4, help="loopback source addresses they come from (at most 50)")
    ap.add_argument("--uploaders", type=int, default=8, help="threads flooding max-size uploads (at most 64)")
    ap.add_argument("--upload-mb", type=float, default=8.0, help="their body size and the server's --max-request-mb")
    ap.add_argument("--inflight-mb", type=float, default=32.0, help="the server's --max-inflight-mb")
    ap.add_argument("--clients", type=int, default=4, help="legitimate clients stepping")
    ap.add_argument("--steps", type=int, default=10, help="steps each legitimate client takes per phase")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="hard stop for the whole bench")
    ap.add_argument("--model", default="tiny", help="'tiny' (built here, seed 0) or a diffusers folder")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    if not (0 <= args.slow <= 2000 and 1 <= args.addresses <= 50 and 0 <= args.uploaders <= 64):
        ap.error("--slow, --addresses and --uploaders are bounded (2000, 50, 64): this bench must stay small")

    from bench.fuzz import served_target
    from bench.report import command_line, machine_info, save_report

    hard_stop = time.monotonic() + args.max_seconds
    serve_args = ("--max-request-mb", str(args.upload_mb), "--max-inflight-mb", str(args.inflight_mb))
    with served_target(args.model, *serve_args) as (served, target, _model):
        pid = served.proc.pid
        quiet = legitimate_run(target, args.clients, args.steps, hard_stop)
        rss_quiet_peak = proc_status(pid, "VmHWM")
        log_before = served.log_path.stat().st_size
        port = int(served.url.rsplit(":", 1)[1])
        flood_token = second_token(served.log_path.parent)  # the flood is another client than the legitimate ones
        attack = Attack(
            port,
            served.url,
            flood_token,
            slow=args.slow,
            addresses=args.addresses,
            uploaders=args.uploaders,
            upload_bytes=int(args.upload_mb * (1 << 20)),
        ).start()
        time.sleep(3.0)  # let the attack take hold before measuring
        attacked = legitimate_run(target, args.clients, args.steps, hard_stop)
        counts = attack.stop()
        rss_peak = proc_status(pid, "VmHWM")
        alive = httpx.get(served.url + "/v1/health", timeout=30).status_code == 200
        log_growth = served.log_path.stat().st_size - log_before
    ratio = attacked["p99_s"] / quiet["p99_s"] if quiet["p99_s"] else float("nan")
    budget = int(args.inflight_mb * (1 << 20))
    report = {
        "command": command_line("bench.hostile", argv),
        "machine": machine_info(),
        "attack": {
            "slow_loris_connections": args.slow,
            "source_addresses": args.addresses,
            "slow_connections_opened": counts["opened"],
            "slow_connections_closed_by_server": counts["closed_by_server"],
            "slow_connections_refused": counts["refused"],
            "uploaders": args.uploaders,
            "upload_bytes": int(args.upload_mb * (1 << 20)),
            "uploads_by_status": counts["by_status"],
        },
        "legitimate": {"clients": args.clients, "steps_each": args.steps, "quiet": quiet, "attacked": attacked},
        "p99_ratio": round(ratio, 2),
        "server_rss_peak_quiet_bytes": rss_quiet_peak,
        "server_rss_peak_bytes": rss_peak,
        "server_rss_growth_under_attack_bytes": rss_peak - rss_quiet_peak,
        "inflight_budget_bytes": budget,
        "log_growth_bytes": log_growth,
        "server_alive_after": alive,
    }
    mib = 1 << 20
    markdown = "\n".join(
        [
            "| phase | legitimate steps | errors | p50 (s) | p99 (s) |",
            "|---|---|---|---|---|",
            f"| quiet | {quiet['steps']} | {quiet['n_errors']} | {quiet['p50_s']} | {quiet['p99_s']} |",
            f"| {args.slow} slow-loris + {args.uploaders} x {args.upload_mb:g} MiB uploaders | {attacked['steps']} | "
            f"{attacked['n_errors']} | {attacked['p50_s']} | {attacked['p99_s']} |",
            "",
            f"p99 under attack / quiet: {ratio:.2f}x. Server peak RSS {rss_quiet_peak / mib:.0f} MiB quiet, "
            f"{rss_peak / mib:.0f} MiB under attack (+{(rss_peak - rss_quiet_peak) / mib:.0f} MiB; in-flight budget "
            f"{budget / mib:.0f} MiB). Log growth during the attack: {log_growth} bytes. Slow connections: "
            f"{counts['opened']} opened, {counts['closed_by_server']} closed by the server, {counts['refused']} "
            f"refused at connect. Uploads by status: {dict(sorted(counts['by_status'].items()))}. "
            f"Server alive after: {alive}.",
            "",
            f"`{report['command']}`",
            "",
        ]
    )
    save_report(args.out, "hostile", report, markdown)
    ok = alive and quiet["n_errors"] == 0 and attacked["n_errors"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
