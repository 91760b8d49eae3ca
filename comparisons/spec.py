"""What a comparison is: arms (label, strategy, settings, benchmark overrides) x seeds on one benchmark.

An *arm* is one configuration to compare. Grids expand one strategy's arm into one arm per grid point,
whose label shows the values. :func:`validate` resolves every arm through dst's own config classes, so a
bad key, a value out of range or a sparse-only strategy on a dense net is an error before any run starts.
Named presets live in :mod:`comparisons.presets`.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from dst import benchmarks, strategies
from dst.config import Config
from dst.errors import ConfigError, DSTError

__all__ = [
    "Arm",
    "Comparison",
    "ResolvedArm",
    "DEFAULT_SPARSE_DENSITY",
    "arm_label",
    "needs_sparse",
    "expand_grid",
    "validate",
    "dir_name",
]

log = logging.getLogger(__name__)

#: Density given to a sparse-only strategy (SET, RigL, ...) in a free-form comparison that names none.
DEFAULT_SPARSE_DENSITY = 0.5


@dataclass(frozen=True)
class Arm:
    """One configuration to compare: a labelled strategy with its settings and benchmark overrides.

    ``bench`` holds this arm's full benchmark overrides (those shared by all arms included), so that an
    arm alone says how to reproduce it.
    """

    label: str
    strategy: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    bench: Mapping[str, Any] = field(default_factory=dict)
    grid: Mapping[str, Any] = field(default_factory=dict)  # the grid point this arm is (strategy fields)


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "benchmark": self.benchmark,
            "steps": self.steps,
            "seeds": list(self.seeds),
            "arms": [
                {"label": a.label, "strategy": a.strategy, "settings": dict(a.settings), "bench": dict(a.bench),
                 "grid": dict(a.grid)}
                for a in self.arms
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Comparison":
        arms = tuple(
            Arm(a["label"], a["strategy"], a.get("settings", {}), a.get("bench", {}), a.get("grid", {}))
            for a in data["arms"]
        )
        return cls(data["benchmark"], arms, tuple(data.get("seeds", ())), data.get("steps"),
                   name=data.get("name", "custom"))


@dataclass(frozen=True)
class ResolvedArm:
    """An arm with every setting resolved by dst's config classes (defaults included)."""

    arm: Arm
    settings: dict[str, Any]
    bench: dict[str, Any]
    steps: int | None = None  # the run length, resolved (the benchmark's default when the spec has none)

    @property
    def density(self) -> float:
        return float(self.bench.get("density", 1.0))


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


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ",".join(_format_value(v) for v in value)
    return str(value)


def arm_label(strategy: str, density: float, grid: Mapping[str, Any] | None = None, name: str | None = None) -> str:
    """``cbp replacement_rate=1e-05 (dense)`` / ``rigl (sparse 0.5)``: what it is and whether it is sparse."""
    parts = [name or strategy] + [f"{k}={_format_value(v)}" for k, v in (grid or {}).items()]
    kind = "dense" if density >= 1.0 else f"sparse {density:g}"
    return f"{' '.join(parts)} ({kind})"


def dir_name(label: str) -> str:
    """A file-name-safe form of an arm label.

    ``cbp replacement_rate=1e-05 (dense)`` -> ``cbp_replacement_rate=1e-05_dense``."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", label).strip("_") or "arm"


def _grid_values(strategy: str, key: str, text: str) -> list[Any]:
    """Parse one ``--grid STRATEGY.key=v1,v2`` value list (``;`` separates values of tuple fields)."""
    config_cls = strategies.get(strategy).config
    if key not in config_cls.field_names():
        raise ConfigError(
            f"--grid {strategy}.{key}: {config_cls.owner} has no setting {key!r}; "
            f"accepted: {', '.join(config_cls.field_names()) or '(none: it has no settings)'}"
        )
    kind = next(f["type"] for f in config_cls.describe() if f["name"] == key)
    separator = ";" if "tuple" in str(kind) else ","
    values = [v.strip() for v in text.split(separator) if v.strip()]
    if not values:
        raise ConfigError(f"--grid {strategy}.{key}: give at least one value, e.g. {key}=1e-5,1e-4")
    resolved = []
    for value in values:  # coerce and range-check each point on its own, naming the bad one
        try:
            resolved.append(config_cls.from_dict({key: value}).to_dict()[key])
        except ConfigError as err:
            raise ConfigError(f"--grid {strategy}.{key}={value}: {err}") from None
    return resolved


def expand_grid(arm: Arm, grid: Mapping[str, str], density: float, name: str | None = None) -> list[Arm]:
    """One arm per point of the cartesian product of ``grid`` (``{key: "v1,v2,..."}``) of ``arm.strategy``."""
    if not grid:
        return [arm]
    keys = list(grid)
    axes = [_grid_values(arm.strategy, key, grid[key]) for key in keys]
    arms = []
    for point in itertools.product(*axes):
        values = dict(zip(keys, point))
        arms.append(
            Arm(arm_label(arm.strategy, density, values, name), arm.strategy, {**arm.settings, **values},
                dict(arm.bench), values)
        )
    return arms


def _resolve(benchmark: str, arm: Arm) -> ResolvedArm:
    try:
        bench_config: Config = benchmarks.build(benchmark, **dict(arm.bench)).config
        settings_config: Config = strategies.config(arm.strategy, **dict(arm.settings))
    except ConfigError as err:
        raise ConfigError(f"arm {arm.label!r}: {err}") from None
    resolved = ResolvedArm(arm, jsonable(settings_config.to_dict()), jsonable(bench_config.to_dict()))
    if needs_sparse(arm.strategy) and resolved.density >= 1.0:
        raise ConfigError(
            f"arm {arm.label!r}: strategy {arm.strategy!r} refreshes connections and needs a sparse net; "
            f"give it a density, e.g. --bench {arm.strategy}.density=0.5"
        )
    return resolved


def _dry_build(benchmark: str, resolved: ResolvedArm) -> None:
    """Build the arm's learner and strategy once (no data, no training) so that errors show before any run."""
    import torch

    from dst.masked import sparsify

    arm = resolved.arm
    bench = benchmarks.build(benchmark, **dict(arm.bench))
    c = bench.config
    try:
        model = bench.make_model(torch.Generator().manual_seed(0))
        sparsify(model, c.density, c.distribution, dense_first=c.dense_first, dense_last=c.dense_last, seed=0)
        strategies.build(arm.strategy, model, bench.make_optimizer(model),
                         config=strategies.config(arm.strategy, **dict(arm.settings)), seed=0)
    except DSTError as err:
        raise ConfigError(f"arm {arm.label!r}: {err}") from None
    except Exception as err:  # noqa: BLE001 - the run itself will report anything dst does not name
        log.debug("dry build of %r skipped: %s", arm.label, err)


