"""How long a comparison will take, measured: each arm's population trains briefly, here, now.

For every arm, a population of the arm's seeds is built as the comparison builds it (the same benchmark,
strategy, settings, backend and device) and trained for a calibration stretch (probe off, no files) on one
torch thread, as a worker process trains it; its seconds per step times the run length is the arm's time.
Arms run side by side on the workers, so the comparison takes about the arms' total over the workers (never
less than its slowest arm). Startup, the probe and the report are not counted. On a shared machine the figure is as noisy as the machine.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import pandas as pd
import torch

from dst.runner import prepare

from .api import Prepared

__all__ = ["estimate", "format_estimate"]


def estimate(prepared: Prepared, workers: int, calibration: int = 1000) -> pd.DataFrame:
    """One row per arm: seconds per step of its population, run steps, estimated seconds."""
    rows = []
    seeds = tuple(prepared.comparison.seeds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runs train: one thread per worker process
    try:
        for arm in prepared.arms:
            rows.append(_measure(arm, seeds, calibration))
    finally:
        torch.set_num_threads(threads)
    table = pd.DataFrame(rows)
    total = table["seconds"].sum()
    table.attrs["wall_seconds"] = max(total / max(1, min(workers, len(table))), table["seconds"].max())
    return table


def _measure(arm, seeds: tuple[int, ...], calibration: int) -> dict:
    """One arm's row: its population trained for a calibration stretch, seconds per step times its steps."""
    steps = arm.spec.steps
    measured = max(100, min(calibration, steps // 10 or 1))
    bench = {**arm.spec.bench, "probe": False}
    spec = replace(arm.spec, seeds=seeds, steps=measured + 100, bench=bench, checkpoint_every=None)
    experiment = prepare(spec, progress=False)
    timer = _Timer(experiment, after=100)
    experiment.run()
    per_step = timer.seconds / measured
    return {"arm": arm.label, "seconds_per_step": per_step, "steps": steps, "seconds": per_step * steps}


class _Timer:
    """Wall time of the steps after the first ``after`` (allocations and first conversions excluded)."""

    def __init__(self, experiment, after: int) -> None:
        self.start = None
        self.seconds = 0.0
        step = experiment.strategy.after_step

        def timed():
            stats = step()
            if experiment.strategy.step == after:
                self.start = time.perf_counter()
            elif self.start is not None:
                self.seconds = time.perf_counter() - self.start
            return stats

        experiment.strategy.after_step = timed


def format_estimate(prepared: Prepared, table: pd.DataFrame, workers: int) -> str:
    lines = [f"estimate for {prepared.comparison.name} ({len(prepared.comparison.seeds)} seeds per arm as one "
             f"population, {workers} worker(s)):"]
    width = max(len(label) for label in table["arm"])
    for row in table.itertuples():
        lines.append(f"  {row.arm:{width}}  {row.seconds_per_step * 1e3:9.3f} ms/step  x {row.steps:>9,} steps  "
                     f"= {_duration(row.seconds)}")
    lines.append(f"  total {_duration(table['seconds'].sum())} of arm time: about {_duration(table.attrs['wall_seconds'])} "
                 "of wall time")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes = math.ceil(seconds / 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes / 60:.1f} h"
