"""The command line's ``--bench``/``--set``/``--grid`` assignments, applied to a comparison's arm templates.

``--bench key=value`` applies to every arm, ``--bench NAME.key=value`` / ``--set NAME.key=value`` /
``--grid NAME.key=v1,v2`` to the arms whose strategy or template name is NAME; a grid makes one arm per
point of the cartesian product of its values, each value checked on its own before any run.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from dst import strategies
from dst.config import parse_assignments
from dst.errors import ConfigError

from .spec import Arm

__all__ = ["build_arms"]


def _by_target(items: Iterable[str], option: str, allowed: Sequence[str]) -> dict[str | None, dict[str, str]]:
    """``key=value`` (target None: every arm) and ``NAME.key=value`` (target NAME: the arms of that
    strategy or template name, which must be compared) assignments of ``option``, by target."""
    targets: dict[str | None, dict[str, str]] = {}
    for key, value in parse_assignments(items, f"{option} setting").items():
        prefix, dot, name = key.partition(".")
        if dot and prefix not in allowed:
            known = "" if prefix in strategies.available() else " (no such strategy)"
            raise ConfigError(f"{option} {key}={value}: strategy {prefix!r}{known} is not compared here; "
                              f"compared: {', '.join(allowed)}")
        target, setting = (prefix, name) if dot else (None, key)
        targets.setdefault(target, {})[setting] = value
    return targets


def _aimed_at(template: Arm, targets: Mapping[str | None, Mapping[str, str]]) -> dict[str, str]:
    """The assignments aimed at ``template``: its strategy's, then its name's (which win)."""
    return {k: v for n in dict.fromkeys((template.strategy, template.name)) for k, v in targets.get(n, {}).items()}


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


def _expand_grid(arm: Arm, grid: Mapping[str, str]) -> list[Arm]:
    """One arm per point of the cartesian product of ``grid`` (``{key: "v1,v2,..."}``) of ``arm.strategy``."""
    if not grid:
        return [arm]
    axes = [_grid_values(arm.strategy, key, text) for key, text in grid.items()]
    points = [dict(zip(grid, point)) for point in itertools.product(*axes)]
    return [replace(arm, settings={**arm.settings, **point}, grid=point) for point in points]


def build_arms(templates: Sequence[Arm], bench: Sequence[str] = (), sets: Sequence[str] = (),
               grids: Sequence[str] = ()) -> tuple[Arm, ...]:
    """Apply ``--bench``, ``--set`` and ``--grid`` assignments to the arm ``templates``.

    ``--bench key=value`` applies to every arm, ``--bench NAME.key=value`` / ``--set NAME.key=value`` /
    ``--grid NAME.key=v1,v2`` to the arms whose strategy or template name is NAME (the name's win over the
    strategy's, and either over the shared ``--bench``). Grid values are checked one by one here; the
    other settings when :func:`~comparisons.spec.resolve` resolves each arm.
    """
    allowed = list(dict.fromkeys([t.strategy for t in templates] + [t.name for t in templates]))
    bench_for = _by_target(bench, "--bench", allowed)
    sets_for, grids_for = _by_target(sets, "--set", allowed), _by_target(grids, "--grid", allowed)
    for option, targets, example in (("--set", sets_for, "..."), ("--grid", grids_for, "1e-5,1e-4")):
        if None in targets:  # a strategy setting for every arm: the arms' strategies differ
            key, value = next(iter(targets[None].items()))
            raise ConfigError(f"{option} {key}={value}: name the strategy, e.g. {option} cbp.{key}={example}")
    arms: list[Arm] = []
    for template in templates:
        base = replace(template, settings={**template.settings, **_aimed_at(template, sets_for)},
                       bench={**template.bench, **bench_for.get(None, {}), **_aimed_at(template, bench_for)})
        arms.extend(_expand_grid(base, _aimed_at(template, grids_for)))
    return tuple(arms)
