"""A small name -> (class, config class) registry with entry-point plug-ins.

Used for refresh strategies (``dst.strategies``, entry-point group ``dst.strategies``) and benchmarks
(``dst.benchmarks``, group ``dst.benchmarks``). Third-party packages register by listing a module or a
class under the group in their ``pyproject.toml``; importing the module runs its ``@register`` calls.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Generic, TypeVar

from .config import Config
from .errors import ConfigError

__all__ = ["Registry", "Entry"]

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    cls: type[T]
    config: type[Config]

    @property
    def summary(self) -> str:
        doc = (self.cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


class Registry(Generic[T]):
    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind
        self.group = group
        self._entries: dict[str, Entry[T]] = {}
        self._plugins_loaded = False
        self._plugin_errors: dict[str, str] = {}

    def register(
        self, name: str, config: type[Config] | None = None, *, replace: bool = False
    ) -> Callable[[type[T]], type[T]]:
        """Class decorator: ``@strategies.register("cbp", CBPConfig)``.

        ``config`` defaults to the class attribute ``Config``. Registering a taken name is an error
        unless ``replace=True``.
        """

        def decorator(cls: type[T]) -> type[T]:
            config_cls = config if config is not None else getattr(cls, "Config", None)
            if config_cls is None or not (isinstance(config_cls, type) and issubclass(config_cls, Config)):
                raise ConfigError(
                    f"{self.kind} {name!r}: give a Config subclass (dst.config.Config) for its settings"
                )
            if name in self._entries and not replace and self._entries[name].cls is not cls:
                raise ConfigError(
                    f"{self.kind} name {name!r} is already registered by "
                    f"{self._entries[name].cls.__module__}.{self._entries[name].cls.__qualname__}; "
                    "choose another name or pass replace=True"
                )
            # Judge the class's own owner, not one inherited from a base registered elsewhere.
            own_owner = vars(config_cls).get("owner")
            if own_owner is None or own_owner.startswith(f"{self.kind} "):
                config_cls.owner = f"{self.kind} {name!r}"
            cls.name = name  # type: ignore[attr-defined]
            cls.Config = config_cls  # type: ignore[attr-defined]
            self._entries[name] = Entry(name, cls, config_cls)
            return cls

        return decorator

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def load_plugins(self, reload: bool = False) -> None:
        """Import every module or class listed under the entry-point group (once)."""
        if self._plugins_loaded and not reload:
            return
        self._plugins_loaded = True
        for point in metadata.entry_points(group=self.group):
            try:
                loaded = point.load()
            except Exception as err:  # a broken plug-in must not hide the others
                self._plugin_errors[point.name] = f"{type(err).__name__}: {err}"
                log.warning("could not load %s plug-in %r (%s): %s", self.kind, point.name, point.value, err)
                continue
            if isinstance(loaded, type) and point.name not in self._entries:
                self.register(point.name)(loaded)
            if point.name not in self._entries:  # a module whose import registered nothing by that name
                self._plugin_errors[point.name] = (
                    f"{point.value!r} loaded but registered no {self.kind} named {point.name!r}; point the "
                    f"entry point at the class, or register it with @register({point.name!r})"
                )
                log.warning("%s plug-in %r: %s", self.kind, point.name, self._plugin_errors[point.name])

    def get(self, name: str) -> Entry[T]:
        self.load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            hint = ""
            if name in self._plugin_errors:
                hint = f" (its plug-in failed: {self._plugin_errors[name]})"
            raise ConfigError(
                f"unknown {self.kind} {name!r}{hint}; available: {', '.join(self.available())}"
            ) from None

    def available(self, pattern: str = "*") -> list[str]:
        self.load_plugins()
        return sorted(name for name in self._entries if fnmatch.fnmatch(name, pattern))

    def config(self, name: str, overrides: dict[str, Any] | None = None) -> Config:
        """The validated config of ``name`` with ``overrides`` applied."""
        return self.get(name).config.from_dict(overrides or {})

    def __contains__(self, name: str) -> bool:
        self.load_plugins()
        return name in self._entries
