"""Bit-flipping (slowly-changing regression) at paper scale: error per 20,000-example bin.

    python benchmarks/bit_flipping.py --strategies bp --seeds 3 --steps 1000000 --out benchmarks/results/bf

Runs each strategy's seeds as one population (``RunSpec(seeds=...)``: one member per seed, trained in
one batched pass, member s exactly the run of seed s alone), each strategy in its own process (one
torch thread each), through dst's experiment loop, and prints the mean error per bin over seeds, per
strategy, plus each seed's first and last bins (per-seed levels differ a lot because the target's scale
differs; compare within a seed). The members of a population share each bin's wall time, so the timing
column is the population's time per step divided by its members: microseconds per member-step.
A rerun with the same --out and --seeds resumes each population from its last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd


def one_population(job: tuple[str, tuple[int, ...], int, dict, dict, str]) -> tuple[str, float]:
    import torch

    torch.set_num_threads(1)
    from dst.rundir import POPULATION  # imported before timing
    from dst.runner import RunSpec, run

    strategy, seeds, steps, bench, settings, out = job
    start = time.perf_counter()
    path = Path(out) / strategy
    run(RunSpec("bit-flipping", strategy, steps, bench=bench, settings=settings, device="cpu",
                checkpoint_every=100_000, seeds=seeds), path, resume=(path / POPULATION).exists(), progress=False)
    return strategy, time.perf_counter() - start


def main() -> None:
    from dst.config import parse_assignments
    from dst.runner import member_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default="bp")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--bench", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="STRATEGY.KEY=VALUE")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="strategies run at once")
    parser.add_argument("--out", default="benchmarks/results/bit-flipping")
    args = parser.parse_args()

    bench = parse_assignments(args.bench)
    per_strategy: dict[str, dict] = {}
    for key, value in parse_assignments(args.settings).items():
        name, _, field = key.partition(".")
        per_strategy.setdefault(name, {})[field] = value
    strategies = args.strategies.split(",")
    seeds = tuple(range(args.seeds))
    jobs = [(s, seeds, args.steps, bench, per_strategy.get(s, {}), args.out) for s in strategies]
    with ProcessPoolExecutor(min(args.workers, len(jobs))) as pool:
        for strategy, seconds in pool.map(one_population, jobs):
            print(f"done {strategy} seeds {seeds[0]}-{seeds[-1]} (one population): {seconds:.0f} s", flush=True)

    frames = []
    for strategy in strategies:
        for seed in seeds:
            df = pd.read_csv(member_dir(Path(args.out) / strategy, seed) / "metrics.csv")
            frames.append(df.assign(strategy=strategy, seed=seed))
    data = pd.concat(frames)
    table = data.pivot_table(index="step", columns="strategy", values="loss", aggfunc="mean")
    pd.set_option("display.width", 200)
    print("\nmean error per bin over seeds")
    print(table.to_string(float_format="{:.3f}".format))
    per_seed = data.groupby(["strategy", "seed"]).agg(
        first_bin=("loss", "first"), last_bin=("loss", "last"), max_bin=("loss", "max"),
        us_per_member_step=("seconds_per_step", lambda s: 1e6 * s.mean() / len(seeds)))
    print("\nper seed")
    print(per_seed.to_string(float_format="{:.3f}".format))


if __name__ == "__main__":
    main()
