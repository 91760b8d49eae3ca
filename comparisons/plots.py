"""PNG plots of a comparison: performance over time, plasticity metrics over time, grid sweeps, and
performance against weights and cost.

Every arm keeps one colour and one marker in every figure; dense arms draw solid lines and sparse arms
dashed ones, so the two families read apart at a glance. Bands and error bars are 95% percentile
bootstrap confidence intervals over seeds of the mean (:data:`comparisons.tables.INTERVAL`, one per bin),
so they stay inside the quantity's range: a loss band never dips below 0, a fraction's never leaves
[0, 1]. Legends sit outside the axes so they never cover data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed (and none on a compute node)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from dst import strategies  # noqa: E402

from .tables import bootstrap_intervals  # noqa: E402

__all__ = ["plot_performance", "plot_metrics", "plot_grids", "plot_budget", "PROBE_METRICS", "performance_label"]

DPI = 120
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p")

#: Overall probe columns (per-layer ones end in _0, _1, ...), with axis labels.
PROBE_METRICS: dict[str, str] = {
    "effective_rank": "effective rank of hidden features",
    "srank": "srank (99% of sum sigma)",
    "approximate_rank": "approx. rank (99% of sum sigma^2)",
    "stable_rank": "stable rank ||A||_F^2 / ||A||_2^2",
    "dead_fraction": "dead units (fraction of hidden units)",
    "dormant_fraction": "dormant units (fraction, tau = 0.1)",
    "saturated_fraction": "saturated units (fraction)",
    "weight_magnitude": "mean |weight|",
    "gradient_norm": "probe-loss gradient norm (L2)",
}

plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10})


def performance_label(metric: str) -> str:
    """Axis label of the performance measure, with its unit and direction."""
    return {
        "loss": "online loss per bin (MSE for regression; lower is better)",
        "accuracy": "online accuracy per bin (fraction correct; higher is better)",
        "test_accuracy": "held-out test accuracy per evaluation (fraction correct; higher is better)",
        "selected_test_accuracy": "test accuracy at each task's best validation epoch (higher is better)",
    }.get(metric, metric)


def styles(arms: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Colour, marker and line style per arm label (dense solid, sparse dashed)."""
    cmap = plt.get_cmap("tab10" if len(arms) <= 10 else "tab20")
    result = {}
    for i, arm in enumerate(arms):
        dense = float(arm.get("resolved_bench", {}).get("density", 1.0)) >= 1.0
        result[arm["label"]] = {"color": cmap(i % cmap.N), "marker": MARKERS[i % len(MARKERS)],
                                "linestyle": "-" if dense else "--"}
    return result


