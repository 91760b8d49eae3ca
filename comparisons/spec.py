"""What a comparison is, and its one resolution: arms x seeds on one benchmark -> resolved arms.

An :class:`Arm` is one configuration as given (by a preset, the command line or the library): a name,
a strategy, its settings and benchmark overrides, and the grid point it is. :func:`resolve` turns each arm,
exactly once, into a :class:`ResolvedArm` holding everything the runs and the report need: its label, the
dst :class:`~dst.runner.RunSpec` with every setting resolved by dst's own config classes, and the record
``comparison.json`` keeps. So a bad key, a value out of range or a sparse-only strategy on a dense net is an
error naming the arm before any run starts. Named presets and the parsing of ``--bench``/``--set``/
``--grid`` live in :mod:`comparisons.presets`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from dst import benchmarks, strategies
from dst.benchmarks import Benchmark
from dst.config import Config
from dst.errors import ConfigError, DSTError
from dst.runner import RunSpec

__all__ = [
    "Arm",
    "Comparison",
    "ResolvedArm",
    "UnexpectedError",
    "DEFAULT_SPARSE_DENSITY",
    "needs_sparse",
    "resolve",
    "dir_name",
    "jsonable",
]

log = logging.getLogger(__name__)

#: Density given to a sparse-only strategy (SET, RigL, ...) whose arm names none.
DEFAULT_SPARSE_DENSITY = 0.5


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ",".join(_format_value(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class Arm:
    """One configuration to compare, as given: a name, a strategy, its settings and benchmark overrides.

    ``bench`` holds this arm's full benchmark overrides (those shared by all arms included), so that an
    arm alone says how to reproduce it; ``grid`` is the grid point it is (strategy settings, also in
    ``settings``). Its label (:attr:`ResolvedArm.label`) needs the resolved density, so :func:`resolve`
    makes it.
    """

    name: str
    strategy: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    bench: Mapping[str, Any] = field(default_factory=dict)
    grid: Mapping[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        """The name and grid point, ``cbp replacement_rate=1e-05``: how errors name the arm."""
        return " ".join([self.name] + [f"{k}={_format_value(v)}" for k, v in self.grid.items()])


@dataclass(frozen=True)
class Comparison:
    """Arms x seeds on one benchmark, each run ``steps`` long (None: the benchmark's default length)."""

    benchmark: str
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int | None = None
    device: str = "auto"
    checkpoints: int = 10  # checkpoints per run, so an interrupted run loses at most a tenth of its work
    name: str = "custom"


@dataclass(frozen=True)
class ResolvedArm:
    """An arm resolved once: its label, the arm as given, and the run it makes.

    ``arm`` is the arm as given, with the default density of a sparse-only strategy that named none
    added to its ``bench``. ``spec`` is its dst run for seed 0 (:func:`comparisons.execute.plan` sets each
    seed): benchmark, strategy, resolved run length, device, checkpoint interval, and in ``spec.bench`` and
    ``spec.settings`` every benchmark and strategy setting resolved (defaults included, as JSON reads them
    back), which is also what a finished run's ``config.json`` must hold.
    """

    label: str
    arm: Arm
    spec: RunSpec

    def record(self) -> dict[str, Any]:
        """The arm's entry in ``comparison.json``: label, strategy, settings as given and as resolved."""
        return {"label": self.label, "strategy": self.arm.strategy, "settings": dict(self.arm.settings),
                "bench": dict(self.arm.bench), "grid": dict(self.arm.grid),
                "resolved_settings": self.spec.settings, "resolved_bench": self.spec.bench}


class UnexpectedError(Exception):
    """An exception dst does not raise on purpose (not a :class:`~dst.errors.DSTError`) met while resolving
    an arm: no setting the user can fix, most likely a bug. The message names the arm and the exception;
    the original is its ``__cause__``."""


def jsonable(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists), for comparing saved settings."""
    return json.loads(json.dumps(value, default=str))


def needs_sparse(strategy: str) -> bool:
    """Whether ``strategy`` refreshes connections and so needs masked (density < 1) layers."""
    from dst.prune_regrow import PruneRegrow

    cls = strategies.get(strategy).cls
    if isinstance(cls, type) and issubclass(cls, PruneRegrow):
        return True
    return any(needs_sparse(part) for part in getattr(cls, "part_names", ()))


def dir_name(label: str) -> str:
    """A file-name-safe form of an arm label.

    ``cbp replacement_rate=1e-05 (dense)`` -> ``cbp_replacement_rate=1e-05_dense``."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", label).strip("_") or "arm"


def _check(comparison: Comparison) -> None:
    """The checks of the comparison as a whole: benchmark, arms, steps, seeds, checkpoints."""
    benchmarks.get(comparison.benchmark)  # unknown benchmark -> ConfigError listing the available ones
    if not comparison.arms:
        raise ConfigError("a comparison needs at least one arm (strategy)")
    if comparison.steps is not None and (not isinstance(comparison.steps, int) or comparison.steps <= 0):
        raise ConfigError(f"--steps must be a positive integer, got {comparison.steps!r}")
    if not comparison.seeds:
        raise ConfigError("a comparison needs at least one seed")
    if len(set(comparison.seeds)) != len(comparison.seeds) or any(s < 0 for s in comparison.seeds):
        raise ConfigError(f"seeds must be distinct non-negative integers, got {list(comparison.seeds)}")
    if comparison.checkpoints < 0:
        raise ConfigError(f"checkpoints per run must be >= 0, got {comparison.checkpoints}")


