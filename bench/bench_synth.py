"""Benchmark `eyehub synth`: patients/s and files/s for a cohort (not a pass/fail test).

Target (foundation issue): 200 patients at --size small in at most 60 s on 2 cores.

    .venv/bin/python bench/bench_synth.py [--patients 200] [--size small] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from eyehub.synth import generate_cohort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--size", default="small")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="eyehub-bench-synth-"))
    try:
        start = time.perf_counter()
        summary = generate_cohort(out, args.patients, args.seed, args.size, args.workers)
        elapsed = time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(
        f"synth --size {args.size}: {summary.patients} patients, {summary.files} files, "
        f"{summary.bytes_written / 1e6:.1f} MB with {args.workers} workers"
    )
    print(
        f"  wall {elapsed:.1f} s  |  {summary.patients / elapsed:.1f} patients/s  |  "
        f"{summary.files / elapsed:.1f} files/s  |  target <= 60 s for 200 small patients"
    )


if __name__ == "__main__":
    main()
