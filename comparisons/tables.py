"""Tables from a comparison's output folder: every row of every run, and per-arm means with 95% CIs.

The per-run numbers are each run's ``summary.json`` (written by :func:`dst.summary.summarize`), so the
comparison reports exactly what ``python -m dst run`` would for the same run. Confidence intervals are
percentile bootstraps over seeds of the mean (:data:`INTERVAL`): a mean of resampled values lies between
the smallest and the largest of them, so the interval of an MSE never goes below 0 and that of a fraction
never leaves [0, 1], which a Student-t interval (mean +- t s / sqrt(n)) does with few, skewed seeds. The
resampling RNG is seeded, so a report is the same every time it is written; with one run the interval is
NaN. A run that did not finish (diverged, killed, or still running) is listed with its reason by
:func:`run_states` and counted per arm, never a reason for a table to fail.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dst.errors import ConfigError
from dst.rundir import METRICS
from dst.summary import summarize

from .execute import COMPARISON_FILE, CONFIG, SUMMARY, read_failure
from .spec import dir_name

__all__ = [
    "SUMMARY_METRICS",
    "load_record",
    "combined_table",
    "run_summaries",
    "run_states",
    "summarize_runs",
    "arm_weights",
    "INTERVAL",
    "bootstrap_interval",
    "bootstrap_intervals",
    "better_direction",
    "write_table",
]

#: summary.json keys reported per arm, with the words the printed table uses.
SUMMARY_METRICS: dict[str, str] = {
    "late_window": "late-window performance",
    "plasticity_loss": "plasticity loss",  # positive when plasticity was lost (dst.summary)
    "final_effective_rank": "effective rank",
    "final_dead_fraction": "dead fraction",
    "final_weight_magnitude": "weight magnitude",
    "seconds_per_step": "seconds/step",
}

LEVEL = 0.95
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
#: The interval of every table, report and plot band, in the words the report and the docs use.
INTERVAL = f"{LEVEL:.0%} percentile bootstrap over seeds, {RESAMPLES:,} resamples, seed {BOOTSTRAP_SEED}"
_CHUNK = 512  # rows (plot bins) bootstrapped at once: 512 x 10,000 resampled means, 40 MB


def load_record(out: str | os.PathLike) -> dict[str, Any]:
    """``OUT/comparison.json``; an error saying what to do when ``out`` holds no comparison."""
    path = Path(out) / COMPARISON_FILE
    if not path.exists():
        raise ConfigError(f"{str(out)!r} holds no comparison ({COMPARISON_FILE} is missing); "
                          "run `python -m comparisons ... --out DIR` first")
    return json.loads(path.read_text())


def _run_dirs(out: str | os.PathLike, record: dict[str, Any]) -> list[tuple[dict[str, Any], int, Path]]:
    """(arm record, seed, run dir) of every run folder, started or finished, in arm then seed order."""
    found = []
    for arm in record["arms"]:
        folder = Path(out) / "runs" / dir_name(arm["label"])
        seeds = sorted(int(p.name.split("-", 1)[1]) for p in folder.glob("seed-*") if p.name[5:].isdigit())
        found += [(arm, seed, folder / f"seed-{seed}") for seed in seeds]
    return found


def _rows(run: Path) -> pd.DataFrame:
    """The run's metrics rows; none when ``metrics.csv`` is missing or empty (0 bytes: a run that stopped
    before its first bin, as older dst versions left it)."""
    try:
        return pd.read_csv(run / METRICS)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame()


def _run_state(run: Path) -> tuple[str, str]:
    """``(state, reason)`` of the run in ``run``: ``finished``; ``failed`` (dst's ``failure.json``, e.g. a
    NaN loss: ``"failed: <error>"``); ``no rows`` (dst writes the first row at the end of the first bin);
    or ``unfinished`` (rows but no summary)."""
    if (run / SUMMARY).exists():
        return "finished", "finished"
    failure = read_failure(run)
    if failure is not None:
        return "failed", f"failed: {failure}"
    if _rows(run).empty:
        return "no rows", "no rows yet (killed or still running before its first bin)"
    return "unfinished", ("unfinished: rows but no summary.json (killed or still running; rerunning the "
                          "comparison resumes or restarts it)")


def _cell(value: Any) -> Any:
    """A setting as a table cell: sequences become ``"100,100"`` so CSV and parquet columns stay scalar."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return value


