"""Run-level summaries from the per-bin (or per-task) metrics rows.

The windows are taken over the rows *after the first task*: the first task is learning from scratch,
not plasticity, and with it in the early window a run's plasticity loss mostly measures how fast a
fresh net learns. The rows of the first task are the rows whose ``task`` is the first row's (a bin that
holds the first task's end is the first row of the next task only when bins are longer than tasks;
then that bin is dropped too). A run whose rows all belong to one task keeps them all.

- late-window mean: the mean of a column over the last ``window`` fraction of those rows (default 10%);
- early-window mean: the same over the first ``window`` fraction;
- plasticity loss: how much worse the late window is than the early one, positive when plasticity was
  lost, whatever the measure: early minus late for accuracies, late minus early for losses. Lower is
  better. When the two windows share rows (a run of one or a few bins) it is undefined: NaN, and
  ``windows_overlap`` is true.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

__all__ = ["HIGHER_IS_BETTER", "after_first_task", "selected_test_accuracy", "late_window_mean", "early_window_mean", "windows_overlap",
           "plasticity_loss", "summarize"]

#: Performance measures where a larger value is better (the others, losses, are better when smaller).
HIGHER_IS_BETTER = ("accuracy", "test_accuracy", "selected_test_accuracy", "episodic_return")


def _count(rows: int, window: float) -> int:
    return max(1, math.ceil(rows * window))


def after_first_task(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows after the first task's (all rows when they all belong to one task)."""
    if not len(rows) or "task" not in rows:
        return rows
    later = rows[rows["task"] != rows["task"].iloc[0]]
    return later if len(later) else rows


def late_window_mean(values: pd.Series, window: float = 0.1) -> float:
    values = values.dropna()
    return float(values.iloc[-_count(len(values), window):].mean()) if len(values) else math.nan


def early_window_mean(values: pd.Series, window: float = 0.1) -> float:
    values = values.dropna()
    return float(values.iloc[: _count(len(values), window)].mean()) if len(values) else math.nan


def windows_overlap(values: pd.Series, window: float = 0.1) -> bool:
    """Whether the early and late windows of ``values`` share rows (then plasticity loss is undefined)."""
    count = len(values.dropna())
    return 2 * _count(count, window) > count


def plasticity_loss(values: pd.Series, metric: str, window: float = 0.1) -> float:
    """How much worse the late window is than the early one (> 0: plasticity lost); NaN if they overlap."""
    if windows_overlap(values, window):
        return math.nan
    early, late = early_window_mean(values, window), late_window_mean(values, window)
    return early - late if metric in HIGHER_IS_BETTER else late - early


def selected_test_accuracy(rows: pd.DataFrame) -> pd.Series:
    """Per task, the test accuracy of the evaluation with the best validation accuracy (the first of equals):
    the model early stopping goes on with, and what the class-incremental CIFAR paper reports per increment."""
    evaluated = rows.dropna(subset=["validation_accuracy", "test_accuracy"])
    best = evaluated.groupby("task", sort=True)["validation_accuracy"].idxmax()
    return evaluated.loc[best.to_numpy(), "test_accuracy"].reset_index(drop=True)


def summarize(rows: pd.DataFrame, window: float = 0.1) -> dict[str, Any]:
    """Performance and plasticity numbers of one run (NaN where a column is absent). The measure is the
    online accuracy (or loss) per row, the episodic return in reinforcement learning; the held-out test accuracy per task where a stream tests (continual
    ImageNet); the test accuracy of each task's best validation epoch where it validates too (CIFAR)."""
    performance = "accuracy" if "accuracy" in rows else "loss"
    if "episodic_return" in rows:
        performance = "episodic_return"  # reinforcement learning: the return of the episodes ended in each bin
    if "test_accuracy" in rows and rows["test_accuracy"].notna().any():
        performance = "test_accuracy"
    per_task = None
    if performance == "test_accuracy" and "validation_accuracy" in rows:
        performance = "selected_test_accuracy"
        per_task = selected_test_accuracy(rows)
        values = per_task.iloc[1:]  # after the first task, one value per task
    else:
        values = after_first_task(rows)[performance] if len(rows) else pd.Series(dtype=float)
    summary: dict[str, Any] = {
        "performance_metric": performance,
        "late_window": late_window_mean(values, window),
        "early_window": early_window_mean(values, window),
        "plasticity_loss": plasticity_loss(values, performance, window),
        "windows_overlap": windows_overlap(values, window),
        "steps": int(rows["step"].iloc[-1]) if len(rows) else 0,
        "units_replaced": int(rows["units_replaced"].sum()),
        "connections_regrown": int(rows["connections_regrown"].sum()),
        "seconds_per_step": float(rows["seconds"].sum() / rows["step"].iloc[-1]) if len(rows) else math.nan,
    }
    if per_task is not None:  # what the class-incremental CIFAR paper plots: one accuracy per increment
        summary["selected_test_accuracy_per_task"] = [float(v) for v in per_task]
    for column in ("effective_rank", "approximate_rank", "dead_fraction", "weight_magnitude"):
        column_values = rows[column].dropna() if column in rows else pd.Series(dtype=float)
        summary[f"final_{column}"] = float(column_values.iloc[-1]) if len(column_values) else math.nan
    return summary
