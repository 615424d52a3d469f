"""How long the `hediff` command takes to answer: `--help`, `--version`, `generate --help`, a refused `serve`
port, and the time to the first image (`hediff generate --local-backend` with the embedded model, model load
included), each as a fresh process the way a user starts it.

    python -m bench.cli_startup [--repeats 5] [--no-first-image] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import process_timing_report, save_report

CASES = {
    "hediff --help": ["--help"],
    "hediff --version": ["--version"],
    "hediff generate --help": ["generate", "--help"],
    "hediff serve --port 0 (refused)": ["serve", "--port", "0"],
}
FIRST_IMAGE = ["generate", "--local-backend", "--model", "embedded", "--prompt", "a large red circle in the center"]
FIRST_IMAGE += ["--steps", "20", "--scheduler", "plms", "--seed", "7", "--quiet"]


def run(args: list[str]) -> tuple[float, int, str]:
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "hediff", *args], capture_output=True, text=True, timeout=900)
    return time.perf_counter() - t, done.returncode, done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per command (the median is reported)")
    parser.add_argument("--no-first-image", action="store_true", help="skip the (slow) first-image run")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the report")
    args = parser.parse_args(argv)
    rows = []
    for name, case in CASES.items():
        runs = [run(case) for _ in range(args.repeats)]
        times = [r[0] for r in runs]
        codes = sorted({r[1] for r in runs})
        rows.append({"command": name, "exit_codes": codes, "median_s": statistics.median(times), "max_s": max(times)})
    if not args.no_first_image:
        with tempfile.TemporaryDirectory() as tmp:
            seconds, code, stdout = run([*FIRST_IMAGE, "--out", str(Path(tmp) / "first.png")])
        total_s = json.loads(stdout.strip().splitlines()[-1])["total_s"] if code == 0 else None
        rows.append(
            {
                "command": "hediff " + " ".join(FIRST_IMAGE) + " (first image, process start to exit)",
                "exit_codes": [code],
                "median_s": seconds,
                "max_s": seconds,
                "generation_s": total_s,
            }
        )
    report, lines = process_timing_report("bench.cli_startup", argv, args.repeats, rows)
    lines += [
        "| command | exit code | median s | max s |",
        "|---|---|---|---|",
    ]
    for r in rows:
        codes = ", ".join(map(str, r["exit_codes"]))
        lines.append(f"| `{r['command']}` | {codes} | {r['median_s']:.2f} | {r['max_s']:.2f} |")
    save_report(args.out, "cli_startup", report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
