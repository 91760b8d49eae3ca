"""What a study optimises: named numbers from a run's :func:`dst.summary.summarize`, each with a direction.

- ``late_window``: the performance over the last 10% of metrics rows (accuracy for classification,
  maximised; loss for regression, minimised). The direction comes from the benchmark's task type.
- ``plasticity_loss``: how much worse the learner got from the first to the last 10% of the rows after
  the first task, positive when plasticity was lost (early minus late accuracy, late minus early loss:
  :func:`dst.summary.plasticity_loss`); minimised.
- ``effective_rank``: the probe's effective rank of the hidden features at the last probe; maximised.
- ``dead_fraction``: the probe's fraction of dead hidden units at the last probe; minimised.
- ``seconds_per_step``: wall time per training step; minimised.

Several objectives make a multi-objective study (a Pareto front). Values of a trial run with several
seeds are means over the seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dst import benchmarks
from dst.errors import ConfigError

__all__ = ["Objective", "OBJECTIVES", "parse_objectives", "directions", "objective_values"]

@dataclass(frozen=True)
class Objective:
    name: str
    key: str  # the summarize() key it reads
    direction: str | None  # None: from the benchmark's task type
    needs_probe: bool = False
    help: str = ""


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("late_window", "late_window", None, help="late-window accuracy (max) or loss (min)"),
        Objective("plasticity_loss", "plasticity_loss", "minimize", help="how much worse the late window is than the early one (> 0: lost)"),
        Objective("effective_rank", "final_effective_rank", "maximize", True, "final effective rank"),
        Objective("dead_fraction", "final_dead_fraction", "minimize", True, "final fraction of dead units"),
        Objective("seconds_per_step", "seconds_per_step", "minimize", help="wall time per step"),
    )
}


def parse_objectives(text: str | Sequence[str]) -> list[str]:
    """``"late_window,seconds_per_step"`` -> validated names; an unknown one lists the valid names."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise ConfigError(f"give at least one objective; valid: {', '.join(OBJECTIVES)}")
    for name in names:
        if name not in OBJECTIVES:
            raise ConfigError(f"unknown objective {name!r}; valid objectives: {', '.join(OBJECTIVES)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"objective given twice in {','.join(names)}")
    return names


def directions(names: Sequence[str], benchmark: str, bench: Mapping[str, Any] | None = None) -> list[str]:
    """Optuna directions of ``names`` on ``benchmark``; refuses probe metrics when the probe is off."""
    built = benchmarks.build(benchmark, **dict(bench or {}))
    result = []
    for name in names:
        objective = OBJECTIVES[name]
        if objective.needs_probe and not built.config.probe:
            raise ConfigError(f"objective {name!r} needs the probe, and the benchmark has probe=false")
        if objective.direction is not None:
            result.append(objective.direction)
        else:
            higher = built.task_type in ("classification", "reinforcement")  # accuracy, return: higher is better
            result.append("maximize" if higher else "minimize")
    return result


def objective_values(summary: Mapping[str, Any], names: Sequence[str]) -> list[float]:
    """The values of ``names`` from one run's summary (NaN where the run has none yet)."""
    return [float(summary.get(OBJECTIVES[name].key, math.nan)) for name in names]
