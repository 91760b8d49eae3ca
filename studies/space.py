"""Search spaces from config metadata, with command-line overrides, validated before any trial runs.

A strategy's config fields declare their Optuna range (``dst.setting(search=..., log=...)``), so any
registered strategy, a third-party one included, is tunable without code here. By default every
strategy field with a ``search`` range is tuned. ``--param`` overrides one field:

    replacement_rate=1e-6:1e-3:log     numeric range (an int field samples integers), optionally log
    utility=contribution,adaptable_contribution     categorical
    decay_rate=0.99                    fixed, not tuned
    bench.density=0.05:0.5             a benchmark setting (prefix ``bench.``); bare ``bench.lr``
                                       tunes it over its declared range

``--only a,b`` tunes exactly those fields. A range outside a field's valid range, an unknown field, or
a field both fixed and tuned is a :class:`dst.errors.ConfigError` before the study starts.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import optuna

from dst import benchmarks, strategies
from dst.config import Config
from dst.errors import ConfigError

__all__ = ["Param", "SearchSpace", "build_space", "BENCH_PREFIX"]

BENCH_PREFIX = "bench."


@dataclasses.dataclass(frozen=True)
class Param:
    """One tuned field: ``float``/``int`` over ``[low, high]`` (log-uniform with ``log``) or categorical."""

    name: str  # "replacement_rate", or "bench.density" for a benchmark setting
    kind: str  # "float", "int" or "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices or ()))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)  # type: ignore[arg-type]
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)  # type: ignore[arg-type]

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.name}: one of {', '.join(repr(c) for c in self.choices or ())}"
        return f"{self.name}: {self.kind} in [{self.low}, {self.high}]{' (log)' if self.log else ''}"


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """What a trial samples (``params``) and what it holds fixed (strategy ``settings``, ``bench``)."""

    params: tuple[Param, ...]
    settings: dict[str, Any]
    bench: dict[str, Any]

    def sample(self, trial: optuna.Trial) -> tuple[dict[str, Any], dict[str, Any]]:
        """The trial's strategy settings and benchmark settings: fixed values plus sampled ones."""
        settings, bench = dict(self.settings), dict(self.bench)
        for param in self.params:
            value = param.suggest(trial)
            if param.name.startswith(BENCH_PREFIX):
                bench[param.name[len(BENCH_PREFIX):]] = value
            else:
                settings[param.name] = value
        return settings, bench

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form, recorded in the study's user attrs (tuples become lists)."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SearchSpace":
        params = tuple(
            Param(**{**p, "choices": tuple(p["choices"]) if p.get("choices") is not None else None})
            for p in data["params"]
        )
        return cls(params, dict(data["settings"]), dict(data["bench"]))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str  # as the user writes it (with bench. prefix)
    key: str  # the config field name
    type: Any
    meta: Mapping[str, Any]
    valid: str  # the valid range in words, from Config.describe()
    owner: type[Config]


def _fields(config: type[Config], prefix: str) -> dict[str, _Field]:
    hints = typing.get_type_hints(config)
    ranges = {row["name"]: row["range"] for row in config.describe()}
    result = {}
    for field in dataclasses.fields(config):
        kind = hints[field.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) is not None and typing.get_origin(kind) is not tuple and len(args) == 1:
            kind = args[0]  # Optional[X] -> X
        result[prefix + field.name] = _Field(
            prefix + field.name, field.name, kind, field.metadata or {}, ranges[field.name] or "any value", config
        )
    return result


def _coerce(field: _Field, value: Any, fixed: Mapping[str, Any]) -> Any:
    """``value`` converted to the field's type and checked against its valid range (by the config)."""
    try:
        config = field.owner.from_dict({**fixed, field.key: value})
    except ConfigError as err:
        raise ConfigError(f"--param {field.name}: {err}") from None
    return getattr(config, field.key)


def _numeric_range(field: _Field, spec: str, fixed: Mapping[str, Any]) -> Param:
    parts = spec.split(":")
    log = len(parts) == 3 and parts[2].strip().lower() == "log"
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2].strip().lower() not in ("log", "linear")):
        raise ConfigError(f"--param {field.name}={spec}: write a range as low:high or low:high:log")
    return _range(field, parts[0], parts[1], log, fixed, spec)


def _range(field: _Field, low: Any, high: Any, log: bool, fixed: Mapping[str, Any], spec: str) -> Param:
    if typing.get_origin(field.type) is tuple:
        raise ConfigError(
            f"--param {field.name}={spec}: {field.name} holds a tuple of values and cannot be tuned; "
            f"fix it instead (--bench {field.key}=... or --param {field.name}=...)"
        )
    if field.type not in (int, float):
        raise ConfigError(
            f"--param {field.name}={spec}: a low:high range needs a numeric field, and {field.name} is "
            f"{getattr(field.type, '__name__', field.type)}; give its choices as a,b,c instead"
        )
    try:
        low_value, high_value = float(low), float(high)
    except (TypeError, ValueError):
        raise ConfigError(f"--param {field.name}={spec}: low and high must be numbers") from None
    for bound in (low_value, high_value):
        try:
            field.owner.from_dict({**fixed, field.key: int(bound) if field.type is int else bound})
        except ConfigError:
            raise ConfigError(
                f"--param {field.name}={spec}: the search range [{low_value:g}, {high_value:g}] lies outside "
                f"the valid range of {field.name}, which is {field.valid}"
            ) from None
    if field.type is int and (low_value != int(low_value) or high_value != int(high_value)):
        raise ConfigError(f"--param {field.name}={spec}: {field.name} is an integer field; give integer bounds")
    if not low_value < high_value:
        raise ConfigError(f"--param {field.name}={spec}: low must be below high (to fix a value, give just one)")
    if log and low_value <= 0:
        raise ConfigError(f"--param {field.name}={spec}: a log range needs low > 0")
    if field.type is int:
        return Param(field.name, "int", int(low_value), int(high_value), log)
    return Param(field.name, "float", low_value, high_value, log)


