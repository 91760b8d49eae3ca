"""Everything a finished (or partly finished) comparison writes: tables, plots and ``report.md``.

``python -m comparisons report --out DIR`` calls :func:`write_report` on whatever runs have finished; runs
that failed or have not finished are listed with their reasons, and the other arms are summarised as usual.
"""

from __future__ import annotations

import logging
import math
import os
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd

from .plots import plot_budget, plot_grids, plot_metrics, plot_performance
from .tables import (
    INTERVAL,
    SUMMARY_METRICS,
    better_direction,
    combined_table,
    load_record,
    per_task_table,
    run_states,
    summarize_runs,
    write_table,
)
from .walltime import wall_time_lines

__all__ = ["write_report", "format_summary", "markdown_table", "verdict"]

log = logging.getLogger(__name__)


def _number(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f"{value:.2e}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


#: The cell of an arm whose runs' early and late windows share rows (dst's ``windows_overlap``).
ONE_WINDOW = "n/a (one window)"


def _cell(mean: float, low: float, high: float) -> str:
    """``mean [low, high]``; the mean alone where the interval is undefined (one run)."""
    if math.isnan(low) or math.isnan(high):
        return _number(mean)
    return f"{_number(mean)} [{_number(low)}, {_number(high)}]"


def _header(key: str, metric: str) -> str:
    """The summary table's column header of ``key``: the performance measure named, the sign spelled out."""
    if key == "late_window":
        return f"late-window {metric}"
    if key == "plasticity_loss":
        return "plasticity loss (lower is better: >0 = lost)"
    return SUMMARY_METRICS[key]


def _one_window(summary: pd.DataFrame) -> pd.Series:
    """Per arm: whether its runs' early and late windows share rows (no plasticity loss to show)."""
    return summary["windows_overlap"].eq(True) if "windows_overlap" in summary else pd.Series(False, summary.index)


def _performance_metric(summary: pd.DataFrame) -> str:
    """The performance measure of the summary's arms (an arm without a finished run has none)."""
    return next((str(m) for m in summary.get("performance_metric", []) if isinstance(m, str) and m), "loss")


def display_frame(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as text cells: ``mean [low, high]`` (:data:`INTERVAL`) per metric, one row per arm,
    :data:`ONE_WINDOW` for the plasticity loss of an arm whose windows coincide; the ``failed`` and
    ``unfinished`` counts only when some arm has such runs."""
    metric = _performance_metric(summary)
    columns = {"arm": summary["arm"], "n": summary["n"].astype(str)}
    for count in ("failed", "unfinished"):
        if count in summary and summary[count].any():
            columns[count] = summary[count].astype(str)
    for key in SUMMARY_METRICS:
        bounds = zip(summary[f"{key}_mean"], summary[f"{key}_low"], summary[f"{key}_high"])
        cells = [_cell(mean, low, high) for mean, low, high in bounds]
        if key == "plasticity_loss":
            cells = [ONE_WINDOW if one else cell for cell, one in zip(cells, _one_window(summary))]
        columns[_header(key, metric)] = cells
    return pd.DataFrame(columns)


def _not_finished(states: pd.DataFrame | None) -> pd.DataFrame:
    """The rows of :func:`run_states` whose run did not finish (none when ``states`` is None)."""
    return states[states["state"] != "finished"] if states is not None and len(states) else pd.DataFrame()


def format_summary(summary: pd.DataFrame, states: pd.DataFrame | None = None) -> str:
    """Plain-text summary table for the terminal with a line saying what its intervals are, then one line
    per run of ``states`` (:func:`run_states`) that did not finish, with its reason."""
    text = (display_frame(summary).to_string(index=False) + f"\n(mean [low, high]: {INTERVAL})"
            if len(summary) else "(no finished runs yet)")
    found = verdict(summary) if len(summary) else ""
    if found:
        text += "\n\n" + textwrap.fill("Verdict: " + found, width=110)
    lines = [f"  {row.arm} seed {row.seed}: {row.reason}" for row in _not_finished(states).itertuples()]
    return "\n".join([text, "runs that did not finish:", *lines]) if lines else text


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
            "late_window": f"mean {metric} over the late window, the last 10% of the bins after the first task",
            "plasticity_loss": f"how much worse {metric} got from the early window (the first 10% of bins after "
                               "the first task) to the late window: "
                               f"{'early minus late' if 'accuracy' in metric else 'late minus early'} {metric}, "
                               f"so >0 means plasticity was lost; {ONE_WINDOW} where the two windows share bins",
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
    """Write ``runs.csv`` (or ``.parquet``), ``summary.csv``, ``per_task.csv``, the plots and ``report.md`` under ``out``.

    Returns ``{"summary": DataFrame, "states": DataFrame, "paths": [Path, ...]}`` (``states``: every started
    run's state and reason, :func:`run_states`). Only finished runs enter the summary numbers and the plots;
    unfinished ones' rows are in the combined table with ``finished=False``, and every run that did not
    finish is listed in ``report.md`` with its reason. An arm none of whose runs finished is a summary row
    with ``n`` = 0 and NaN numbers.
    """
    out = Path(out)
    record = load_record(out)
    runs = combined_table(out)
    summary = summarize_runs(out)
    states = run_states(out)
    paths = [write_table(runs, out / "runs", fmt)]
    summary_path = out / "summary.csv"
    summary.to_csv(summary_path, index=False)
    paths.append(summary_path)
    finished = runs[runs["finished"]] if len(runs) else runs
    metric = _performance_metric(summary)
    per_row = "test_accuracy" if metric == "selected_test_accuracy" else metric  # one per task: each epoch's
    per_task_path = out / "per_task.csv"
    per_task_table(runs, per_row).to_csv(per_task_path, index=False)
    paths.append(per_task_path)
    plots = []
    if len(finished):
        title = f"{record['benchmark']}: {per_row} per bin, mean and 95% bootstrap CI over seeds"
        plots.append(plot_performance(finished, record["arms"], per_row, out / "performance.png", title=title))
        plots.append(plot_metrics(finished, record["arms"], out / "metrics.png"))
        plots.extend(plot_grids(summary[summary["n"] > 0], record["arms"], out, metric))
        plots.append(plot_budget(summary, out / "budget.png", metric))
    plots = [p for p in plots if p is not None]
    paths += plots
    report = out / "report.md"
    report.write_text(_markdown(record, summary, states, plots, metric, wall_time_lines(out)))
    paths.append(report)
    return {"summary": summary, "states": states, "paths": paths}


def _interval(row: pd.Series, key: str) -> tuple[float, float, float]:
    return float(row[f"{key}_mean"]), float(row[f"{key}_low"]), float(row[f"{key}_high"])


def _change(row: pd.Series) -> str:
    """Whether the arm lost plasticity, by the 95% interval of its plasticity loss."""
    mean, low, high = _interval(row, "plasticity_loss")
    cell = _cell(mean, low, high)
    if math.isnan(low) or math.isnan(high):
        return "has no interval for its change from early to late (one run, or windows that coincide)"
    if low > 0:
        return f"lost plasticity (plasticity loss {cell}: the 95% CI is above 0)"
    if high < 0:
        return f"got better from the early to the late window (plasticity loss {cell}: the 95% CI is below 0)"
    return f"did not measurably lose plasticity (plasticity loss {cell}: the 95% CI includes 0)"


def _against(row: pd.Series, base: pd.Series, key: str, name: str) -> str:
    """``row``'s ``key`` beside the baseline's: above / below with disjoint 95% CIs, or not told apart."""
    mean, low, high = _interval(row, key)
    base_mean, base_low, base_high = _interval(base, key)
    if any(math.isnan(v) for v in (low, high, base_low, base_high)):
        return f"{name} {_number(mean)} against {_number(base_mean)}"
    relation = "above" if low > base_high else "below" if high < base_low else None
    pair = f"{_cell(mean, low, high)} against {_cell(base_mean, base_low, base_high)}"
    if relation is None:
        return f"{name} not told apart from {base['arm']}'s ({pair}: the 95% CIs overlap)"
    return f"{name} {relation} {base['arm']}'s ({pair}, disjoint 95% CIs)"


def verdict(summary: pd.DataFrame) -> str:
    """The comparison's finding in words, against the first dense ``bp`` arm with 2+ finished runs: whether
    each arm lost plasticity, and its late-window performance, dead fraction and effective rank beside
    backprop's, each by its 95% CI. Empty without such a baseline."""
    ready = summary[summary["n"] >= 2] if len(summary) else summary
    bases = ready[(ready["strategy"] == "bp") & (ready["density"] == 1.0)] if len(ready) else ready
    if not len(bases):
        return ""
    base, metric = bases.iloc[0], _performance_metric(summary)
    sentences = [f"{base['arm']} {_change(base)}."]
    for _, row in ready.iterrows():
        if row["arm"] == base["arm"]:
            continue
        parts = [_against(row, base, "late_window", f"its late-window {metric} is")]
        parts += [_against(row, base, f"final_{key}", f"its final {name} is")
                  for key, name in (("dead_fraction", "dead fraction"), ("effective_rank", "effective rank"))
                  if f"final_{key}_mean" in row and not math.isnan(float(row[f"final_{key}_mean"]))]
        sentences.append(f"{row['arm']} {_change(row)}; " + "; ".join(parts) + ".")
    return " ".join(sentences)


def _not_finished_lines(states: pd.DataFrame) -> list[str]:
    """The report's section on runs that did not finish, with their reasons and how to recover."""
    rest = _not_finished(states)
    if not len(rest):
        return []
    return [
        "## Runs that did not finish",
        "",
        markdown_table(rest[["arm", "seed", "state", "reason"]]),
        "",
        "Rerunning the comparison's command resumes or restarts killed and unfinished runs; failed runs "
        "(a `failure.json`: the loss became NaN or infinite, which a rerun would repeat) stay failed unless "
        "the command gets `--retry-failed`. Deleting a run's folder `runs/<arm>/seed-<k>/` makes a rerun "
        "start it afresh.",
        "",
    ]


def _one_window_lines(summary: pd.DataFrame) -> list[str]:
    """The sentence under the summary table naming the arms whose plasticity loss is :data:`ONE_WINDOW`."""
    arms = summary.loc[_one_window(summary), "arm"].tolist() if len(summary) else []
    if not arms:
        return []
    return [f"Plasticity loss is {ONE_WINDOW} for {', '.join(arms)}: their runs have so few bins after the first "
            "task that the early and late windows coincide (share bins), so there is no change from early to late "
            "to measure. Runs with more bins (more steps, or a smaller `--bench bin_size`) have one.", ""]


def _markdown(record: dict[str, Any], summary: pd.DataFrame, states: pd.DataFrame, plots: list[Path],
              metric: str, wall_times: list[str]) -> str:
    total = len(states)
    done = int((states["state"] == "finished").sum())
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
        "## Summary",
        "",
        f"Each cell: the mean over the arm's finished runs and its 95% confidence interval `[low, high]`: {INTERVAL} "
        "(the mean of resampled runs, so the interval stays within the values' range: a loss never below 0, a "
        "fraction within [0, 1]). An arm with one finished run shows its value alone.",
        "",
        markdown_table(display_frame(summary)) if len(summary) else "(no finished runs yet)",
        "",
        *_one_window_lines(summary),
        *([f"**Verdict.** {verdict(summary)}", ""] if len(summary) and verdict(summary) else []),
        "Which way is better:",
        "",
        *_directions(metric),
        "",
        "Per-arm numbers with all settings: `summary.csv`; per arm and task, the mean performance over the "
        "task and its interval: `per_task.csv`; every metrics row of every run: `runs.csv` (or "
        "`runs.parquet`); each run's own files: `runs/<arm>/seed-<k>/`.",
        "",
        *_not_finished_lines(states),
        *wall_times,
    ]
    if plots:
        lines += ["## Plots", ""]
        for plot in plots:
            lines += [f"![{plot.stem}]({plot.name})", ""]
    return "\n".join(lines)