def _run_length(comparison: Comparison, resolved: ResolvedArm) -> int:
    """Open the arm's stream once (data files present? task length fixed?) and resolve its run length."""
    import torch

    bench = benchmarks.build(comparison.benchmark, **dict(resolved.arm.bench))
    try:
        stream = bench.make_stream(comparison.seeds[0], torch.device("cpu"))
        bench.bin_steps(stream)  # bin_size=0 (a row per task) needs tasks of fixed length
        return comparison.steps if comparison.steps is not None else bench.default_steps(stream)
    except DSTError as err:
        raise ConfigError(f"arm {resolved.arm.label!r}: {err}") from None


def validate(comparison: Comparison, *, dry_build: bool = True) -> list[ResolvedArm]:
    """Resolve and check every arm; a :class:`ConfigError` names the first problem found.

    With ``dry_build`` each distinct arm also builds its learner and strategy, and opens its stream once
    (so missing data shows now, not in every worker), which resolves the run length."""
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
    labels: dict[str, str] = {}
    for arm in comparison.arms:
        strategies.get(arm.strategy)  # unknown strategy -> ConfigError listing the available ones
        folder = dir_name(arm.label)
        if folder in labels:
            raise ConfigError(f"arms {labels[folder]!r} and {arm.label!r} would share the folder runs/{folder}; "
                              "give them distinct labels")
        labels[folder] = arm.label
    resolved = [_resolve(comparison.benchmark, arm) for arm in comparison.arms]
    if not dry_build:
        return [replace(item, steps=comparison.steps) for item in resolved]
    built: set[str] = set()
    lengths: dict[str, int] = {}
    for index, item in enumerate(resolved):
        key = json.dumps([item.arm.strategy, item.settings, item.bench], sort_keys=True)
        if key not in built:
            _dry_build(comparison.benchmark, item)
            built.add(key)
        bench_key = json.dumps(item.bench, sort_keys=True)
        if bench_key not in lengths:
            lengths[bench_key] = _run_length(comparison, item)
        resolved[index] = replace(item, steps=lengths[bench_key])
    return resolved


def split_prefixed(
    items: Iterable[str], option: str, allowed: Sequence[str]
) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Split ``key=value`` (all arms) and ``STRATEGY.key=value`` (one strategy's arms) assignments."""
    from dst.config import parse_assignments

    shared: dict[str, str] = {}
    per_strategy: dict[str, dict[str, str]] = {}
    for key, value in parse_assignments(items, f"{option} setting").items():
        prefix, dot, name = key.partition(".")
        if not dot:
            shared[key] = value
            continue
        check_strategy_prefix(prefix, f"{option} {key}={value}", allowed)
        per_strategy.setdefault(prefix, {})[name] = value
    return shared, per_strategy


def check_strategy_prefix(strategy: str, what: str, allowed: Sequence[str]) -> None:
    """``strategy`` must be one of the compared strategies; the message says which ones are."""
    if strategy not in allowed:
        known = "" if strategy in strategies.available() else " (no such strategy)"
        raise ConfigError(
            f"{what}: strategy {strategy!r}{known} is not compared here; compared: {', '.join(allowed)}"
        )
