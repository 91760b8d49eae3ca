"""One trial: sample settings, run them through dst's experiment loop, report, prune, return objectives.

No training loop of its own: a trial's seeds train as one population (``dst.runner.prepare`` with one
member per seed; ``--batch`` puts several trials' seeds in one population, member (trial, seed) running
that trial's settings) when the benchmark can batch members, else one ``dst.runner.run`` per seed. Each
bin's metrics rows come back through ``on_row``; the trial reports the objective computed on its rows so
far (for ``late_window`` the running late-window mean), averaged over its seeds, as Optuna's
intermediate value at the trial's step (cumulative over the seeds when they run one after another), and
asks the pruner, but only from ``warmup`` of a run's steps on (see docs/studies.md: the early bins of every
strategy look alike, so a decision there prunes on noise), and never at the trial's last row: a trial that
ran all its steps has its result, and completes with it. A member whose loss diverges ends its trial.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from dst.errors import ConfigError, DSTError, NonFiniteLossError
from dst.rundir import METRICS
from dst import benchmarks
from dst.runner import RunSpec, prepare, run, write_summaries
from dst.summary import summarize

from .objectives import objective_values
from .space import SearchSpace
from .workers import worker_id

__all__ = ["StudySettings", "TrialObjective", "Entry", "SurplusTrial", "trial_dir"]

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
    def population(self) -> bool:
        """Whether a trial's seeds train as one population (the benchmark can batch members, 2+ seeds)."""
        return self.seeds > 1 and benchmarks.get(self.benchmark).cls.batchable

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


@dataclass
class Entry:
    """A started trial: its sampled settings, its folder, and the rows and outcome of its seeds so far."""

    trial: optuna.Trial
    settings: dict[str, Any]
    bench: dict[str, Any]
    directory: Path
    rows: list[list[dict[str, Any]]] = field(default_factory=list)  # per seed
    outcome: Any = None  # objective values, or the exception that ends the trial (TrialPruned, DSTError)


class _BatchDone(Exception):
    """Every trial of a population has its outcome: stop training it."""


