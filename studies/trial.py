"""One trial: sample settings, run them through dst's experiment loop, report, prune, return objectives.

No training loop of its own: each seed is one ``dst.runner.run``, whose ``on_row`` hook hands every
metrics row (one per bin) back here. After each row the trial reports the objective computed on the rows
so far (for ``late_window`` the running late-window mean) as Optuna's intermediate value at the trial's
cumulative step, and asks the pruner, but only from ``warmup`` of a run's steps on (see docs/studies.md:
the early bins of every strategy look alike, so a decision there prunes on noise), and never at the
trial's last row: a trial that ran all its steps has its result, and completes with it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from dst.errors import ConfigError, DSTError, NonFiniteLossError
from dst.rundir import METRICS
from dst.runner import RunSpec, run
from dst.summary import summarize

from .objectives import objective_values
from .space import SearchSpace
from .workers import worker_id

__all__ = ["StudySettings", "TrialObjective", "SurplusTrial", "trial_dir"]

log = logging.getLogger(__name__)

#: Study user attrs that fix what a trial means; a study continues only with the same ones.
SETTINGS_KEYS = ("strategy", "benchmark", "steps", "seed", "seeds", "objectives", "directions", "space",
                 "pruner", "warmup")


@dataclass(frozen=True)
class StudySettings:
    """The fixed settings of a study, recorded in its user attrs so a worker needs only name + storage."""

    strategy: str
    benchmark: str
    steps: int
    seed: int
    seeds: int
    objectives: tuple[str, ...]
    directions: tuple[str, ...]
    space: dict[str, Any]  # SearchSpace.to_dict()
    pruner: str
    warmup: float

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.warmup * self.steps)

    def attrs(self) -> dict[str, Any]:
        values = {key: getattr(self, key) for key in SETTINGS_KEYS}
        values["objectives"], values["directions"] = list(self.objectives), list(self.directions)
        return values

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "StudySettings":
        values = {key: attrs[key] for key in SETTINGS_KEYS}
        values["objectives"], values["directions"] = tuple(values["objectives"]), tuple(values["directions"])
        return cls(**values)

    def search_space(self) -> SearchSpace:
        return SearchSpace.from_dict(self.space)


class SurplusTrial(Exception):
    """A trial asked for after other workers had already claimed the study's target."""


def trial_dir(out: str | Path, study_name: str, number: int) -> Path:
    return Path(out) / study_name / f"trial-{number}"


def _count_before(trial: optuna.Trial) -> int:
    """Trials numbered below ``trial`` that finished (COMPLETE, PRUNED) or are still RUNNING."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
    return sum(t.number < trial.number for t in trial.study.get_trials(deepcopy=False, states=states))


class TrialObjective:
    """The callable handed to ``study.optimize``: runs ``settings.seeds`` seeds of one sampled config."""

    def __init__(self, settings: StudySettings, out: str | Path, target: int, device: str = "auto") -> None:
        self.settings, self.out, self.target, self.device = settings, Path(out), target, device
        self.space = settings.search_space()

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        s = self.settings
        trial.set_user_attr("worker", worker_id())  # first: a RUNNING trial without it has an unknown owner
        if _count_before(trial) >= self.target:  # two workers asked at once for the last trial
            trial.set_user_attr("surplus", f"the target of {self.target} trials was already claimed")
            trial.study.stop()
            raise SurplusTrial(f"trial {trial.number}: the study's {self.target} trials are already claimed")
        settings, bench = self.space.sample(trial)
        directory = trial_dir(self.out, trial.study.study_name, trial.number)
        _check_unused(directory, trial.study.study_name)
        trial.set_user_attr("run_dir", str(directory))
        summaries = []
        for index in range(s.seeds):
            seed = s.seed + index
            spec = RunSpec(s.benchmark, s.strategy, s.steps, seed, bench, settings, self.device)
            out_dir = directory if s.seeds == 1 else directory / f"seed-{seed}"
            try:
                rows = run(spec, out_dir, progress=False, on_row=self._reporter(trial, index))
            except NonFiniteLossError as err:
                trial.set_user_attr("diverged", str(err))
                if not s.multi_objective:
                    trial.report(math.nan, index * s.steps + err.step)  # ranks below every finite value
                raise optuna.TrialPruned(f"diverged: the loss became {err.value} at step {err.step}") from None
            summaries.append(summarize(rows))
        values = [sum(v) / len(v) for v in zip(*(objective_values(m, s.objectives) for m in summaries))]
        trial.set_user_attr("summary", _mean_summary(summaries))
        if any(math.isnan(v) for v in values):
            missing = [n for n, v in zip(s.objectives, values) if math.isnan(v)]
            why = ""
            if "plasticity_loss" in missing and any(m.get("windows_overlap") for m in summaries):
                why = ("; plasticity_loss needs an early and a late window that do not overlap: give more --steps "
                       "or smaller bins (--bench bin_size=...), so that several rows follow the first task")
            raise DSTError(
                f"trial {trial.number}: the runs give no value for {', '.join(missing)} (see {directory}){why}"
            )
        return values[0] if len(values) == 1 else values

    def _reporter(self, trial: optuna.Trial, index: int):
        """``on_row`` for seed ``index``: report the objective on the rows so far, prune after warm-up but
        not at the trial's last row (the run is complete then: pruning would only throw its result away)."""
        s = self.settings
        rows: list[dict[str, Any]] = []
        last_seed = index == s.seeds - 1

        def on_row(members: list[dict[str, Any]]) -> None:
            (row,) = members  # each seed is a run of its own: a population of one
            rows.append(row)
            if s.multi_objective:
                return  # Optuna does not prune multi-objective studies
            (value,) = objective_values(summarize(pd.DataFrame(rows)), s.objectives)
            if math.isnan(value):
                return
            trial.report(value, index * s.steps + int(row["step"]))
            last_row = last_seed and row["step"] >= s.steps
            if not last_row and row["step"] >= s.warmup_steps and trial.should_prune():
                log.info("trial %d pruned at seed %d, step %d (value %.4g)", trial.number, index, row["step"], value)
                raise optuna.TrialPruned(f"pruned at step {row['step']} of seed {s.seed + index}")

        return on_row


def _check_unused(directory: Path, study_name: str) -> None:
    """Refuse a trial directory that already holds runs: they belong to another study of the same name (a
    deleted or other storage: trial numbers start again at 0), and a trial never overwrites them."""
    if directory.exists() and any(directory.rglob(METRICS)):
        raise ConfigError(
            f"{str(directory)!r} already holds a run of an earlier study named {study_name!r} (from another or "
            "a deleted storage: trial numbers start at 0 in each); give another --out or --study, or move "
            f"{str(directory.parent)!r} away (nothing was overwritten)"
        )


def _mean_summary(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Seed means of the numeric summary values (what the report shows next to each trial)."""
    result: dict[str, Any] = {"performance_metric": summaries[0].get("performance_metric")}
    for key, value in summaries[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            mean = sum(float(m[key]) for m in summaries) / len(summaries)
            if isinstance(value, int) and mean.is_integer():
                mean = int(mean)
            result[key] = None if math.isnan(mean) else mean  # JSON has no NaN
    return result