def _band(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """``step``, ``mean``, ``low`` and ``high`` of ``column`` across seeds at every step: the mean and its
    bootstrap interval (NaN bounds where only one seed has the step)."""
    per_seed = frame.pivot_table(index="step", columns="seed", values=column, aggfunc="mean")
    mean, low, high, _ = bootstrap_intervals(per_seed.to_numpy())
    return pd.DataFrame({"step": per_seed.index, "mean": mean, "low": low, "high": high})


def _draw(ax: plt.Axes, frame: pd.DataFrame, column: str, arms: Sequence[dict[str, Any]],
          style: dict[str, dict[str, Any]]) -> None:
    for arm in arms:
        data = frame[frame["arm"] == arm["label"]].dropna(subset=[column])
        if not len(data):
            continue
        band = _band(data, column)
        s = style[arm["label"]]
        ax.plot(band["step"], band["mean"], label=arm["label"], color=s["color"], linestyle=s["linestyle"],
                marker=s["marker"], markevery=max(1, len(band) // 8), markersize=5, linewidth=1.6)
        if band["low"].notna().any():
            ax.fill_between(band["step"], band["low"], band["high"], color=s["color"], alpha=0.12, linewidth=0)
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("training step")


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_performance(runs: pd.DataFrame, arms: Sequence[dict[str, Any]], metric: str, path: str | os.PathLike,
                     title: str = "") -> Path | None:
    """``performance.png``: ``metric`` per bin (or task), one line per arm, 95% bootstrap CI band over seeds."""
    if metric not in runs or runs[metric].isna().all():
        return None
    style = styles(arms)
    fig, ax = plt.subplots(figsize=(9, 5))
    _draw(ax, runs, metric, arms, style)
    ax.set_ylabel(performance_label(metric))
    seeds = runs.groupby("arm")["seed"].nunique()
    ax.set_title(title or f"{performance_label(metric).split(' (')[0]}: mean and 95% bootstrap CI over "
                 f"{seeds.min()}{'' if seeds.min() == seeds.max() else f'-{seeds.max()}'} seeds")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="arm (density)", frameon=False)
    return _save(fig, Path(path))


def plot_metrics(runs: pd.DataFrame, arms: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """``metrics.png``: one panel per probe metric present (probe rows only), one line per arm."""
    present = [m for m in PROBE_METRICS if m in runs and runs[m].notna().any()]
    if not present:
        return None
    style = styles(arms)
    columns = min(3, len(present))
    rows = math.ceil(len(present) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, present):
        _draw(ax, runs, metric, arms, style)
        ax.set_title(metric)
        ax.set_ylabel(PROBE_METRICS[metric])
    for ax in list(axes.flat)[len(present):]:
        ax.set_visible(False)
    legend: dict[str, Any] = {}  # every arm drawn in any panel (an arm without hidden layers has only some)
    for ax in list(axes.flat)[: len(present)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(labels)),
               title="arm (density)", frameon=False)
    fig.suptitle("Plasticity metrics on the probe batch (mean and 95% bootstrap CI over seeds)")
    fig.tight_layout()
    return _save(fig, Path(path))


def _is_log(strategy: str, field: str, values: Sequence[Any]) -> bool:
    meta = {f["name"]: f for f in strategies.get(strategy).config.describe()}.get(field, {})
    numeric = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numeric) != len(values) or min(numeric, default=0) <= 0:
        return False
    return bool(meta.get("log")) or max(numeric) / min(numeric) >= 100


def _dodge(x: float, index: int, count: int, log_x: bool, values: Sequence[Any]) -> float:
    """Shift group ``index`` of ``count`` a little sideways so that error bars at one x do not hide each other."""
    if count < 2:
        return x
    shift = (index - (count - 1) / 2) * 0.03
    if log_x:
        return x * 10 ** (shift * max(1.0, math.log10(max(values) / min(values))))
    numeric = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    span = (max(numeric) - min(numeric)) if len(numeric) == len(values) and len(numeric) > 1 else len(values)
    return x + shift * (span or 1)


def _error_bars(rows: pd.DataFrame) -> np.ndarray:
    """(2, arms) distances below and above each arm's late-window mean to its interval's bounds, for
    ``errorbar(yerr=...)`` (asymmetric, as a bootstrap interval is); 0 where undefined (one run)."""
    mean = rows["late_window_mean"].to_numpy(dtype=float)
    return np.nan_to_num([mean - rows["late_window_low"].to_numpy(dtype=float),
                          rows["late_window_high"].to_numpy(dtype=float) - mean])


def plot_grids(summary: pd.DataFrame, arms: Sequence[dict[str, Any]], out_dir: str | os.PathLike,
               metric: str) -> list[Path]:
    """``grid_<strategy>_<field>.png``: late-window performance against each grid field's values, with
    95% bootstrap CI error bars (``late_window_low`` to ``late_window_high`` of the summary); one line per
    combination of the other grid fields of that strategy."""
    paths = []
    means = summary.set_index("arm")
    gridded = [a for a in arms if a.get("grid") and a["label"] in means.index]
    for strategy in dict.fromkeys(a["strategy"] for a in gridded):
        mine = [a for a in gridded if a["strategy"] == strategy]
        fields = list(dict.fromkeys(k for a in mine for k in a["grid"]))
        for field in fields:
            values = list(dict.fromkeys(a["grid"][field] for a in mine if field in a["grid"]))
            log_x = _is_log(strategy, field, values)
            position = {v: (v if log_x or isinstance(v, (int, float)) and not isinstance(v, bool) else i)
                        for i, v in enumerate(values)}
            groups: dict[str, list[dict[str, Any]]] = {}
            for arm in mine:
                rest = ", ".join(f"{k}={v}" for k, v in arm["grid"].items() if k != field) or strategy
                groups.setdefault(rest, []).append(arm)
            fig, ax = plt.subplots(figsize=(7.5, 4.8))
            for i, (name, members) in enumerate(groups.items()):
                members = sorted(members, key=lambda a: position[a["grid"][field]])
                x = [_dodge(position[a["grid"][field]], i, len(groups), log_x, values) for a in members]
                y = [means.loc[a["label"], "late_window_mean"] for a in members]
                err = _error_bars(means.loc[[a["label"] for a in members]])
                categorical = any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in values)
                ax.errorbar(x, y, yerr=err, label=name, marker=MARKERS[i % len(MARKERS)], capsize=4, markersize=7,
                            linestyle="none" if categorical else ("-", "--", "-.", ":")[i % 4], linewidth=1.6)
            for arm in (a for a in arms if not a.get("grid") and a["label"] in means.index):
                style = styles(arms)[arm["label"]]
                ax.axhline(means.loc[arm["label"], "late_window_mean"], color=style["color"], linestyle=":",
                           linewidth=1.4, label=f"{arm['label']} (no grid)")
            if log_x:
                ax.set_xscale("log")
            if any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in values):
                ax.set_xticks(range(len(values)), [str(v) for v in values])
                ax.margins(x=0.15)
            ax.set_xlabel(f"{field} ({strategy}{', log scale' if log_x else ''})")
            ax.set_ylabel(f"late-window {metric} (last 10% of bins)")
            ax.set_title(f"{strategy}: {field} sweep (mean and 95% bootstrap CI over seeds)")
            ax.grid(True, alpha=0.3)
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                      title="other grid values / reference arms")
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{strategy}_{field}")
            paths.append(_save(fig, Path(out_dir) / f"grid_{safe}.png"))
    return paths