def combined_table(out: str | os.PathLike) -> pd.DataFrame:
    """Every metrics row of every run with its arm, strategy, seed, whether it finished, and every
    strategy setting (``settings.<name>``) and benchmark setting (``bench.<name>``) from its config.json."""
    record = load_record(out)
    frames = []
    for arm, seed, path in _run_dirs(out, record):
        rows = _rows(path)
        if rows.empty:
            continue
        try:
            config = json.loads((path / CONFIG).read_text())
        except (OSError, ValueError):  # missing, or cut short by a kill while dst wrote it
            config = {}
        front = {"arm": arm["label"], "strategy": arm["strategy"], "seed": seed,
                 "finished": (path / SUMMARY).exists(), "benchmark": config.get("benchmark", record["benchmark"])}
        settings = {f"settings.{k}": _cell(v) for k, v in config.get("settings", {}).items()}
        bench = {f"bench.{k}": _cell(v) for k, v in config.get("bench", {}).items()}
        frames.append(pd.concat([pd.DataFrame([front] * len(rows)), rows,
                                 pd.DataFrame([{**settings, **bench}] * len(rows))], axis=1))
    if not frames:
        return pd.DataFrame(columns=["arm", "strategy", "seed", "finished", "benchmark"])
    return pd.concat(frames, ignore_index=True)


def _summary(run: Path) -> dict[str, Any]:
    """The run's summary.json; one written before summaries skipped the first task and oriented plasticity
    loss (> 0: lost) has no ``windows_overlap``, and is taken afresh from its metrics with today's rules."""
    summary = json.loads((run / SUMMARY).read_text())
    if "windows_overlap" not in summary:
        summary.update(summarize(_rows(run)))
    return summary


def run_summaries(out: str | os.PathLike) -> pd.DataFrame:
    """One row per finished run: arm, strategy, seed and its summary.json values."""
    record = load_record(out)
    rows = []
    for arm, seed, path in _run_dirs(out, record):
        if (path / SUMMARY).exists():
            rows.append({"arm": arm["label"], "strategy": arm["strategy"], "seed": seed, **_summary(path)})
    return pd.DataFrame(rows)


def run_states(out: str | os.PathLike) -> pd.DataFrame:
    """One row per started run (a run folder): arm, strategy, seed, ``state`` (``finished``, ``failed``,
    ``no rows`` or ``unfinished``) and ``reason``, the words the report shows (``"failed: <error>"``)."""
    record = load_record(out)
    rows = []
    for arm, seed, path in _run_dirs(out, record):
        state, reason = _run_state(path)
        rows.append({"arm": arm["label"], "strategy": arm["strategy"], "seed": seed, "state": state, "reason": reason})
    return pd.DataFrame(rows, columns=["arm", "strategy", "seed", "state", "reason"])


@lru_cache(maxsize=32)
def _resample_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) weights: how often each of n values is drawn in a resample of n with replacement,
    divided by n, so that ``values @ weights.T`` are the resamples' means. Cached and read-only: every
    call with the same arguments reuses the same resamples (reproducible, and no redrawing per plot bin)."""
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples)
    weights = counts / n
    weights.flags.writeable = False
    return weights


def _percentile_bounds(block: np.ndarray, weights: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Low and high percentile bounds of the resampled means of each row of ``block`` (rows x n, all
    finite), clipped to the row's smallest and largest value, where a mean of resampled values lies anyway:
    float rounding then cannot push a bound out of the quantity's range (a fraction of 1.0 stays 1.0)."""
    tail = (1.0 - level) / 2
    low, high = np.quantile(block @ weights.T, [tail, 1.0 - tail], axis=1)
    smallest, largest = block.min(axis=1), block.max(axis=1)
    return np.clip(low, smallest, largest), np.clip(high, smallest, largest)


