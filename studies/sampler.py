"""Samplers whose seeded proposals continue, not restart, when a study is resumed or extended.

Optuna's seeded samplers (TPE, random, NSGA-II) keep one RNG per sampler object and advance it with every
draw; each run of ``tune`` or ``worker`` builds a new sampler, so with a fixed seed a rerun would replay
the sequence from its start and propose trial 0's settings again. :class:`TrialSeededSampler` gives every
trial a sampler of its own, seeded from (seed, k), k being the trial's *sample index*: the number of
earlier trials in the storage that were sampled rather than taken from the queue. A proposal so depends
only on the seed, k and the trials in the storage, the same whether the study ran in one go or in several.
Queued trials (``enqueue_trial``, or a failed trial's parameters run again by ``--requeue-running`` or a
heartbeat retry) carry their parameters and take no index: they do not shift the sampled sequence. See
docs/studies.md, "Resumed studies, and what a sampler seed reproduces".
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

__all__ = ["SAMPLERS", "TrialSeededSampler", "make_sampler", "sample_index"]

SAMPLERS = ("tpe", "random", "nsga2")


def _optuna_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_sampler(name: str, seed: int | None, storage: optuna.storages.BaseStorage) -> optuna.samplers.BaseSampler:
    """Optuna's sampler ``name``; with a ``seed``, wrapped in :class:`TrialSeededSampler` over ``storage``
    (without one, proposals are not reproducible anyway, and Optuna's sampler is used as it is)."""
    if seed is None:
        return _optuna_sampler(name, None)
    return TrialSeededSampler(functools.partial(_optuna_sampler, name), seed, storage)


def _queued(trial: FrozenTrial) -> bool:
    """Whether ``trial`` was taken from the queue with its parameters: ``enqueue_trial`` sets the system
    attr ``fixed_params`` (Optuna's GridSampler tells queued trials the same way), a retry of a failed trial
    (``RetryFailedTrialCallback`` and its heartbeat variant) ``failed_trial``."""
    return "fixed_params" in trial.system_attrs or "failed_trial" in trial.system_attrs


def sample_index(trials: Sequence[FrozenTrial], number: int) -> int:
    """The sample index of trial ``number``: how many of ``trials`` numbered below it were sampled, not
    queued. Every trial the sampler started counts, FAIL ones included (an interrupted or crashed trial's
    settings are not proposed again), so sampled trials never share an index."""
    return sum(t.number < number and not _queued(t) for t in trials)


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Delegates to a fresh ``make(trial_seed)`` sampler per trial, seeded from (``seed``, sample index).

    Public API only: the per-trial sampler is made in ``before_trial`` (Optuna calls it as a trial starts,
    before any parameter is sampled; or when first needed, as for ``after_trial`` of a trial another
    process began) and dropped in ``after_trial``. The trials are read from ``storage``
    rather than from the study ``before_trial`` receives, which under the Hyperband pruner shows only the
    trial's bracket. ``reseed_rng`` stays a no-op: every trial already has its own seed.
    """

    def __init__(
        self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int, storage: optuna.storages.BaseStorage
    ) -> None:
        self._make, self._seed, self._storage = make, seed, storage
        self._samplers: dict[int, optuna.samplers.BaseSampler] = {}  # trial number -> its sampler

    def _sampler(self, study: optuna.Study, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        if trial.number not in self._samplers:
            trials = self._storage.get_all_trials(self._storage.get_study_id_from_name(study.study_name),
                                                  deepcopy=False)
            entropy = [self._seed, sample_index(trials, trial.number)]
            if _queued(trial):  # it samples only what its queue entry leaves open: a stream of its own
                entropy.append(trial.number)
            seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
            self._samplers[trial.number] = self._make(seed)
        return self._samplers[trial.number]

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._sampler(study, trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._sampler(study, trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._sampler(study, trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._sampler(study, trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self._sampler(study, trial).after_trial(study, trial, state, values)
        self._samplers.pop(trial.number, None)
