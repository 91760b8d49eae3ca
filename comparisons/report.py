"""Everything a finished (or partly finished) comparison writes: tables, plots and ``report.md``.

``python -m comparisons report --out DIR`` calls :func:`write_report` on whatever runs have finished.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from .plots import plot_grids, plot_metrics, plot_performance
from .tables import (
    SUMMARY_METRICS,
    better_direction,
    combined_table,
    load_record,
    summarize_runs,
    write_table,
)

__all__ = ["write_report", "format_summary", "markdown_table"]

log = logging.getLogger(__name__)


def _number(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f"{value:.2e}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def _cell(mean: float, half: float) -> str:
    return _number(mean) if math.isnan(half) else f"{_number(mean)} ± {_number(half)}"


def display_frame(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as text cells: ``mean ± CI half-width`` per metric, one row per arm."""
    metric = summary["performance_metric"].iloc[0] if len(summary) else "loss"
    columns = {"arm": summary["arm"], "n": summary["n"].astype(str)}
    for key, words in SUMMARY_METRICS.items():
        if key == "late_window":
            words = f"late-window {metric}"
        columns[words] = [_cell(m, h) for m, h in zip(summary[f"{key}_mean"], summary[f"{key}_ci95"])]
    return pd.DataFrame(columns)


def format_summary(summary: pd.DataFrame) -> str:
    """Plain-text summary table for the terminal."""
    if not len(summary):
        return "(no finished runs yet)"
    return display_frame(summary).to_string(index=False)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (no tabulate dependency)."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _directions(metric: str) -> list[str]:
    lines = []
    for key, words in SUMMARY_METRICS.items():
        direction = better_direction(key, metric)
        name = f"late-window {metric}" if key == "late_window" else words
        note = {
            "late_window": f"mean {metric} over the last 10% of bins",
            "plasticity_loss": f"first 10% of bins minus last 10% ({metric})",
            "final_effective_rank": "last probe's effective rank of the hidden features",
            "final_dead_fraction": "last probe's fraction of hidden units that never fire",
            "final_weight_magnitude": "last probe's mean |weight|; growth often precedes lost plasticity",
            "seconds_per_step": "wall time per training step: the cost of the refresh",
        }[key]
        better = "not a score" if direction == "neither" else f"{direction} is better"
        lines.append(f"- **{name}** ({better}): {note}.")
    return lines


def _value(value: Any) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def _arm_lines(record: dict[str, Any]) -> list[str]:
    lines = []
    for arm in record["arms"]:
        settings = ", ".join(f"{k}={_value(v)}" for k, v in arm.get("settings", {}).items()) or "defaults"
        bench = ", ".join(f"{k}={_value(v)}" for k, v in arm.get("bench", {}).items()) or "defaults"
        lines.append(f"| {arm['label']} | `{arm['strategy']}` | {settings} | {bench} |")
    return ["| arm | strategy | strategy settings | benchmark settings |", "| --- | --- | --- | --- |", *lines]


def write_report(out: str | os.PathLike, fmt: str = "csv") -> dict[str, Any]:
    """Write ``runs.csv`` (or ``.parquet``), ``summary.csv``, the plots and ``report.md`` under ``out``.

    Returns ``{"summary": DataFrame, "paths": [Path, ...]}``. Only finished runs enter the summary and the
    plots; unfinished ones are in the combined table with ``finished=False``.
    """
    out = Path(out)
    record = load_record(out)
    runs = combined_table(out)
    summary = summarize_runs(out)
    paths = [write_table(runs, out / "runs", fmt)]
    summary_path = out / "summary.csv"
    summary.to_csv(summary_path, index=False)
    paths.append(summary_path)
    finished = runs[runs["finished"]] if len(runs) else runs
    metric = str(summary["performance_metric"].iloc[0]) if len(summary) else "loss"
    plots = []
    if len(finished):
        plots.append(plot_performance(finished, record["arms"], metric, out / "performance.png",
                                      title=f"{record['benchmark']}: {metric} per bin, mean and 95% CI across seeds"))
        plots.append(plot_metrics(finished, record["arms"], out / "metrics.png"))
        plots.extend(plot_grids(summary, record["arms"], out, metric))
    plots = [p for p in plots if p is not None]
    paths += plots
    report = out / "report.md"
    report.write_text(_markdown(record, summary, runs, plots, metric))
    paths.append(report)
    return {"summary": summary, "paths": paths}


def _markdown(record: dict[str, Any], summary: pd.DataFrame, runs: pd.DataFrame, plots: list[Path],
              metric: str) -> str:
    total = runs.groupby(["arm", "seed"]).ngroups if len(runs) else 0
    done = runs[runs["finished"]].groupby(["arm", "seed"]).ngroups if len(runs) else 0
    steps = record.get("steps") or "the benchmark's default"
    lines = [
        f"# Comparison: {record.get('name', 'custom')} on {record['benchmark']}",
        "",
        "Command" + ("s" if len(record.get("commands", [])) > 1 else "") + ":",
        "",
        *[f"    {command}" for command in record.get("commands", []) if command],
        "",
        f"Benchmark `{record['benchmark']}`, {steps} steps per run, seeds {record['seeds']}; "
        f"{done} of {total} started runs finished (the summary and plots use finished runs only).",
        "",
        "## Arms",
        "",
        *_arm_lines(record),
        "",
        "## Summary (mean ± 95% CI half-width across seeds, Student t)",
        "",
        markdown_table(display_frame(summary)) if len(summary) else "(no finished runs yet)",
        "",
        "Which way is better:",
        "",
        *_directions(metric),
        "",
        "Per-arm numbers with all settings: `summary.csv`; every metrics row of every run: `runs.csv` "
        "(or `runs.parquet`); each run's own files: `runs/<arm>/seed-<k>/`.",
        "",
    ]
    if plots:
        lines += ["## Plots", ""]
        for plot in plots:
            lines += [f"![{plot.stem}]({plot.name})", ""]
    return "\n".join(lines)
