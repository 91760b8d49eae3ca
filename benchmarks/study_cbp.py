"""A CBP study on bit-flipping through ``python -m studies``: wall time, best settings, importances.

    python benchmarks/study_cbp.py --trials 30 --steps 200000 --workers 2 --out benchmarks/results/study-cbp
    python benchmarks/study_cbp.py --storage postgresql://USER@HOST:PORT/DB --workers 4
    python benchmarks/study_cbp.py --trials 60 --seeds 3 --batch 10 --workers 2   # populations of 30 members

Runs ``studies tune`` (which continues the study if it exists, up to --trials finished trials), then
``studies report``, and prints the wall time of each, the best trial and the parameter importances.
Trials are the paper's bit-flipping learner (5 hidden units) with the paper's error bins unless
``--bench`` says otherwise; the default objective is the late-window error (minimised).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30, help="finished trials the study should reach")
    parser.add_argument("--steps", type=int, default=200_000, help="training steps per trial")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per trial (values averaged)")
    parser.add_argument("--batch", type=int, default=1, help="trials per population (studies tune --batch)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--storage", default=None, help="default: OUT/STUDY.journal")
    parser.add_argument("--study", default="cbp-bit-flipping")
    parser.add_argument("--objective", default="late_window")
    parser.add_argument("--pruner", default="median", choices=("median", "hyperband", "none"))
    parser.add_argument("--bench", action="append", default=[], metavar="KEY=VALUE",
                        help="benchmark setting, e.g. bin_size=10000 (default: the paper's)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=SPEC", help="search-space override")
    parser.add_argument("--out", default="benchmarks/results/study-cbp")
    args = parser.parse_args()

    storage = ["--storage", args.storage] if args.storage else []
    tune = [sys.executable, "-m", "studies", "tune", "--strategy", "cbp", "--benchmark", "bit-flipping",
            "--study", args.study, "--trials", str(args.trials), "--steps", str(args.steps),
            "--seeds", str(args.seeds), "--batch", str(args.batch), "--workers", str(args.workers), "--objective", args.objective,
            "--pruner", args.pruner, "--out", args.out, "--device", "cpu", *storage]
    tune += [f"--bench={b}" for b in args.bench] + [f"--param={p}" for p in args.param]
    start = time.perf_counter()
    subprocess.run(tune, check=True)
    tuned = time.perf_counter() - start

    report_dir = Path(args.out) / args.study / "report"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "studies", "report", "--study", args.study, "--out", str(report_dir),
                    *(storage or ["--storage", str(Path(args.out) / f"{args.study}.journal")])], check=True)
    reported = time.perf_counter() - start

    best = json.loads((report_dir / "best.json").read_text())
    trials = pd.read_csv(report_dir / "trials.csv")
    print(f"\nwall time: tune {tuned:.0f} s ({args.workers} workers), report {reported:.0f} s")
    print("trials by state: " + ", ".join(f"{k.lower()} {v}" for k, v in best["trials"].items() if v))
    if "duration" in trials:
        seconds = pd.to_timedelta(trials["duration"]).dt.total_seconds()
        print(f"trial duration: median {seconds.median():.0f} s, max {seconds.max():.0f} s")
    for record in best.get("pareto_front", [best["best"]] if "best" in best else []):
        print(f"best: trial {record['number']} {record['values']}\n  params {record['params']}")
    print("importances:")
    print((report_dir / "importances.csv").read_text().strip() or "(none)")
    print(f"report: {report_dir / 'report.md'}")


if __name__ == "__main__":
    main()
