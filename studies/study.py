"""Create, continue and run a study until a shared target of finished trials is reached.

A study records its fixed settings (strategy, benchmark, steps, seeds, objectives, search space,
pruner) as user attrs when it is created; ``tune`` refuses to continue it with different ones, and a
worker reads them, so it needs only the study name and the storage.

Stop rule, shared by any number of workers: a study is done when COMPLETE + PRUNED trials reach the
target. A worker stops asking for trials once finished + RUNNING trials reach it (``MaxTrialsCallback``
over those three states), so the last trials are not started twice over; while others' trials are still
running it waits, and takes over if one of them ends without finishing (FAIL). On a storage with
heartbeats a dead worker's trial is such a one: Optuna marks it FAIL and queues its parameters again.
On the journal storage, which has none, the worker waits while the processes running the last trials
live (on this machine); a trial left RUNNING by a killed process, or by a worker elsewhere that may
still be running it, ends the run with :class:`TargetNotReached`, which names the trials and the fix
(``--requeue-running``, or waiting for that worker). So a run never ends short of the target silently.
A worker that asks in the same instant as another for the last trial finds its trial surplus and
leaves it FAIL: the finished count never passes the target.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from dst import benchmarks
from dst.errors import ConfigError, DSTError

from .sampler import make_sampler
from .space import BENCH_PREFIX
from .storage import MAX_RETRY, StorageSpec, _retry_callback, has_heartbeat
from .trial import SETTINGS_KEYS, StudySettings, SurplusTrial, TrialObjective
from .workers import ALIVE, DEAD, STATUS_TEXT, RunningTrial, running_trials

__all__ = ["PRUNERS", "TargetNotReached", "open_study", "counts", "check_target", "run_study", "check_batch",
           "requeue_running", "make_pruner"]

log = logging.getLogger(__name__)

PRUNERS = ("median", "hyperband", "none")
STARTUP_TRIALS = 5  # trials the median pruner lets finish before it prunes anything
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
MULTI_OBJECTIVE_PRUNING = "none: Optuna cannot prune multi-objective studies, so every trial runs to its end"


def make_pruner(settings: StudySettings) -> optuna.pruners.BasePruner:
    """The study's pruner; it judges only reports from ``warmup`` of a run on (see docs/studies.md)."""
    if settings.multi_objective or settings.pruner == "none":
        return optuna.pruners.NopPruner()
    if settings.pruner == "hyperband":
        # a trial reports at its cumulative step: up to steps x seeds one seed after another, steps as a population
        resource = settings.steps if settings.population else settings.steps * settings.seeds
        return optuna.pruners.HyperbandPruner(min_resource=max(1, settings.warmup_steps), max_resource=resource)
    return optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS, n_warmup_steps=settings.warmup_steps)


def _differences(recorded: dict[str, Any], given: dict[str, Any]) -> list[str]:
    return [
        f"{key}: recorded {recorded.get(key)!r}, given {given.get(key)!r}"
        for key in SETTINGS_KEYS
        if recorded.get(key) != given.get(key)
    ]


