"""The refresh-strategy protocol, plain backprop and composition of strategies.

A training step with a strategy reads::

    loss.backward()
    strategy.before_step()    # read dense gradients (RigL), then zero masked gradients
    optimizer.step()
    strategy.after_step()     # drop / regrow connections, re-initialise units

The unit surgery the unit-level strategies share is in :mod:`dst.surgery`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from . import strategies
from .config import Config, is_numeric_setting
from .errors import ConfigError
from .population import MemberRandom, check_seeds
from .population import members as population_size
from .topology import Topology

__all__ = [
    "RefreshStrategy",
    "RefreshStats",
    "NO_REFRESH",
    "StrategyConfig",
    "Backprop",
    "CompositeStrategy",
    "compose",
]


_RANDOM = 21  # seed-derivation key of a strategy's random numbers


@dataclass(frozen=True)
class RefreshStats:
    """What one ``after_step`` changed, per member: arrays of shape (S,) (an int counts for every member)."""

    units_replaced: np.ndarray | int = 0
    connections_regrown: np.ndarray | int = 0


#: Returned by steps that change nothing (no allocation on the hot path).
NO_REFRESH = RefreshStats()


@dataclass(frozen=True)
class StrategyConfig(Config):
    """Base of strategy configs."""


class RefreshStrategy:
    """Base class: masks gradients before the step, counts steps, checkpoints its state.

    Subclasses override :meth:`after_step` (calling ``super().after_step()`` first) and extend
    :meth:`state_dict` / :meth:`load_state_dict` with their own tensors.

    A strategy refreshes a population of ``self.members`` learners (1 for a plain model). ``seed`` is one
    seed or one per member; ``config`` one config for all members or one per member, which may differ
    only in numeric settings (:meth:`per_member` gives them as an array). ``self.random`` draws each
    member's random numbers (``dst.population.MemberRandom``), keyed by the step, so a member's draws
    do not depend on the population it is in.
    """

    name: ClassVar[str] = "base"
    Config: ClassVar[type[Config]] = StrategyConfig

    def __init__(
        self,
        model: nn.Module | Topology,
        optimizer: torch.optim.Optimizer | None,
        config: Config | Sequence[Config] | None = None,
        *,
        seed: int | Sequence[int] | None = None,
    ) -> None:
        self.topology = model if isinstance(model, Topology) else Topology.from_model(model)
        self.model = self.topology.model
        self.optimizer = optimizer
        self.members = population_size(self.model)
        self.configs = self._member_configs(config)
        self.config = self.configs[0]
        self.step = 0
        self.total_steps: int | None = None
        self.steps_per_task: int | None = None
        self.masked = self.topology.masked_layers()
        parameter = next(self.model.parameters(), None)
        self.device = parameter.device if parameter is not None else torch.device("cpu")
        if seed is None:
            seed = [int(v) for v in torch.randint(0, 2**62, (self.members,))]
        self.seeds = check_seeds(seed)
        if len(self.seeds) != self.members:
            raise ConfigError(
                f"strategy {self.name!r}: {len(self.seeds)} seeds for a population of {self.members} members; "
                "give one seed per member"
            )
        self.random = MemberRandom.derived(self.seeds, _RANDOM, device=self.device)

    def _member_configs(self, config: Config | Sequence[Config] | None) -> tuple[Config, ...]:
        expected = type(self).Config
        if config is None:
            config = expected()
        configs = (config,) * self.members if isinstance(config, Config) else tuple(config)
        if len(configs) != self.members:
            raise ConfigError(
                f"strategy {self.name!r}: {len(configs)} configs for a population of {self.members} members"
            )
        for item in configs:
            if not isinstance(item, expected):
                raise ConfigError(f"strategy {self.name!r} takes a {expected.__name__}, got {type(item).__name__}")
        first = configs[0]
        for key in first.field_names():
            values = {getattr(item, key) for item in configs}
            if len(values) > 1 and not all(is_numeric_setting(value) for value in values):
                raise ConfigError(
                    f"strategy {self.name!r}: members differ in {key!r} ({sorted(map(repr, values))}), which "
                    "is not numeric; members of a population differ only in numeric settings, so run another "
                    "population for each value"
                )
        return configs

    def per_member(self, key: str) -> np.ndarray:
        """Setting ``key`` of every member, shape (S,) (float64, or int64 for an integer setting)."""
        values = [getattr(config, key) for config in self.configs]
        return np.asarray(values, dtype=np.int64 if isinstance(values[0], int) else np.float64)

    def shared(self, key: str) -> bool:
        """Whether every member has the same value of setting ``key``."""
        return len({getattr(config, key) for config in self.configs}) == 1

    #: Whether :meth:`refreshes_at` names the steps at which the strategy touches the masked layers; a sparse
    #: backend (``dst.backends``) keeps layers compact on the others. False: it may at any step.
    knows_refresh_steps: ClassVar[bool] = False

    def refreshes_at(self, step: int) -> bool:
        """Whether at (1-based) step ``step`` the strategy reads or changes weights, masks, dense gradients or
        optimizer state (beyond masking gradients). The base class answers yes at every step."""
        return True

    def before_step(self) -> None:
        """After backward, before ``optimizer.step()``: zero the gradient at masked positions."""
        for layer in self.masked:
            layer.mask_grad()

    def after_step(self) -> RefreshStats:
        """After ``optimizer.step()``: refresh the topology. The base class only counts the step."""
        self.step += 1
        return NO_REFRESH

    def on_task_start(self, task: int) -> None:
        """Called by the experiment loop before the first step of each task (task 0 included)."""

    def set_horizon(self, total_steps: int | None, steps_per_task: int | None = None) -> None:
        """Tell the strategy how long the run and its tasks are (schedules such as RigL's T_end use it).

        The experiment loop calls it before the first step; library users call it themselves when a
        schedule depends on the run length.
        """
        self.total_steps = total_steps
        self.steps_per_task = steps_per_task

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


@dataclass(frozen=True)
class BackpropConfig(StrategyConfig):
    """Plain backprop has no settings of its own (optimizer settings belong to the benchmark)."""


@strategies.register("bp")
class Backprop(RefreshStrategy):
    """Plain backpropagation: no refresh (masks of a sparse net stay fixed: static sparse training)."""

    Config = BackpropConfig
    knows_refresh_steps = True

    def refreshes_at(self, step: int) -> bool:
        return False


# -- composition ------------------------------------------------------------------------------


class CompositeStrategy(RefreshStrategy):
    """Several registered strategies refreshing one model together (e.g. RigL connections + CBP units).

    Parts run in the order given: put connection-level strategies first, so RigL reads the dense
    gradient in its ``before_step`` before any part masks it. Built by :func:`compose`.
    """

    part_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model, optimizer, config=None, *, seed: int | None = None) -> None:
        from .streams.base import derive_seed

        super().__init__(model, optimizer, config, seed=seed)
        self.parts: list[RefreshStrategy] = []
        for index, name in enumerate(self.part_names):
            entry = strategies.get(name)
            configs = [
                entry.config.from_dict({key: getattr(config, key) for key in entry.config.field_names()})
                for config in self.configs
            ]
            seeds = [derive_seed(member_seed, index) for member_seed in self.seeds]
            self.parts.append(entry.cls(self.topology, optimizer, configs, seed=seeds))
        self.knows_refresh_steps = all(part.knows_refresh_steps for part in self.parts)  # type: ignore[misc]

    def refreshes_at(self, step: int) -> bool:
        return any(part.refreshes_at(step) for part in self.parts)

    def before_step(self) -> None:
        for part in self.parts:
            part.before_step()

    def after_step(self) -> RefreshStats:
        super().after_step()
        stats = [part.after_step() for part in self.parts]
        changed = [item for item in stats if item is not NO_REFRESH]
        if not changed:
            return NO_REFRESH
        units = sum((np.asarray(item.units_replaced) for item in changed), np.zeros(self.members, np.int64))
        connections = sum((np.asarray(item.connections_regrown) for item in changed), np.zeros(self.members, np.int64))
        return RefreshStats(units, connections)

    def on_task_start(self, task: int) -> None:
        for part in self.parts:
            part.on_task_start(task)

    def set_horizon(self, total_steps: int | None, steps_per_task: int | None = None) -> None:
        super().set_horizon(total_steps, steps_per_task)
        for part in self.parts:
            part.set_horizon(total_steps, steps_per_task)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for part, saved in zip(self.parts, state["parts"]):
            part.load_state_dict(saved)


def compose(name: str, *parts: str, summary: str = "") -> type[CompositeStrategy]:
    """Register strategy ``name`` that runs the registered ``parts`` together.

    Its config holds every field of the parts' configs (a field name used by two parts is an error),
    so ``--set`` and studies reach each part's settings by their usual names.
    """
    import dataclasses
    import typing

    fields = []
    owners: dict[str, str] = {}
    for part in parts:
        config_cls = strategies.get(part).config
        hints = typing.get_type_hints(config_cls)
        for field in dataclasses.fields(config_cls):
            if field.name in owners:
                raise ConfigError(
                    f"cannot compose {name!r}: setting {field.name!r} belongs to both "
                    f"{owners[field.name]!r} and {part!r}"
                )
            owners[field.name] = part
            fields.append(
                (field.name, hints[field.name], dataclasses.field(default=field.default, metadata=field.metadata))
            )
    class_name = "".join(piece.capitalize() for piece in name.replace("-", " ").split())
    config_cls = dataclasses.make_dataclass(f"{class_name}Config", fields, bases=(StrategyConfig,), frozen=True)
    doc = summary or f"{' + '.join(parts)} refreshing one model together."
    strategy_cls = type(class_name, (CompositeStrategy,), {"__doc__": doc, "part_names": tuple(parts)})
    return strategies.register(name, config_cls)(strategy_cls)