def _layout(row: pd.Series) -> str:
    if float(row.get("density", 1.0)) >= 1.0:
        return "dense"
    return str(row.get("bench.distribution", "sparse"))


def plot_budget(summary: pd.DataFrame, path: str | os.PathLike, metric: str) -> Path | None:
    """``budget.png``: each arm's late-window performance (mean and 95% bootstrap CI over seeds) against its
    active weights per learner and against its seconds per step, coloured by strategy, shaped by layout
    (dense, constant fan-in, ERK, ...). Only when the arms differ in weights."""
    rows = summary[summary["n"] > 0]
    if "weights" not in rows or rows["weights"].nunique() < 2:
        return None
    kinds = list(dict.fromkeys(rows["strategy"]))
    layouts = list(dict.fromkeys(_layout(row) for _, row in rows.iterrows()))
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for _, row in rows.iterrows():
        colour, marker = cmap(kinds.index(row["strategy"]) % 10), MARKERS[layouts.index(_layout(row)) % len(MARKERS)]
        err = _error_bars(row.to_frame().T)
        for ax, x in zip(axes, (row["weights"], row["seconds_per_step_mean"] * 1e3)):
            ax.errorbar([x], [row["late_window_mean"]], yerr=err, color=colour, marker=marker, capsize=3,
                        markersize=7, linestyle="none", alpha=0.85)
    axes[0].set_xlabel("active weights per learner (log scale)")
    axes[1].set_xlabel("milliseconds per training step of the arm's population (log scale)")
    axes[0].set_ylabel(f"late-window {metric} (last 10% of bins)")
    for ax, values in zip(axes, (rows["weights"], rows["seconds_per_step_mean"] * 1e3)):
        if values.max() > 3 * values.min():  # log scale, plain numbers at 1, 2 and 5 of each decade
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:  # a narrow range (one budget's weights): a few linear ticks
            ax.xaxis.set_major_locator(MaxNLocator(4))
            ax.set_xlabel(ax.get_xlabel().replace(" (log scale)", ""))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.10g}"))
        ax.grid(True, alpha=0.3)
    handles = [plt.Line2D([], [], color=cmap(i % 10), marker="o", linestyle="none", label=kind) for i, kind in enumerate(kinds)]
    handles += [plt.Line2D([], [], color="grey", marker=MARKERS[i % len(MARKERS)], linestyle="none", label=layout)
                for i, layout in enumerate(layouts)]
    axes[1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                   title="strategy / layout")
    fig.suptitle(f"late-window {metric} against weights and cost (mean and 95% bootstrap CI over seeds)")
    return _save(fig, Path(path))