def bootstrap_intervals(values: np.ndarray | Sequence[Sequence[float]], resamples: int = RESAMPLES,
                        seed: int = BOOTSTRAP_SEED, level: float = LEVEL
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``values`` (rows x seeds, NaN where a seed has no value): the mean of the row's finite
    values, the low and high bound of their ``level`` percentile bootstrap interval of the mean, and
    their count n. The bounds are NaN for n < 2, all four for n = 0.

    Vectorised for the plots' per-bin bands: rows with the same n share one set of resamples, so a block
    of them costs one matrix product (blocks of :data:`_CHUNK` rows keep memory bounded on long runs).
    """
    values = np.atleast_2d(np.asarray(values, dtype=float))
    finite = np.isfinite(values)
    counts = finite.sum(axis=1)
    compact = np.sort(np.where(finite, values, np.nan), axis=1)  # each row's finite values first
    means, low, high = (np.full(len(values), math.nan) for _ in range(3))
    for n in np.unique(counts[counts > 0]):
        rows = np.flatnonzero(counts == n)
        block = compact[rows, :n]
        means[rows] = np.clip(block.mean(axis=1), block.min(axis=1), block.max(axis=1))  # float rounding
        if n < 2:
            continue
        weights = _resample_weights(int(n), resamples, seed)
        for part in np.array_split(rows, math.ceil(len(rows) / _CHUNK)):
            low[part], high[part] = _percentile_bounds(compact[part, :n], weights, level)
    return means, low, high, counts


def bootstrap_interval(values: Sequence[float] | pd.Series) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of the finite ``values``: their mean and its :data:`INTERVAL` (low and high
    NaN for n < 2)."""
    means, low, high, counts = bootstrap_intervals([np.asarray(values, dtype=float)])
    return float(means[0]), float(low[0]), float(high[0]), int(counts[0])


def per_task_table(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per arm and task (in the order met): ``n`` finished runs and the mean over them of each run's mean
    ``metric`` over the task's rows, with its :data:`INTERVAL` (``mean``, ``low``, ``high``): the performance
    in each task, e.g. the return in each friction period of Slippery Ant."""
    columns = ["arm", "task", "n", "mean", "low", "high"]
    if not len(runs) or metric not in runs or "task" not in runs:
        return pd.DataFrame(columns=columns)
    finished = runs[runs["finished"] & runs[metric].notna()]
    per_run = finished.groupby(["arm", "task", "seed"], sort=False)[metric].mean()
    rows = []
    for (arm, task), values in per_run.groupby(level=["arm", "task"], sort=False):
        mean, low, high, n = bootstrap_interval(values)
        rows.append({"arm": arm, "task": task, "n": n, "mean": mean, "low": low, "high": high})
    return pd.DataFrame(rows, columns=columns)


def better_direction(metric: str, performance_metric: str) -> str:
    """``higher`` or ``lower``: which way ``metric`` is better (for accuracy-like or loss-like performance)."""
    if metric == "late_window":
        return "higher" if "accuracy" in performance_metric else "lower"
    if metric in ("plasticity_loss", "final_dead_fraction", "seconds_per_step"):  # plasticity loss > 0: lost
        return "lower"
    if metric == "final_effective_rank":
        return "higher"
    return "neither"  # weight magnitude: large is a warning sign, but not a score


def summarize_runs(out: str | os.PathLike) -> pd.DataFrame:
    """Per arm with a started run, in recorded order: ``n`` finished runs, ``failed`` and ``unfinished``
    runs (their reasons: :func:`run_states`), ``<metric>_mean``, ``<metric>_low`` and ``<metric>_high``
    (the mean over the finished runs and its :data:`INTERVAL`) of each :data:`SUMMARY_METRICS` entry (NaN
    when none finished), ``windows_overlap`` (some run's early and late windows share rows, so its
    plasticity loss is undefined), which metric is the performance measure, and the arm's settings."""
    record = load_record(out)
    runs = run_summaries(out)
    states = run_states(out)
    rows = []
    for arm in record["arms"]:
        mine = runs[runs["arm"] == arm["label"]] if len(runs) else runs
        started = states[states["arm"] == arm["label"]]["state"]
        if not len(started):
            continue
        metrics = mine["performance_metric"].unique() if len(mine) else []
        row: dict[str, Any] = {"arm": arm["label"], "strategy": arm["strategy"],
                               "density": arm["resolved_bench"].get("density", 1.0), "n": len(mine),
                               "failed": int((started == "failed").sum()),
                               "unfinished": int(started.isin(["no rows", "unfinished"]).sum()),
                               "performance_metric": ", ".join(metrics)}
        for metric in SUMMARY_METRICS:
            mean, low, high, _ = bootstrap_interval(mine[metric]) if metric in mine else (math.nan,) * 3 + (0,)
            row[f"{metric}_mean"], row[f"{metric}_low"], row[f"{metric}_high"] = mean, low, high
        row["weights"] = arm_weights(record["benchmark"], json.dumps(arm["resolved_bench"], sort_keys=True))
        row["windows_overlap"] = bool(mine["windows_overlap"].eq(True).any()) if "windows_overlap" in mine else False
        row["late_window_better"] = better_direction("late_window", str(metrics[0])) if len(metrics) else ""
        row.update({f"settings.{k}": _cell(v) for k, v in arm["resolved_settings"].items()})
        row.update({f"bench.{k}": _cell(v) for k, v in arm["resolved_bench"].items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    order = sorted(frame.columns, key=lambda c: 1 if c.startswith("settings.") else 2 if c.startswith("bench.") else 0)
    return frame[order]  # measures first, then strategy settings, then benchmark settings (stable sort)


@lru_cache(maxsize=None)
def arm_weights(benchmark: str, bench: str) -> int:
    """Active connection weights of one member (biases not counted) of ``benchmark`` with the resolved
    settings ``bench`` (JSON): its learner built and sparsified as a run builds it, without its stream."""
    import torch

    from dst import benchmarks
    from dst.masked import sparsify
    from dst.population import member_view

    settings = {key: value for key, value in json.loads(bench).items() if key in benchmarks.get(benchmark).config.field_names()}
    built = benchmarks.build(benchmark, **settings)
    c = built.config
    model = sparsify(built.make_model([torch.Generator().manual_seed(0)]), c.density, c.distribution,
                     dense_first=c.dense_first, dense_last=c.dense_last, seed=[0])
    total = 0
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is not None and weight.dim() >= 2:
            mask = getattr(module, "mask", None)
            total += int(member_view(module, mask)[0].sum()) if mask is not None else member_view(module, weight)[0].numel()
    return total


def write_table(frame: pd.DataFrame, path_stem: str | os.PathLike, fmt: str = "csv") -> Path:
    """Write ``frame`` as ``<stem>.csv`` or ``<stem>.parquet`` (which needs pyarrow)."""
    if fmt == "csv":
        path = Path(f"{path_stem}.csv")
        frame.to_csv(path, index=False)
        return path
    if fmt == "parquet":
        check_format(fmt)
        path = Path(f"{path_stem}.parquet")
        frame.to_parquet(path, index=False)
        return path
    raise ConfigError(f"unknown table format {fmt!r}; use csv or parquet")


def check_format(fmt: str) -> None:
    """Fail early (before any run) when the table format cannot be written here."""
    if fmt not in ("csv", "parquet"):
        raise ConfigError(f"unknown table format {fmt!r}; use csv or parquet")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError("--format parquet needs pyarrow, which is not installed: pip install pyarrow") from None
