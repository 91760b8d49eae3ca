"""Seconds per training step, measured on a run as it trains (for time estimates before a long run).

:class:`StepTimer` wraps a prepared experiment's ``strategy.after_step``: it starts its clock after the
first ``after`` steps (allocations and first conversions left out) and, once it has timed ``measure`` steps
or ``budget`` seconds, puts ``after_step`` back and calls ``on_measured(seconds_per_step)`` once. Steps are
the strategy's (one per optimizer step), or what ``counter()`` counts (PPO: environment steps). Whatever the loop does between steps
(bin rows, probes, evaluations) falls inside the timed stretch when it happens there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

__all__ = ["StepTimer", "duration"]


class StepTimer:
    def __init__(self, experiment: Any, *, after: int = 100, measure: int | None = None,
                 budget: float = math.inf, on_measured: Callable[[float], None] | None = None,
                 counter: Callable[[], int] | None = None) -> None:
        self.start: float | None = None
        self.first = 0
        self.seconds, self.steps = 0.0, 0
        self.done = False
        strategy = experiment.strategy
        step = strategy.after_step
        done = counter if counter is not None else (lambda: strategy.step)

        def timed():
            stats = step()
            if self.start is None:
                if done() >= after:
                    self.start, self.first = time.perf_counter(), done()
                return stats
            self.seconds, self.steps = time.perf_counter() - self.start, done() - self.first
            if (measure is not None and self.steps >= measure) or self.seconds >= budget:
                self.done = True
                strategy.after_step = step  # measured: the steps go on unwrapped
                if on_measured is not None:
                    on_measured(self.seconds_per_step)
            return stats

        strategy.after_step = timed

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps else math.nan


def duration(seconds: float) -> str:
    """``12 min``, ``3.4 h`` or ``2.1 days``."""
    minutes = math.ceil(seconds / 60)
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes / 60:.1f} h" if minutes < 48 * 60 else f"{minutes / 1440:.1f} days"
