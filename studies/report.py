"""A study's report: best settings, every trial, parameter importances and plots, in one directory.

Writes ``best.json`` (best trial, or the Pareto-optimal trials of a multi-objective study, with the full
strategy and benchmark settings to rerun them), ``trials.csv`` (``study.trials_dataframe()``),
``importances.csv`` (PED-ANOVA importances, which need no extra packages), ``history.png``,
``params.png`` (objective against each tuned parameter), ``pareto.png`` (multi-objective) and
``report.md`` embedding them. The plots are drawn with matplotlib's object API (no pyplot state).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter
from optuna.trial import FrozenTrial, TrialState

from .trial import StudySettings

__all__ = ["write_report", "importances"]

log = logging.getLogger(__name__)


def _trial_record(trial: FrozenTrial, settings: StudySettings) -> dict[str, Any]:
    space = settings.search_space()
    strategy, bench = dict(space.settings), dict(space.bench)
    for name, value in trial.params.items():
        if name.startswith("bench."):
            bench[name[len("bench."):]] = value
        else:
            strategy[name] = value
    return {
        "number": trial.number,
        "values": dict(zip(settings.objectives, trial.values or [])),
        "params": trial.params,
        "settings": strategy,
        "bench": bench,
        "summary": trial.user_attrs.get("summary"),
        "seed_spread": _spread(trial),
        "run_dir": trial.user_attrs.get("run_dir"),
    }


def _spread(trial: FrozenTrial) -> dict[str, dict[str, float]]:
    """Per objective, the trial's seeds' values: their standard deviation, lowest and highest."""
    spread = {}
    for name, values in (trial.user_attrs.get("seed_values") or {}).items():
        finite = np.array([v for v in values if v is not None], dtype=float)
        if len(finite):
            spread[name] = {"seeds": len(finite), "std": float(finite.std(ddof=1)) if len(finite) > 1 else 0.0,
                            "min": float(finite.min()), "max": float(finite.max())}
    return spread


def _spread_text(record: dict[str, Any]) -> str:
    parts = [f"{name} over {s['seeds']} seeds: std {s['std']:.4g}, range [{s['min']:.4g}, {s['max']:.4g}]"
             for name, s in record.get("seed_spread", {}).items() if s["seeds"] > 1]
    return f" ({'; '.join(parts)})" if parts else ""


def _sign(direction: str) -> float:
    return 1.0 if direction == "minimize" else -1.0


def importances(study: optuna.Study, settings: StudySettings) -> tuple[list[dict[str, Any]], str]:
    """PED-ANOVA importances per objective, or none and the reason."""
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if len(complete) < 2:
        return [], f"importances need at least 2 completed trials; the study has {len(complete)}"
    evaluator_cls = getattr(optuna.importance, "PedAnovaImportanceEvaluator", None)
    rows = []
    for index, (name, direction) in enumerate(zip(settings.objectives, settings.directions)):
        sign = _sign(direction)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = optuna.importance.get_param_importances(
                    study,
                    evaluator=evaluator_cls() if evaluator_cls else None,
                    target=(lambda t, i=index, s=sign: s * t.values[i]) if settings.multi_objective else None,
                )
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            return [], f"importances could not be computed: {err}"
        rows += [{"objective": name, "param": p, "importance": v} for p, v in result.items()]
    return rows, ""


def _axes_grid(rows: int, cols: int, size: tuple[float, float]) -> tuple[Figure, Any]:
    figure = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    return figure, figure.subplots(rows, cols, squeeze=False)


def _history(study: optuna.Study, settings: StudySettings, path: Path) -> None:
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED and t.intermediate_values]
    figure, axes = _axes_grid(len(settings.objectives), 1, (7, 3.2))
    for i, (name, direction) in enumerate(zip(settings.objectives, settings.directions)):
        ax = axes[i][0]
        numbers = [t.number for t in complete]
        values = [t.values[i] for t in complete]
        ax.scatter(numbers, values, s=18, label="complete")
        if not settings.multi_objective and pruned:
            last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
            ax.scatter([t.number for t in pruned], last, s=14, marker="x", c="grey", label="pruned (last report)")
        if values:
            best, running = [], math.inf
            for value in values:
                running = min(running, _sign(direction) * value)
                best.append(_sign(direction) * running)
            ax.step(numbers, best, where="post", c="C3", label="best so far")
        ax.set(xlabel="trial", ylabel=f"{name} ({direction})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
    figure.suptitle(f"{study.study_name}: optimisation history")
    figure.savefig(path, dpi=100)


def _params(study: optuna.Study, settings: StudySettings, path: Path) -> None:
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    params = settings.search_space().params
    figure, axes = _axes_grid(len(settings.objectives), len(params), (3.4, 3.0))
    for i, name in enumerate(settings.objectives):
        for j, param in enumerate(params):
            ax = axes[i][j]
            trials = [t for t in complete if param.name in t.params]
            xs: list[Any] = [t.params[param.name] for t in trials]
            if param.kind == "categorical":
                labels = [str(c) for c in param.choices or ()]
                xs = [labels.index(str(x)) for x in xs]
                ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize="small")
            else:
                if param.log:
                    ax.set_xscale("log")
                    ax.xaxis.set_minor_formatter(NullFormatter())
                ax.set_xlim(param.low, param.high)  # the whole search range: shows what was explored
            points = ax.scatter(xs, [t.values[i] for t in trials], c=[t.number for t in trials], s=18, cmap="viridis")
            ax.set(xlabel=param.name, ylabel=name if j == 0 else None)
    if complete:
        figure.colorbar(points, ax=axes, label="trial", shrink=0.8)
    figure.suptitle(f"{study.study_name}: objective against each parameter")
    figure.savefig(path, dpi=100)


def _pareto(study: optuna.Study, settings: StudySettings, path: Path) -> None:
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    front = {t.number for t in study.best_trials} if complete else set()
    figure, axes = _axes_grid(1, 1, (6, 4.5))
    ax = axes[0][0]
    others = [t for t in complete if t.number not in front]
    best = sorted((t for t in complete if t.number in front), key=lambda t: t.values[0])
    ax.scatter([t.values[0] for t in others], [t.values[1] for t in others], s=18, c="grey", label="trials")
    ax.plot([t.values[0] for t in best], [t.values[1] for t in best], "o-", c="C3", label="Pareto front")
    for t in best:
        ax.annotate(str(t.number), (t.values[0], t.values[1]), fontsize="small")
    labels = [f"{n} ({d})" for n, d in zip(settings.objectives, settings.directions)]
    ax.set(xlabel=labels[0], ylabel=labels[1], title=f"{study.study_name}: Pareto front (first two objectives)")
    ax.legend(fontsize="small")
    figure.savefig(path, dpi=100)


def write_report(study: optuna.Study, out: str | Path) -> list[Path]:
    """Write the report files of ``study`` into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = StudySettings.from_attrs(study.user_attrs)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    states = {state.name: sum(t.state == state for t in study.trials) for state in TrialState}
    paths = []

    frame = study.trials_dataframe()
    frame.to_csv(out / "trials.csv", index=False)
    paths.append(out / "trials.csv")

    best: dict[str, Any] = {"study": study.study_name, "objectives": list(settings.objectives),
                            "directions": list(settings.directions), "trials": states}
    if not complete:
        best["message"] = "no completed trial yet"
    elif settings.multi_objective:
        best["pareto_front"] = [_trial_record(t, settings) for t in study.best_trials]
    else:
        best["best"] = _trial_record(study.best_trial, settings)
    if "pruning" in study.user_attrs:
        best["pruning"] = study.user_attrs["pruning"]
    (out / "best.json").write_text(json.dumps(best, indent=2, default=str) + "\n")
    paths.append(out / "best.json")

    rows, message = importances(study, settings)
    lines = ["objective,param,importance"] + [f"{r['objective']},{r['param']},{r['importance']:.6g}" for r in rows]
    (out / "importances.csv").write_text("\n".join(lines) + "\n")
    paths.append(out / "importances.csv")
    if message:
        log.warning("%s", message)

    plots = [("history.png", _history), ("params.png", _params)]
    if settings.multi_objective:
        plots.append(("pareto.png", _pareto))
    for filename, draw in plots:
        draw(study, settings, out / filename)
        paths.append(out / filename)

    (out / "report.md").write_text(_markdown(study, settings, best, rows, message, [p.name for p in paths]))
    paths.append(out / "report.md")
    return paths


