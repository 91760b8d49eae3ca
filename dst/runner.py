"""From names and settings to a running experiment: what the CLI, comparisons and studies call.

    df = dst.runner.run(RunSpec("bit-flipping", "cbp", steps=100_000, seed=0,
                                settings={"replacement_rate": 1e-4}), out_dir="runs/x")
"""

from __future__ import annotations

import json
import logging
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from . import benchmarks, strategies
from .config import is_numeric_setting
from .errors import ConfigError
from .experiment import Experiment
from .population import check_seeds
from .rundir import SUMMARY, write_population
from .streams.base import derive_seed
from .summary import summarize
from .timing import StepTimer, duration

__all__ = ["RunSpec", "prepare", "run", "resolve_device", "member_dir", "write_summaries"]

_GLOBAL_RNG, _STRATEGY_RNG = 21, 22  # seed-derivation keys


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None) picks CUDA when present, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {device!r}: {err}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    return resolved


@dataclass(frozen=True)
class RunSpec:
    """One run: a benchmark, a strategy, their settings, a seed and a length.

    With ``seeds`` the run is a population: one member per seed, trained in one batched pass, each
    member the run its seed alone would be. A numeric strategy setting, and the benchmark's ``lr``, may
    then hold one value per member (a list, or a comma string such as ``"1e-5,1e-4,1e-3"``).
    """

    benchmark: str = "bit-flipping"
    strategy: str = "bp"
    steps: int | None = None  # None: the benchmark's default length
    seed: int = 0
    bench: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    checkpoint_every: int | None = None
    seeds: tuple[int, ...] | None = None

    @property
    def member_seeds(self) -> tuple[int, ...]:
        return check_seeds(self.seed if self.seeds is None else self.seeds)


log = logging.getLogger(__name__)


def member_dir(out_dir: str | os.PathLike, seed: int) -> Path:
    """Where member ``seed`` of a population run in ``out_dir`` writes its run directory."""
    return Path(out_dir) / f"seed-{seed}"


def _per_member(
    what: str, defaults: dict[str, Any], values: dict[str, Any], members: int, allowed: set[str] | None = None
) -> list[dict[str, Any]]:
    """Split settings into one dict per member: a list (or a comma string) for a numeric setting holds one
    value per member; every other value is shared."""
    result: list[dict[str, Any]] = [{} for _ in range(members)]
    for key, value in values.items():
        items = value.split(",") if isinstance(value, str) and "," in value else value
        listed = isinstance(items, (list, tuple))
        default = defaults.get(key)
        numeric = is_numeric_setting(default)
        if listed and numeric and (allowed is None or key in allowed):
            if len(items) != members:
                raise ConfigError(
                    f"{what} {key} has {len(items)} values but the population has {members} members; give one "
                    "value per member (in the order of --seeds) or one value for all"
                )
            for member, item in enumerate(items):
                result[member][key] = item
            continue
        if listed and numeric:
            raise ConfigError(
                f"{what} {key} takes one value for the whole population; per-member values are for strategy "
                f"settings and lr (got {value!r})"
            )
        if listed and isinstance(default, (str, bool)):
            raise ConfigError(
                f"{what} {key} is not numeric, so the members of a population share it (got {value!r}); "
                "run one population per value"
            )
        for member in range(members):
            result[member][key] = value
    return result


