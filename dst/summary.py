"""Run-level summaries from the per-bin (or per-task) metrics rows.

- late-window mean: the mean of a column over the last ``window`` fraction of rows (default 10%);
- plasticity loss: the mean over the first ``window`` of rows minus the mean over the last ``window``
  (for accuracy, positive means the learner got worse at new tasks; for loss, negative means worse).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

__all__ = ["late_window_mean", "early_window_mean", "plasticity_loss", "summarize"]


def _count(rows: int, window: float) -> int:
    return max(1, math.ceil(rows * window))


def late_window_mean(values: pd.Series, window: float = 0.1) -> float:
    values = values.dropna()
    return float(values.iloc[-_count(len(values), window):].mean()) if len(values) else math.nan


def early_window_mean(values: pd.Series, window: float = 0.1) -> float:
    values = values.dropna()
    return float(values.iloc[: _count(len(values), window)].mean()) if len(values) else math.nan


def plasticity_loss(values: pd.Series, window: float = 0.1) -> float:
    """Early-window mean minus late-window mean."""
    return early_window_mean(values, window) - late_window_mean(values, window)


def summarize(rows: pd.DataFrame, window: float = 0.1) -> dict[str, Any]:
    """Performance and plasticity numbers of one run (NaN where a column is absent)."""
    performance = "accuracy" if "accuracy" in rows else "loss"
    if "test_accuracy" in rows and rows["test_accuracy"].notna().any():
        performance = "test_accuracy"  # held-out accuracy per task (continual ImageNet) is the measure
    summary: dict[str, Any] = {
        "performance_metric": performance,
        "late_window": late_window_mean(rows[performance], window),
        "early_window": early_window_mean(rows[performance], window),
        "plasticity_loss": plasticity_loss(rows[performance], window),
        "steps": int(rows["step"].iloc[-1]) if len(rows) else 0,
        "units_replaced": int(rows["units_replaced"].sum()),
        "connections_regrown": int(rows["connections_regrown"].sum()),
        "seconds_per_step": float(rows["seconds"].sum() / rows["step"].iloc[-1]) if len(rows) else math.nan,
    }
    for column in ("effective_rank", "dead_fraction", "weight_magnitude"):
        values = rows[column].dropna() if column in rows else pd.Series(dtype=float)
        summary[f"final_{column}"] = float(values.iloc[-1]) if len(values) else math.nan
    return summary
