"""The refresh-strategy registry: ``register``, ``build``, ``available``.

    strategy = dst.strategies.build("bp", model, optimizer)
    strategy = dst.strategies.build("cbp", model, optimizer, replacement_rate=1e-5)

Strategies are registered with ``@dst.strategies.register("name")`` on a
:class:`dst.refresh.RefreshStrategy` subclass whose ``Config`` attribute is its frozen config
dataclass. Third-party packages add theirs through the entry-point group ``dst.strategies``::

    [project.entry-points."dst.strategies"]
    my_strategy = "my_package.strategy"      # a module whose import registers, or a class
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from .config import Config
from .errors import ConfigError
from .registry import Entry, Registry

if TYPE_CHECKING:
    import torch

    from .refresh import RefreshStrategy
    from .topology import Topology

__all__ = ["register", "build", "available", "get", "config", "registry"]

registry: Registry = Registry("strategy", "dst.strategies")
register = registry.register
available = registry.available
get = registry.get


def config(name: str, **overrides: Any) -> Config:
    """The validated config of strategy ``name`` with ``overrides`` applied."""
    return registry.config(name, overrides)


def build(
    name: str,
    model: "nn.Module | Topology",
    optimizer: "torch.optim.Optimizer",
    *,
    config: "Config | Sequence[Config] | None" = None,
    seed: "int | Sequence[int] | None" = None,
    **overrides: Any,
) -> "RefreshStrategy":
    """Build a registered strategy on ``model`` (or its :class:`dst.Topology`) and ``optimizer``.

    Settings come from ``config`` (one for every member, or one per member) or from keyword
    ``overrides`` of the defaults, not both. ``seed`` (one, or one per member) keys the strategy's random
    numbers (default: drawn from torch's global RNG).
    """
    entry: Entry = registry.get(name)
    if config is not None:
        if overrides:
            raise ConfigError(f"strategy {name!r}: pass either config= or keyword settings, not both")
        for item in [config] if isinstance(config, Config) else config:
            if not isinstance(item, entry.config):
                raise ConfigError(f"strategy {name!r} takes a {entry.config.__name__}, got {type(item).__name__}")
    else:
        config = entry.config.from_dict(overrides)
    return entry.cls(model, optimizer, config, seed=seed)
