"""Bit-flipping (slowly-changing regression) at paper scale: error per 20,000-example bin.

    python benchmarks/bit_flipping.py --strategies bp --seeds 3 --steps 1000000 --out benchmarks/results/bf

Runs each (strategy, seed) in its own process (one torch thread each), through dst's experiment
loop, and prints the mean error per bin over seeds, per strategy, plus each seed's first and last
bins (per-seed levels differ a lot because the target's scale differs; compare within a seed).
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd


def one_run(job: tuple[str, int, int, dict, dict, str]) -> tuple[str, int, float]:
    import torch

    torch.set_num_threads(1)
    from dst.config import parse_assignments  # noqa: F401  (import check before timing)
    from dst.runner import RunSpec, run

    strategy, seed, steps, bench, settings, out = job
    start = time.perf_counter()
    path = Path(out) / f"{strategy}-s{seed}"
    resume = (path / "checkpoint.pt").exists()
    run(RunSpec("bit-flipping", strategy, steps, seed, bench, settings, device="cpu",
                checkpoint_every=100_000), path, resume=resume, progress=False)
    return strategy, seed, time.perf_counter() - start


def main() -> None:
    from dst.config import parse_assignments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default="bp")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--bench", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="STRATEGY.KEY=VALUE")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="benchmarks/results/bit-flipping")
    args = parser.parse_args()

    bench = parse_assignments(args.bench)
    per_strategy: dict[str, dict] = {}
    for key, value in parse_assignments(args.settings).items():
        name, _, field = key.partition(".")
        per_strategy.setdefault(name, {})[field] = value
    strategies = args.strategies.split(",")
    jobs = [(s, seed, args.steps, bench, per_strategy.get(s, {}), args.out)
            for s in strategies for seed in range(args.seeds)]
    with ProcessPoolExecutor(args.workers) as pool:
        for strategy, seed, seconds in pool.map(one_run, jobs):
            print(f"done {strategy} seed {seed}: {seconds:.0f} s", flush=True)

    frames = []
    for strategy, seed, *_ in jobs:
        df = pd.read_csv(Path(args.out) / f"{strategy}-s{seed}" / "metrics.csv")
        frames.append(df.assign(strategy=strategy, seed=seed))
    data = pd.concat(frames)
    table = data.pivot_table(index="step", columns="strategy", values="loss", aggfunc="mean")
    pd.set_option("display.width", 200)
    print("\nmean error per bin over seeds")
    print(table.to_string(float_format="{:.3f}".format))
    per_seed = data.groupby(["strategy", "seed"]).agg(
        first_bin=("loss", "first"), last_bin=("loss", "last"), max_bin=("loss", "max"),
        us_per_step=("seconds_per_step", lambda s: 1e6 * s.mean()))
    print("\nper seed")
    print(per_seed.to_string(float_format="{:.3f}".format))


if __name__ == "__main__":
    main()
