"""What every benchmark records with its numbers: the command, the machine, and the files it writes."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(**extra) -> dict:
    import tenseal
    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "tenseal": getattr(tenseal, "__version__", "?"),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        **extra,
    }


def command_line(module: str, argv: list[str] | None) -> str:
    return f"python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:])


def save_report(out_dir: Path, name: str, report: dict, markdown: str) -> None:
    """``<name>.json`` (raw numbers) and ``<name>.md`` (the table for docs/performance.md); prints the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out_dir / f"{name}.md").write_text(markdown)
    print(markdown)


def process_timing_report(module: str, argv: list[str] | None, repeats: int, rows: list[dict]) -> tuple[dict, list]:
    """The report of a benchmark that times fresh processes, and the start of its markdown: the command, the
    machine, and how long a bare ``python -c pass`` takes here (the floor for any command)."""
    import subprocess

    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    bare_python_s = time.perf_counter() - t
    report = {
        "command": command_line(module, argv),
        "machine": machine_info(),
        "repeats": repeats,
        "bare_python_s": bare_python_s,
        "rows": rows,
    }
    heading = f"`{report['command']}` ({repeats} runs each; a bare `python -c pass` took {bare_python_s:.2f} s)"
    return report, [heading, ""]