def _markdown(study, settings: StudySettings, best, rows, message: str, files: list[str]) -> str:
    lines = [f"# Study `{study.study_name}`", "",
             f"Strategy `{settings.strategy}` on `{settings.benchmark}`, {settings.steps} steps, "
             f"seeds {settings.seed}..{settings.seed + settings.seeds - 1}; objectives: "
             + ", ".join(f"{n} ({d})" for n, d in zip(settings.objectives, settings.directions))
             + f"; pruner: {study.user_attrs.get('pruning', settings.pruner)}.", "",
             "Trials: " + ", ".join(f"{k.lower()} {v}" for k, v in best["trials"].items() if v), ""]
    lines += ["Tuned: " + "; ".join(p.describe() for p in settings.search_space().params), ""]
    for record in best.get("pareto_front", [best["best"]] if "best" in best else []):
        lines.append(f"- trial {record['number']}: {record['values']} with {record['params']}{_spread_text(record)}")
    lines += ["", "## Parameter importances (PED-ANOVA)", ""]
    if rows:
        lines += ["| objective | parameter | importance |", "| --- | --- | --- |"]
        lines += [f"| {r['objective']} | {r['param']} | {r['importance']:.3f} |" for r in rows]
    else:
        lines.append(message)
    lines.append("")
    lines += [f"![{name[:-4]}]({name})" for name in files if name.endswith(".png")]
    return "\n".join(lines) + "\n"