def prepare(
    spec: RunSpec,
    out_dir: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
    member_dirs: Sequence[str | os.PathLike] | None = None,
) -> Experiment:
    """Build the benchmark's stream, learner and optimizer, the strategy, and the experiment.

    A population spec (``seeds``) writes its checkpoint to ``out_dir`` and member s to ``member_dirs[s]``,
    by default ``out_dir/seed-<s>/``. ``on_row`` is passed to :class:`~dst.experiment.Experiment`."""
    if spec.steps is not None and (not isinstance(spec.steps, int) or spec.steps <= 0):
        raise ConfigError(f"steps must be a positive integer, got {spec.steps!r}")
    seeds = spec.member_seeds
    members = len(seeds)
    bench_cls = benchmarks.get(spec.benchmark).config
    bench_defaults = {name: getattr(bench_cls(), name) for name in bench_cls.field_names()}
    bench_values = _per_member("--bench", bench_defaults, spec.bench, members, allowed={"lr"})
    benchmark = benchmarks.build(spec.benchmark, **bench_values[0])
    lrs = None  # one lr per member, when they differ
    if len({str(values.get("lr")) for values in bench_values}) > 1:
        lrs = [benchmark.config.replace(lr=values["lr"]).lr for values in bench_values]
    strategy_cls = strategies.get(spec.strategy).config
    defaults = {name: getattr(strategy_cls(), name) for name in strategy_cls.field_names()}
    configs = [
        strategies.config(spec.strategy, **values)
        for values in _per_member("--set", defaults, spec.settings, members)
    ]
    device = resolve_device(spec.device)
    torch.manual_seed(derive_seed(seeds[0], _GLOBAL_RNG))
    stream, model, optimizer = benchmark.build(seeds, device, lr=lrs)
    if next(model.parameters()).device.type != device.type:  # where it really runs (slippery-ant keeps to the CPU)
        device = next(model.parameters()).device
    steps = spec.steps if spec.steps is not None else benchmark.default_steps(stream)
    strategy = strategies.build(
        spec.strategy, model, optimizer, config=configs, seed=[derive_seed(seed, _STRATEGY_RNG) for seed in seeds]
    )
    metadata = [
        {
            "benchmark": spec.benchmark,
            "strategy": spec.strategy,
            "seed": seed,
            "steps": steps,
            "device": str(device),
            "bench": {**benchmark.config.to_dict(), **({"lr": lrs[member]} if lrs else {})},
            "settings": configs[member].to_dict(),
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
        }
        for member, seed in enumerate(seeds)
    ]
    if member_dirs is not None and (out_dir is None or spec.seeds is None):
        raise ConfigError("member_dirs are for a population spec (seeds) with an out_dir for its checkpoint")
    if out_dir is not None and member_dirs is None:
        if spec.seeds is not None:
            check_seeds(seeds, distinct=True)  # one folder per seed
        member_dirs = [Path(out_dir)] if spec.seeds is None else [member_dir(out_dir, seed) for seed in seeds]
    return benchmark.make_experiment(
        stream,
        model,
        optimizer,
        strategy,
        steps=steps,
        bin_size=benchmark.bin_steps(stream),
        out_dir=out_dir,
        member_dirs=member_dirs,
        checkpoint_every=spec.checkpoint_every,
        metadata=metadata,
        progress=progress,
        probe=benchmark.make_probe(),
        on_row=on_row,
    )


def write_summaries(experiment: Experiment, frames: list[pd.DataFrame]) -> None:
    """Each member's summary.json, written last and atomically: on disk it always means a finished,
    readable run (a member stopped by a non-finite loss has its failure.json instead)."""
    for member, (directory, rows) in enumerate(zip(experiment.member_dirs or (), frames)):
        if member in experiment.failed or not len(rows):
            continue
        tmp = Path(directory, SUMMARY + ".tmp")
        tmp.write_text(json.dumps(summarize(rows), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, Path(directory, SUMMARY))


def _announce_duration(experiment: Experiment) -> None:
    """Log the run's expected time once its first steps are timed (10 warm-up steps, then 100 steps or
    10 seconds, whichever comes first)."""

    def announce(seconds_per_step: float) -> None:
        log.info("about %s for the %d steps of this run (%.3g s per step over its first steps; evaluations and "
                 "probes after them not counted)", duration(seconds_per_step * experiment.steps), experiment.steps,
                 seconds_per_step)

    StepTimer(experiment, after=10, measure=100, budget=10.0, on_measured=announce,
              counter=(lambda: experiment.steps_done) if hasattr(experiment, "steps_done") else None)


def run(
    spec: RunSpec,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
    member_dirs: Sequence[str | os.PathLike] | None = None,
) -> pd.DataFrame | list[pd.DataFrame]:
    """Prepare and run ``spec``; returns the metrics rows (also in ``metrics.csv``, with the run's
    :func:`dst.summary.summarize` in ``summary.json``): one DataFrame for a single-seed spec, a list (one
    per member) for a population (``seeds``). ``on_row(rows)`` is called after each bin's rows are
    written; an exception it raises stops the run (the rows written so far are kept). ``member_dirs``: as
    for :func:`prepare`."""
    experiment = prepare(spec, out_dir, progress=progress, on_row=on_row, member_dirs=member_dirs)
    _announce_duration(experiment)  # a run says early on how long it will take (logged, at INFO)
    if spec.seeds is not None and out_dir is not None:
        record = {**asdict(spec), "seeds": list(spec.member_seeds)}
        write_population(out_dir, record, resume=resume)
    frames = experiment.run(resume=resume)
    if out_dir is not None:
        write_summaries(experiment, frames)
    return frames[0] if spec.seeds is None else frames