class TrialObjective:
    """The callable handed to ``study.optimize``: runs ``settings.seeds`` seeds of one sampled config.

    :meth:`start` claims and samples a trial, :meth:`run` trains started trials: their seeds as one
    population (:mod:`dst.population`) when the benchmark can batch members, several trials' seeds in one
    population for ``--batch``, else one seed after another."""

    def __init__(self, settings: StudySettings, out: str | Path, target: int, device: str = "auto") -> None:
        self.settings, self.out, self.target, self.device = settings, Path(out), target, device
        self.space = settings.search_space()

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        try:
            entry = self.start(trial)
        except SurplusTrial:
            trial.study.stop()
            raise
        (entry,) = self.run([entry])
        if isinstance(entry.outcome, BaseException):
            raise entry.outcome
        return entry.outcome

    def start(self, trial: optuna.Trial) -> Entry:
        """Claim ``trial`` (or raise :class:`SurplusTrial`), sample its settings and check its folder."""
        trial.set_user_attr("worker", worker_id())  # first: a RUNNING trial without it has an unknown owner
        if _count_before(trial) >= self.target:  # two workers asked at once for the last trial
            trial.set_user_attr("surplus", f"the target of {self.target} trials was already claimed")
            raise SurplusTrial(f"trial {trial.number}: the study's {self.target} trials are already claimed")
        settings, bench = self.space.sample(trial)
        directory = trial_dir(self.out, trial.study.study_name, trial.number)
        _check_unused(directory, trial.study.study_name)
        trial.set_user_attr("run_dir", str(directory))
        return Entry(trial, settings, bench, directory)

    def run(self, entries: list[Entry]) -> list[Entry]:
        """Train ``entries`` and set each one's outcome (objective values, or the exception ending it)."""
        s = self.settings
        if s.population or len(entries) > 1:
            self._run_population(entries)
        else:
            self._run_seeds(entries[0])
        for entry in entries:
            if entry.outcome is None:
                entry.outcome = self._values(entry)
        return entries

    def _member_dir(self, entry: Entry, seed: int) -> Path:
        return entry.directory if self.settings.seeds == 1 else entry.directory / f"seed-{seed}"

    def _seeds(self) -> list[int]:
        return [self.settings.seed + index for index in range(self.settings.seeds)]

    def _run_seeds(self, entry: Entry) -> None:
        """One seed after another, each a run of its own."""
        s = self.settings
        for index, seed in enumerate(self._seeds()):
            spec = RunSpec(s.benchmark, s.strategy, s.steps, seed, entry.bench, entry.settings, self.device)
            entry.rows.append([])
            try:
                run(spec, self._member_dir(entry, seed), progress=False, on_row=self._reporter(entry, index))
            except NonFiniteLossError as err:
                self._diverged(entry, str(err), index * s.steps + err.step, err)
                return
            except optuna.TrialPruned as pruned:
                entry.outcome = pruned
                return

    def _run_population(self, entries: list[Entry]) -> None:
        """Every seed of every entry as one population: member (entry, seed) runs entry's settings."""
        s, seeds = self.settings, self._seeds()
        members = [(entry, seed) for entry in entries for seed in seeds]
        settings = _per_member([entry.settings for entry, _ in members])
        bench = _per_member([entry.bench for entry, _ in members])
        spec = RunSpec(s.benchmark, s.strategy, s.steps, seeds[0], bench, settings, self.device,
                       seeds=tuple(seed for _, seed in members))
        home = entries[0].directory
        if len(entries) > 1:
            home = home.parent / f"batch-{entries[0].trial.number}-{entries[-1].trial.number}"
        for entry in entries:
            entry.rows = [[] for _ in seeds]
        experiment = prepare(spec, home, progress=False,
                             member_dirs=[self._member_dir(entry, seed) for entry, seed in members])
        experiment.on_row = lambda rows: self._report_population(entries, experiment, rows)
        try:
            frames = experiment.run()
            write_summaries(experiment, frames)
        except NonFiniteLossError as err:  # every member diverged
            for entry in entries:
                if entry.outcome is None:
                    self._diverged(entry, str(err), err.step, err)
        except _BatchDone:
            pass

    def _report_population(self, entries: list[Entry], experiment: Any, rows: list[dict[str, Any]]) -> None:
        """One bin of a population: each running member's row, in member order (stopped members have none)."""
        running = [member for member in range(experiment.members) if member not in experiment.failed]
        by_member = dict(zip(running, rows))
        per_entry = self.settings.seeds
        for position, entry in enumerate(entries):
            if entry.outcome is not None:
                continue
            members = range(position * per_entry, (position + 1) * per_entry)
            stopped = [member for member in members if member in experiment.failed]
            if stopped:
                step, message = experiment.failed[stopped[0]]
                self._diverged(entry, message, step)
                continue
            for index, member in enumerate(members):
                entry.rows[index].append(by_member[member])
            try:
                self._report(entry, int(by_member[members[0]]["step"]), last_seed=True)
            except optuna.TrialPruned as pruned:
                entry.outcome = pruned
        if all(entry.outcome is not None for entry in entries):
            raise _BatchDone

    def _diverged(self, entry: Entry, message: str, step: int, error: NonFiniteLossError | None = None) -> None:
        entry.trial.set_user_attr("diverged", message)
        if not self.settings.multi_objective:
            entry.trial.report(math.nan, step)  # ranks below every finite value
        what = f"the loss became {error.value} at step {error.step}" if error is not None else message
        entry.outcome = optuna.TrialPruned(f"diverged: {what}")

    def _report(self, entry: Entry, step: int, last_seed: bool) -> None:
        """Report the objective on the rows so far (the mean over the seeds that have rows) at ``step``;
        prune after warm-up, but not at the trial's last row (the run is complete then: pruning would only
        throw its result away)."""
        s = self.settings
        if s.multi_objective:
            return  # Optuna does not prune multi-objective studies
        values = [objective_values(summarize(pd.DataFrame(rows)), s.objectives)[0] for rows in entry.rows if rows]
        if not values or any(math.isnan(value) for value in values):
            return
        value = sum(values) / len(values)
        entry.trial.report(value, step)
        row_step = step % s.steps or s.steps
        last_row = last_seed and step >= (s.steps if s.population else s.steps * s.seeds)
        if not last_row and row_step >= s.warmup_steps and entry.trial.should_prune():
            log.info("trial %d pruned at step %d (value %.4g)", entry.trial.number, step, value)
            raise optuna.TrialPruned(f"pruned at step {step}")

    def _reporter(self, entry: Entry, index: int):
        """``on_row`` for seed ``index`` of a trial run one seed after another."""
        s = self.settings

        def on_row(members: list[dict[str, Any]]) -> None:
            (row,) = members  # each seed is a run of its own: a population of one
            entry.rows[index].append(row)
            self._report(entry, index * s.steps + int(row["step"]), last_seed=index == s.seeds - 1)

        return on_row

    def _values(self, entry: Entry) -> float | list[float] | DSTError:
        """The trial's objective values: the means over its seeds (each seed's values kept, for the spread)."""
        s, trial = self.settings, entry.trial
        summaries = [summarize(pd.DataFrame(rows)) for rows in entry.rows]
        per_seed = [objective_values(summary, s.objectives) for summary in summaries]
        values = [sum(v) / len(v) for v in zip(*per_seed)]
        trial.set_user_attr("summary", _mean_summary(summaries))
        trial.set_user_attr("seed_values", {name: [None if math.isnan(v[i]) else v[i] for v in per_seed]
                                            for i, name in enumerate(s.objectives)})
        if any(math.isnan(v) for v in values):
            missing = [n for n, v in zip(s.objectives, values) if math.isnan(v)]
            why = ""
            if "plasticity_loss" in missing and any(m.get("windows_overlap") for m in summaries):
                why = ("; plasticity_loss needs an early and a late window that do not overlap: give more --steps "
                       "or smaller bins (--bench bin_size=...), so that several rows follow the first task")
            return DSTError(f"trial {trial.number}: the runs give no value for {', '.join(missing)} "
                            f"(see {entry.directory}){why}")
        return values[0] if len(values) == 1 else values


def _per_member(values: list[dict[str, Any]]) -> dict[str, Any]:
    """Members' settings as one spec's: a value all members share once, else one value per member."""
    merged: dict[str, Any] = {}
    for key in values[0]:
        column = [member[key] for member in values]
        merged[key] = column[0] if all(v == column[0] for v in column) else column
    return merged


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