def open_study(
    spec: StorageSpec,
    storage: optuna.storages.BaseStorage,
    name: str,
    settings: StudySettings | None = None,
    *,
    sampler: str = "tpe",
    sampler_seed: int | None = None,
) -> tuple[optuna.Study, StudySettings]:
    """Load study ``name`` (checking ``settings`` against the recorded ones) or create it from ``settings``;
    a ``sampler_seed`` seeds each trial's proposal from its place in the study (see studies/sampler.py)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        existing = optuna.get_all_study_names(storage)
        if name in existing:
            attrs = optuna.load_study(study_name=name, storage=storage).user_attrs
            if any(key not in attrs for key in SETTINGS_KEYS):
                raise ConfigError(
                    f"study {name!r} in {spec.display} has no recorded settings (it was not created by "
                    "`python -m studies tune`); choose another --study name"
                )
            recorded = StudySettings.from_attrs(attrs)
            if settings is not None:
                diff = _differences(recorded.attrs(), settings.attrs())
                if diff:
                    raise ConfigError(
                        f"study {name!r} in {spec.display} was created with other settings; "
                        + "; ".join(diff)
                        + f". Continue it with its recorded settings (python -m studies worker --study {name} "
                        f"--storage {spec.display} --trials N), or give a new --study name."
                    )
            settings = recorded
        elif settings is None:
            raise ConfigError(
                f"no study {name!r} in {spec.display} (studies there: {', '.join(existing) or 'none'}); "
                "create it with `python -m studies tune`"
            )
        else:
            study = optuna.create_study(
                study_name=name, storage=storage, directions=list(settings.directions), load_if_exists=True
            )
            for key, value in settings.attrs().items():
                study.set_user_attr(key, value)
            if settings.multi_objective:
                study.set_user_attr("pruning", MULTI_OBJECTIVE_PRUNING)
        study = optuna.load_study(study_name=name, storage=storage, pruner=make_pruner(settings),
                                   sampler=make_sampler(sampler, sampler_seed, storage))
    if settings.multi_objective:
        log.info("pruning: %s", MULTI_OBJECTIVE_PRUNING)
    return study, settings


class TargetNotReached(DSTError):
    """The study has fewer finished trials than its target, and this worker can start none of them:
    trials stuck RUNNING hold the rest (the message names them and says how to free them)."""


def counts(study: optuna.Study) -> tuple[int, int]:
    """(finished = COMPLETE + PRUNED, RUNNING) trials of the study."""
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    finished = sum(t.state in FINISHED for t in trials)
    return finished, len(trials) - finished


def requeue_running(study: optuna.Study, max_retry: int = MAX_RETRY) -> list[int]:
    """Mark RUNNING trials FAIL and queue their parameters again (for storages without heartbeats, after a
    killed process); returns their numbers. Trials whose worker still runs on this machine are left to
    it; one elsewhere cannot be told apart from a dead one, so this is safe only while no other worker
    runs."""
    callback = _retry_callback(max_retry)
    numbers = []
    for trial in running_trials(study):
        if trial.status == ALIVE:
            log.warning("%s is left RUNNING: %s", trial.describe(), STATUS_TEXT[ALIVE])
        else:
            numbers.append(trial.number)
    for number in numbers:
        study.tell(number, state=TrialState.FAIL)
        callback(study, study.trials[number])
        log.warning("trial %d was RUNNING: marked FAIL, its parameters queued again", number)
    return numbers


def check_target(study: optuna.Study, target: int, *, heartbeat: bool = False) -> None:
    """Raise :class:`TargetNotReached`, naming the RUNNING trials and the fix, unless ``target`` trials
    finished (``heartbeat``: the storage fails dead workers' trials itself)."""
    finished, _ = counts(study)
    if finished < target:
        raise TargetNotReached(_short_message(study.study_name, finished, target, running_trials(study), heartbeat))


def _short_message(name: str, finished: int, target: int, running: list[RunningTrial], heartbeat: bool) -> str:
    text = f"study {name!r} has {finished} of {target} finished trials"
    if not running:
        return text + "; rerun the command to run the rest"
    if heartbeat:
        return text + (f"; {', '.join(t.describe() for t in running)} still RUNNING: rerun the command; it waits "
                       "for them, and fails and runs again any whose worker sent no heartbeat for --grace-period")
    text += (f", and {len(running)} trial(s) stuck RUNNING hold the rest (this storage has no heartbeat to "
             "free them)")
    dead = [t.describe() for t in running if t.status == DEAD]
    elsewhere = [t.describe() for t in running if t.status != DEAD]
    if dead:
        text += f". {', '.join(dead)}: left by a worker that no longer runs on this machine (killed mid-trial)"
    if elsewhere:
        text += (f". {', '.join(elsewhere)}: run by a worker on another machine (or an unrecorded one) that may "
                 f"still be running it: wait for that worker to finish and the study has its {target} trials")
    return text + (". Once no other worker runs on this study, rerun with --requeue-running: it marks the "
                   "RUNNING trials FAIL and runs their parameters again")


def _wait_or_give_up(study: optuna.Study, target: int, waited_for: set[int]) -> set[int]:
    """No heartbeat, and the RUNNING trials hold the rest of the target: the numbers of those whose
    workers live on this machine (the caller waits for them), or :class:`TargetNotReached` if none do."""
    running = running_trials(study)
    alive = {t.number for t in running if t.status == ALIVE}
    if not alive:
        check_target(study, target)
    elif alive != waited_for:
        log.info("waiting for %s of live workers; this worker takes over any of them that fails",
                 ", ".join(t.describe() for t in running if t.number in alive))
    return alive


def run_study(
    study: optuna.Study,
    settings: StudySettings,
    storage: optuna.storages.BaseStorage,
    *,
    target: int,
    out: str | Path,
    device: str = "auto",
    poll: float = 1.0,
    batch: int = 1,
) -> int:
    """Run trials until COMPLETE + PRUNED trials reach ``target``; returns the trials this process ran.

    ``batch`` > 1 asks for that many trials at once and trains all their seeds as one population
    (:func:`check_batch` says when it can). Raises :class:`TargetNotReached` when trials stuck RUNNING
    (storage without heartbeat) hold the rest."""
    objective = TrialObjective(settings, out, target, device)
    heartbeat = has_heartbeat(storage)
    stop_at_target = optuna.study.MaxTrialsCallback(target, states=(*FINISHED, TrialState.RUNNING))
    ran = 0
    waited_for: set[int] = set()

    def count_mine(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal ran
        ran += trial.state in FINISHED

    while True:
        finished, running = counts(study)
        if finished >= target:
            log.info("study %r has %d finished trials (target %d)", study.study_name, finished, target)
            return ran
        if finished + running >= target:  # others run the last trials; take over if one of them fails
            if not heartbeat:
                waited_for = _wait_or_give_up(study, target, waited_for)
            time.sleep(poll)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # heartbeats: fails (and re-queues) dead ones
            continue
        log.info("study %r: %d of %d trials finished, %d running", study.study_name, finished, target, running)
        if batch > 1:
            ran += _run_batch(study, objective, min(batch, target - finished - running))
            continue
        study.optimize(
            objective, catch=(SurplusTrial,), callbacks=[stop_at_target, count_mine], gc_after_trial=False
        )


def check_batch(settings: StudySettings, batch: int) -> None:
    """``--batch`` trains several trials in one population, whose members may differ only in numbers:
    every tuned setting must be a numeric strategy setting or the benchmark's ``lr``, and the benchmark
    must batch members. A :class:`ConfigError` naming the obstacle otherwise."""
    if batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {batch}")
    if batch == 1:
        return
    if not benchmarks.get(settings.benchmark).cls.batchable:
        raise ConfigError(f"--batch {batch}: benchmark {settings.benchmark!r} trains one member at a time, so "
                          "trials cannot share a population; leave --batch out (or use --workers)")
    for param in settings.search_space().params:
        if param.kind == "categorical" or (param.name.startswith(BENCH_PREFIX) and param.name != BENCH_PREFIX + "lr"):
            what = "a categorical setting" if param.kind == "categorical" else "a benchmark setting other than lr"
            raise ConfigError(
                f"--batch {batch}: {param.name} is {what}, but the members of one population may differ only in "
                "numeric strategy settings and lr; fix it (--param NAME=VALUE) or leave --batch out"
            )


def _run_batch(study: optuna.Study, objective: TrialObjective, size: int) -> int:
    """Ask ``size`` trials, train them as one population, tell each its outcome; the trials finished."""
    entries = []
    for _ in range(size):
        trial = study.ask()
        try:
            entries.append(objective.start(trial))
        except SurplusTrial:  # another worker took the last trials meanwhile
            study.tell(trial, state=TrialState.FAIL)
            break
    if not entries:
        return 0
    try:
        objective.run(entries)
    except BaseException:  # Ctrl-C or a bug: the trials are not left RUNNING
        for entry in entries:
            study.tell(entry.trial, state=TrialState.FAIL)
        raise
    error = None
    for entry in entries:
        if isinstance(entry.outcome, optuna.TrialPruned):
            study.tell(entry.trial, state=TrialState.PRUNED)
        elif isinstance(entry.outcome, BaseException):
            study.tell(entry.trial, state=TrialState.FAIL)
            error = error or entry.outcome
        else:
            study.tell(entry.trial, entry.outcome)
    if error is not None:
        raise error
    return len(entries)
