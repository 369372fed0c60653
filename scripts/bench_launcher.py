#!/usr/bin/env python3
"""Launcher start-up: wall and CPU seconds of `dogbreed tune --dry-run` (SageMaker and local),
`dogbreed status --local` and `dogbreed --help`, median of N runs each; prints JSON.

Target: `tune --dry-run` and `status` under 1.5 s. Run on an idle machine: wall time on
a loaded one is the CPU time times the load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(argv: list[str], runs: int) -> dict[str, float]:
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dogbreed.launcher.cli", *argv], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return {"wall_s_median": round(statistics.median(walls), 3),
            "cpu_s_median": round(statistics.median(cpus), 3), "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "dogs-sample"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        commands = {
            "tune_dry_run_sagemaker": ["tune", "--dry-run", "--sagemaker", "--region", "eu-west-1",
                                       "--workdir", work],
            "tune_dry_run_local": ["tune", "--dry-run", "--local", "--data", args.data,
                                   "--workdir", work],
            "status_local": ["status", "--local", "--workdir", work],
            "help": ["--help"],
        }
        report = {name: measure(argv, args.runs) for name, argv in commands.items()}
    report["load_average_1m"] = os.getloadavg()[0]
    report["target_s"] = 1.5
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
