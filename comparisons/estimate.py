"""How long a comparison will take, measured: each arm's population trains briefly, here, now.

For every arm, a population of the arm's seeds is built as the comparison builds it (the same benchmark,
strategy, settings, backend and device) and trained for a calibration stretch (probe off, no files) on one
torch thread, as a worker process trains it; its seconds per step times the run length is the arm's time.
Arms run side by side on the workers, so the comparison takes about the arms' total over the workers (never
less than its slowest arm). A benchmark that cannot batch its members (the conv nets) is timed on one seed
and counted once per seed. Each arm is timed over up to 1,000 steps or ``budget`` seconds, whichever comes
first. Startup, the probe and the report are not counted (nor a stream's held-out evaluations, unless one
falls in the timed stretch). On a shared machine the figure is as noisy as the machine.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pandas as pd
import torch

from dst import benchmarks
from dst.runner import prepare
from dst.timing import StepTimer, duration

from .api import Prepared

__all__ = ["estimate", "format_estimate"]


def estimate(prepared: Prepared, workers: int, calibration: int = 1000, budget: float = math.inf) -> pd.DataFrame:
    """One row per arm: seconds per step of its population, run steps, estimated seconds (each arm timed over
    ``calibration`` steps, or ``budget`` seconds when that comes first)."""
    rows = []
    seeds = tuple(prepared.comparison.seeds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runs train: one thread per worker process
    try:
        for arm in prepared.arms:
            rows.append(_measure(arm, seeds, calibration, budget))
    finally:
        torch.set_num_threads(threads)
    table = pd.DataFrame(rows)
    total = table["seconds"].sum()
    parallel = max(1, min(workers, int(table["runs"].sum())))  # populations, or the single runs of each seed
    table.attrs["wall_seconds"] = max(total / parallel, (table["seconds"] / table["runs"]).max())
    return table


class _Measured(Exception):
    """Stops a calibration run once its timer has what it needs."""


def _measure(arm, seeds: tuple[int, ...], calibration: int, budget: float) -> dict:
    """One arm's row: its population trained for a calibration stretch (``calibration`` steps, or ``budget``
    seconds when those come first: a ResNet step takes seconds on a CPU), seconds per step times its steps."""
    steps = arm.spec.steps
    measured = max(100, min(calibration, steps // 10 or 1))
    warmup = 10 if budget < math.inf else 100
    bench = {**arm.spec.bench, "probe": False}
    runs = 1  # a benchmark that cannot batch members runs each seed alone: time one, count them all
    if not benchmarks.get(arm.spec.benchmark).cls.batchable:
        seeds, runs = seeds[:1], len(seeds)
    # the run itself, as the comparison would start it (so every check of its length holds), stopped by the timer
    spec = replace(arm.spec, seeds=seeds, bench=bench, checkpoint_every=None)
    experiment = prepare(spec, progress=False)

    def stop(_: float) -> None:
        raise _Measured

    timer = StepTimer(experiment, after=warmup, measure=measured, budget=budget, on_measured=stop)
    try:
        experiment.run()
    except _Measured:
        pass
    per_step = timer.seconds_per_step
    return {"arm": arm.label, "seconds_per_step": per_step, "steps": steps, "runs": runs,
            "seconds": per_step * steps * runs}


def format_estimate(prepared: Prepared, table: pd.DataFrame, workers: int) -> str:
    how = "as one population" if (table["runs"] == 1).all() else "each a run of its own"
    lines = [f"estimate for {prepared.comparison.name} ({len(prepared.comparison.seeds)} seeds per arm {how}, "
             f"{workers} worker(s)):"]
    width = max(len(label) for label in table["arm"])
    for row in table.itertuples():
        lines.append(f"  {row.arm:{width}}  {row.seconds_per_step * 1e3:9.3f} ms/step  x {row.steps:>9,} steps  "
                     f"= {duration(row.seconds)}")
    lines.append(f"  total {duration(table['seconds'].sum())} of arm time: about {duration(table.attrs['wall_seconds'])} "
                 "of wall time")
    return "\n".join(lines)