def _dry_build(bench: Benchmark, strategy: str, settings: Config) -> None:
    """Build the arm's learner, optimizer and strategy once (no data, no training), so that a setting
    only the strategy's constructor checks fails now, not in every run."""
    import torch

    from dst.masked import sparsify

    c = bench.config
    model = bench.make_model([torch.Generator().manual_seed(0)])
    sparsify(model, c.density, c.distribution, dense_first=c.dense_first, dense_last=c.dense_last, seed=0)
    strategies.build(strategy, model, bench.make_optimizer(model), config=settings, seed=0)


def _run_length(bench: Benchmark, values: dict[str, Any], comparison: Comparison, lengths: dict[str, int]) -> int:
    """The run length of ``bench`` (whose resolved settings are ``values``): each distinct benchmark setting
    opens its stream once (``lengths`` holds their run lengths), so missing data files show now, and a row
    per task (``bin_size=0``) is checked to have tasks of fixed length."""
    import torch

    key = json.dumps(values, sort_keys=True)
    if key not in lengths:
        stream = bench.make_stream((comparison.seeds[0],), torch.device("cpu"))
        bench.bin_steps(stream)
        lengths[key] = comparison.steps if comparison.steps is not None else bench.default_steps(stream)
    return lengths[key]


def _label(arm: Arm, density: float) -> str:
    """``cbp replacement_rate=1e-05 (dense)`` / ``rigl (sparse 0.5)``: what it is and whether it is sparse."""
    return f"{arm.title} ({'dense' if density >= 1.0 else f'sparse {density:g}'})"


def _resolve_arm(comparison: Comparison, arm: Arm, lengths: dict[str, int] | None) -> ResolvedArm:
    """:func:`resolve` for one arm; ``lengths`` (None: no dry build, no stream) as in :func:`_run_length`."""
    bench = benchmarks.build(comparison.benchmark, **arm.bench)
    if bench.config.density >= 1.0 and "density" not in arm.bench and needs_sparse(arm.strategy):
        log.info("%s needs a sparse net: density %g", arm.strategy, DEFAULT_SPARSE_DENSITY)
        arm = replace(arm, bench={**arm.bench, "density": DEFAULT_SPARSE_DENSITY})
        bench = type(bench)(bench.config.replace(density=DEFAULT_SPARSE_DENSITY))
    settings = strategies.config(arm.strategy, **arm.settings)
    if needs_sparse(arm.strategy) and bench.config.density >= 1.0:
        raise ConfigError(f"strategy {arm.strategy!r} refreshes connections and needs a sparse net; "
                          f"give it a density, e.g. --bench {arm.strategy}.density=0.5")
    values = jsonable(bench.config.to_dict())
    steps = comparison.steps
    if lengths is not None:
        _dry_build(bench, arm.strategy, settings)
        steps = _run_length(bench, values, comparison, lengths)
    every = None  # checkpoints spread evenly over the run (dst rounds them up to whole bins)
    if comparison.checkpoints and steps is not None:
        every = max(1, math.ceil(steps / comparison.checkpoints))
    spec = RunSpec(comparison.benchmark, arm.strategy, steps, bench=values, settings=jsonable(settings.to_dict()),
                   device=comparison.device, checkpoint_every=every)
    return ResolvedArm(_label(arm, bench.config.density), arm, spec)


def resolve(comparison: Comparison, *, check_runs: bool = True) -> tuple[ResolvedArm, ...]:
    """Resolve every arm of ``comparison`` once, through dst's config classes.

    A problem the user can fix is a :class:`ConfigError` naming the arm (``arm 'cbp' (strategy cbp):
    ...``); any other exception becomes an :class:`UnexpectedError` naming the arm and the exception,
    never a silent skip. With ``check_runs`` each arm also builds its learner and strategy once, and each
    distinct benchmark setting opens its stream once (missing data shows now, not in every worker),
    which gives the run length; without, the run length is the comparison's ``steps``.
    """
    _check(comparison)
    lengths: dict[str, int] | None = {} if check_runs else None
    resolved = []
    for arm in comparison.arms:
        who = f"arm {arm.title!r} (strategy {arm.strategy})"
        try:
            resolved.append(_resolve_arm(comparison, arm, lengths))
        except DSTError as err:
            raise ConfigError(f"{who}: {err}") from None
        except Exception as err:  # noqa: BLE001 - shown with the arm's name, never skipped
            raise UnexpectedError(f"{who}: {type(err).__name__}: {err}") from err
    folders: dict[str, str] = {}
    for item in resolved:
        folder = dir_name(item.label)
        if folder in folders:
            raise ConfigError(f"arms {folders[folder]!r} and {item.label!r} would share the folder runs/{folder}; "
                              "give them distinct labels")
        folders[folder] = item.label
    return tuple(resolved)
