"""How fast `hediff generate` refuses settings it can check without a model: wall time of the whole process,
from start to exit code 2, for each kind of bad input (the settings model's own bounds, the model's size limit
read from its config, an unwritable --out).

    python -m bench.cli_early_errors [--repeats 5] [--model PATH] [--out bench/results]

Each run is a fresh `python -m hediff` process, as a user starts it; the model folder is the tiny test model
unless --model names another one.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import process_timing_report, save_report

CASES = {
    "width over every server's cap": ["--width", "4096"],
    "width over the model's cap": ["--width", "72"],
    "guidance NaN": ["--guidance", "nan"],
    "steps < 1": ["--steps", "0"],
    "unwritable --out": ["--out", "/etc/hostname/out.png"],
}


def run_case(model: Path, args: list[str]) -> tuple[float, int, str]:
    cmd = [sys.executable, "-m", "hediff", "generate", "--local-backend", "--model", str(model), "--prompt", "x"]
    t = time.perf_counter()
    done = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=600)
    return time.perf_counter() - t, done.returncode, done.stderr.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the tiny test model)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from hediff.common.models import build_tiny_model

            model = build_tiny_model(Path(tmp) / "tiny", seed=0)
        rows = []
        for name, case in CASES.items():
            runs = [run_case(model, case) for _ in range(args.repeats)]
            times = [r[0] for r in runs]
            rows.append(
                {
                    "case": name,
                    "args": " ".join(case),
                    "exit_codes": sorted({r[1] for r in runs}),
                    "median_s": statistics.median(times),
                    "max_s": max(times),
                    "message": runs[0][2],
                }
            )
    report, lines = process_timing_report("bench.cli_early_errors", argv, args.repeats, rows)
    lines += [
        "| bad input | options | exit code | median s | max s | message |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        codes = ", ".join(map(str, r["exit_codes"]))
        lines.append(
            f"| {r['case']} | `{r['args']}` | {codes} | {r['median_s']:.2f} | {r['max_s']:.2f} | {r['message']} |"
        )
    save_report(args.out, "cli_early_errors", report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