def _declared(field: _Field, fixed: Mapping[str, Any]) -> Param:
    """The field's own search range from its metadata."""
    search = field.meta.get("search")
    if search is None:
        raise ConfigError(
            f"{field.name} declares no search range; give one: --param {field.name}=low:high "
            "(or a,b,c for choices)"
        )
    if field.type in (int, float) and not field.meta.get("choices") and len(search) == 2:
        spec = f"{search[0]}:{search[1]}" + (":log" if field.meta.get("log") else "")
        return _range(field, search[0], search[1], bool(field.meta.get("log")), fixed, spec)
    return Param(field.name, "categorical", choices=tuple(_coerce(field, c, fixed) for c in search))


def _split(items: Iterable[str]) -> dict[str, str | None]:
    result: dict[str, str | None] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        name = name.strip()
        if not name:
            raise ConfigError(f"malformed --param {item!r}: write it as name=low:high, name=a,b,c or name=value")
        if name in result:
            raise ConfigError(f"--param {name} given twice")
        result[name] = spec.strip() if sep else None
    return result


def build_space(
    strategy: str,
    benchmark: str,
    params: Sequence[str] = (),
    only: Sequence[str] | None = None,
    bench: Mapping[str, Any] | None = None,
) -> SearchSpace:
    """The validated search space of ``strategy`` on ``benchmark`` (see the module docstring)."""
    strategy_config = strategies.get(strategy).config
    bench_entry = benchmarks.get(benchmark)
    fields = {**_fields(strategy_config, ""), **_fields(bench_entry.config, BENCH_PREFIX)}
    fixed_bench = dict(bench or {})
    overrides = _split(params)
    wanted = [n.strip() for n in only if n.strip()] if only is not None else None
    for name in [*overrides, *(wanted or [])]:
        if name not in fields:
            strategy_names = [n for n in fields if not n.startswith(BENCH_PREFIX)]
            bench_names = [n for n in fields if n.startswith(BENCH_PREFIX)]
            raise ConfigError(
                f"unknown parameter {name!r} for strategy {strategy!r} on benchmark {benchmark!r}; accepted: "
                f"{', '.join(strategy_names) or '(the strategy has no settings)'}; "
                f"benchmark settings: {', '.join(bench_names)}"
            )
    fixed_settings: dict[str, Any] = {}
    ranges: dict[str, str | None] = {}
    for name, spec in overrides.items():
        field = fields[name]
        if spec is not None and ":" not in spec and ("," not in spec or field.type not in (int, float, bool, str)):
            target = fixed_bench if name.startswith(BENCH_PREFIX) else fixed_settings
            target[field.key] = spec  # a single value: fixed, not tuned (coerced below)
        else:
            ranges[name] = spec
    for name in ranges:
        if name.startswith(BENCH_PREFIX) and fields[name].key in fixed_bench:
            raise ConfigError(f"{name} is both fixed (--bench) and tuned (--param); give one of them")
    benchmarks.build(benchmark, **fixed_bench)  # validates --bench (a preset included)
    settings_values = strategy_config.from_dict(fixed_settings).to_dict()
    fixed_settings = {k: settings_values[k] for k in fixed_settings}
    checks = {k: v for k, v in fixed_bench.items() if k != "preset"}  # presets are not fields
    bench_values = bench_entry.config.from_dict(checks).to_dict()
    fixed_bench = {k: (v if k == "preset" else bench_values[k]) for k, v in fixed_bench.items()}
    checks = {k: v for k, v in fixed_bench.items() if k != "preset"}
    if wanted is not None:
        extra = sorted(set(ranges) - set(wanted))
        if extra:
            raise ConfigError(f"--param gives a range for {', '.join(extra)}, which --only leaves out")
        tuned = wanted
    else:
        declared = [n for n, f in fields.items() if not n.startswith(BENCH_PREFIX) and f.meta.get("search")]
        tuned = [n for n in declared if fields[n].key not in fixed_settings] + [n for n in ranges if n not in declared]
    result = []
    for name in tuned:
        field = fields[name]
        fixed = checks if name.startswith(BENCH_PREFIX) else fixed_settings
        if field.key in fixed:
            raise ConfigError(f"{name} is both fixed and listed in --only; give one of them")
        spec = ranges.get(name)
        if spec is None:
            result.append(_declared(field, fixed))
        elif ":" in spec:
            result.append(_numeric_range(field, spec, fixed))
        else:
            choices = tuple(dict.fromkeys(_coerce(field, c.strip(), fixed) for c in spec.split(",") if c.strip()))
            if len(choices) < 2:
                raise ConfigError(f"--param {name}={spec}: give at least two distinct choices")
            result.append(Param(name, "categorical", choices=choices))
    if not result:
        raise ConfigError(
            f"nothing to tune: strategy {strategy!r} has no setting with a declared search range left; "
            "name some with --param NAME=low:high (benchmark settings too, e.g. --param bench.lr)"
        )
    return SearchSpace(tuple(result), fixed_settings, fixed_bench)
