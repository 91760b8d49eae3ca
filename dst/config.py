"""Frozen, validated configuration dataclasses.

Every strategy and benchmark declares its settings as a frozen dataclass derived from :class:`Config`.
Fields are declared with :func:`setting`, which records the valid range, the allowed choices and the
Optuna search range as field metadata. That one declaration is the source of truth for validation,
the command line (``--set key=value``), the listing of ``python -m dst strategies``, studies' search
spaces and the columns of result tables.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from .errors import ConfigError

__all__ = ["Config", "setting", "parse_assignments", "is_numeric_setting"]

_MISSING = dataclasses.MISSING


def setting(
    default: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: Sequence[Any] | None = None,
    search: tuple[float, float] | Sequence[Any] | None = None,
    log: bool = False,
    help: str = "",
) -> Any:
    """Declare a config field with its valid range and optional search range.

    ``low``/``high`` bound numeric values (closed unless ``low_open``/``high_open``); ``choices``
    restricts to a set; ``search`` is the default tuning range (``log`` for log-uniform).
    """
    metadata = {
        "low": low,
        "high": high,
        "low_open": low_open,
        "high_open": high_open,
        "choices": tuple(choices) if choices is not None else None,
        "search": tuple(search) if search is not None else None,
        "log": log,
        "help": help,
    }
    return dataclasses.field(default=default, metadata=metadata)


def is_numeric_setting(value: Any) -> bool:
    """Whether a setting's value is a number (members of a population may differ only in these)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe_range(meta: Mapping[str, Any]) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    low, high = meta.get("low"), meta.get("high")
    if low is None and high is None:
        return ""
    left = "(" if meta.get("low_open") else "["
    right = ")" if meta.get("high_open") else "]"
    return f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


def _parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    number = float(value)  # accepts "1e6"
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"expected an integer, got {value!r}")
    return int(number)


def _coerce(kind: Any, value: Any) -> Any:
    """Convert ``value`` (possibly a command-line string) to the field type ``kind``."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if len(non_none) < len(args):
                return None
        return _coerce(non_none[0], value)
    if origin is tuple:
        element = args[0] if args else str
        if isinstance(value, str):
            parts = [p for p in value.replace(" ", "").split(",") if p != ""]
        elif isinstance(value, Iterable):
            parts = list(value)
        else:
            parts = [value]
        return tuple(_coerce(element, p) for p in parts)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return _parse_bool(value)
        if value in (0, 1):
            return bool(value)
        raise ValueError(f"expected a boolean, got {value!r}")
    if kind is int:
        return _parse_int(value)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value
    return value


def parse_assignments(items: Iterable[str], what: str = "setting") -> dict[str, str]:
    """Turn ``["key=value", ...]`` (repeated ``--set``) into a dict; a malformed item is an error."""
    result: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"malformed {what} {item!r}: write it as key=value")
        key = key.strip()
        if key in result:
            raise ConfigError(f"{what} {key!r} given twice")
        result[key] = value.strip()
    return result


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every strategy and benchmark config: typed, frozen, validated on construction."""

    #: What the config belongs to, used in error messages ("strategy 'cbp'").
    owner: ClassVar[str] = "config"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            try:
                value = _coerce(hints[field.name], value)
            except (TypeError, ValueError) as err:
                raise ConfigError(
                    f"{self.owner}: bad value {value!r} for {field.name!r}: {err}"
                ) from None
            object.__setattr__(self, field.name, value)
            self._check_range(field, value)
        self.validate()

    def _check_range(self, field: dataclasses.Field, value: Any) -> None:
        meta = field.metadata
        if not meta:
            return
        values = value if isinstance(value, tuple) else (value,)
        for item in values:
            if item is None:
                continue
            ok = True
            if meta.get("choices") is not None:
                ok = item in meta["choices"]
            elif isinstance(item, (int, float)) and not isinstance(item, bool):
                if math.isnan(item):
                    ok = False
                low, high = meta.get("low"), meta.get("high")
                if low is not None and (item < low or (meta.get("low_open") and item == low)):
                    ok = False
                if high is not None and (item > high or (meta.get("high_open") and item == high)):
                    ok = False
            if not ok:
                raise ConfigError(
                    f"{self.owner}: {field.name}={item!r} is out of range; "
                    f"it must be {_describe_range(meta)}"
                )

    def validate(self) -> None:
        """Cross-field checks; subclasses override and raise :class:`ConfigError`."""

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None = None, **more: Any):
        """Build from overrides; an unknown key is an error that lists the accepted keys."""
        merged = dict(values or {})
        merged.update(more)
        accepted = cls.field_names()
        unknown = sorted(set(merged) - set(accepted))
        if unknown:
            listing = ", ".join(accepted) if accepted else "(none: it has no settings)"
            raise ConfigError(
                f"{cls.owner}: unknown setting{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(repr(u) for u in unknown)}; accepted: {listing}"
            )
        return cls(**merged)

    def replace(self, **changes: Any):
        return self.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """One record per field: name, type, default, valid range, search range, help."""
        hints = typing.get_type_hints(cls)
        rows = []
        for field in dataclasses.fields(cls):
            meta = field.metadata or {}
            kind = hints[field.name]
            rows.append(
                {
                    "name": field.name,
                    "type": getattr(kind, "__name__", str(kind).replace("typing.", "")),
                    "default": field.default,
                    "range": _describe_range(meta) if meta else "",
                    "search": meta.get("search"),
                    "log": meta.get("log", False),
                    "help": meta.get("help", ""),
                }
            )
        return rows
