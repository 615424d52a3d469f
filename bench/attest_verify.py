"""Time of one full SEV-SNP verification (parse, report signature, AMD chain to the pinned root, chip/TCB binding,
policy) on the real recorded Milan report in tests/data/attest.

    .venv/bin/python -m bench.attest_verify [--repeat 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from hediff.common.attest.verify import Policy, verify_snp_report

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "attest"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    report = (DATA / "virtee-milan-report.bin").read_bytes()
    vcek = (DATA / "virtee-milan-vcek.der").read_bytes()
    measurement = report[0x90:0xC0]
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        verify_snp_report(report, vcek, policy=Policy(measurements=frozenset({measurement})))
        times.append(time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "what": "verify_snp_report on tests/data/attest/virtee-milan-report.bin (built-in Milan chain)",
                "repeat": args.repeat,
                "median_ms": round(1e3 * statistics.median(times), 2),
                "min_ms": round(1e3 * min(times), 2),
                "max_ms": round(1e3 * max(times), 2),
            }
        )
    )


if __name__ == "__main__":
    main()
