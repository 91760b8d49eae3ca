"""The refresh-strategy protocol and the surgery every strategy shares.

A training step with a strategy reads::

    loss.backward()
    strategy.before_step()    # read dense gradients (RigL), then zero masked gradients
    optimizer.step()
    strategy.after_step()     # drop / regrow connections, re-initialise units

Surgery on hidden units (:func:`replace_units` and its parts) re-initialises incoming rows while
respecting the mask, zeroes outgoing columns (a conv channel's whole block of consumer columns), folds
the unit's mean contribution into the consumer's bias, and zeroes the optimizer state at exactly those
positions. Unit-level strategies (CBP, ReDo) call it; none copies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from . import strategies
from .config import Config
from .errors import ConfigError
from .init import fans, init_bound
from .optim import reset_optimizer_state
from .topology import HiddenLayer, Topology

__all__ = [
    "RefreshStrategy",
    "RefreshStats",
    "NO_REFRESH",
    "StrategyConfig",
    "Backprop",
    "reinit_incoming",
    "zero_outgoing",
    "fold_into_consumer_bias",
    "reset_unit_optimizer_state",
    "reset_unit_norm",
    "replace_units",
    "CompositeStrategy",
    "compose",
]


@dataclass(frozen=True)
class RefreshStats:
    """What one ``after_step`` changed."""

    units_replaced: int = 0
    connections_regrown: int = 0


#: Returned by steps that change nothing (no allocation on the hot path).
NO_REFRESH = RefreshStats()


@dataclass(frozen=True)
class StrategyConfig(Config):
    """Base of strategy configs."""


class RefreshStrategy:
    """Base class: masks gradients before the step, counts steps, checkpoints its state.

    Subclasses override :meth:`after_step` (calling ``super().after_step()`` first) and extend
    :meth:`state_dict` / :meth:`load_state_dict` with their own tensors. ``self.generator`` is the
    strategy's own random generator on the model's device, seeded from ``seed``.
    """

    name: ClassVar[str] = "base"
    Config: ClassVar[type[Config]] = StrategyConfig

    def __init__(
        self,
        model: nn.Module | Topology,
        optimizer: torch.optim.Optimizer,
        config: Config | None = None,
        *,
        seed: int | None = None,
    ) -> None:
        self.topology = model if isinstance(model, Topology) else Topology.from_model(model)
        self.model = self.topology.model
        self.optimizer = optimizer
        if config is None:
            config = type(self).Config()
        if not isinstance(config, type(self).Config):
            raise ConfigError(
                f"strategy {self.name!r} takes a {type(self).Config.__name__}, got {type(config).__name__}"
            )
        self.config = config
        self.step = 0
        self.total_steps: int | None = None
        self.steps_per_task: int | None = None
        self.masked = self.topology.masked_layers()
        parameter = next(self.model.parameters(), None)
        self.device = parameter.device if parameter is not None else torch.device("cpu")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

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
        return {"step": self.step, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.generator.set_state(state["generator"].cpu())


@dataclass(frozen=True)
class BackpropConfig(StrategyConfig):
    """Plain backprop has no settings of its own (optimizer settings belong to the benchmark)."""


@strategies.register("bp")
class Backprop(RefreshStrategy):
    """Plain backpropagation: no refresh (masks of a sparse net stay fixed: static sparse training)."""

    Config = BackpropConfig


# -- surgery ----------------------------------------------------------------------------------


@torch.no_grad()
def reinit_incoming(
    layer: HiddenLayer,
    units: torch.Tensor,
    init: str = "kaiming",
    gain: float = 1.0,
    generator: torch.Generator | None = None,
) -> None:
    """Draw the units' incoming weights afresh from U(-b, b) (masked entries stay 0) and zero their bias.

    The bound uses the layer's dense fan-in, as the initial weights did.
    """
    weight = layer.producer.weight
    fan_in, fan_out = fans(weight.shape)
    bound = init_bound(init, fan_in, fan_out, gain)
    fresh = torch.empty((units.numel(), *weight.shape[1:]), device=weight.device, dtype=weight.dtype)
    fresh.uniform_(-bound, bound, generator=generator)
    mask = getattr(layer.producer, "mask", None)
    if mask is not None:
        fresh.mul_(mask[units])
    weight[units] = fresh
    if layer.producer.bias is not None:
        layer.producer.bias[units] = 0


@torch.no_grad()
def zero_outgoing(layer: HiddenLayer, units: torch.Tensor) -> None:
    """Zero the consumer's input columns fed by ``units`` (a conv channel's whole block)."""
    layer.consumer.weight[:, layer.consumer_columns(units)] = 0


@torch.no_grad()
def fold_into_consumer_bias(layer: HiddenLayer, units: torch.Tensor, mean_activation: torch.Tensor) -> None:
    """consumer.bias += sum over the units' columns of w_out[:, column] * f_unit.

    Call before :func:`zero_outgoing`: the consumer's output then stays what it was on average,
    because the replaced unit's mean contribution moves into the bias. ``mean_activation`` has one
    value per unit, or one per consumer column of the unit (shape ``(units, block)``). For a conv
    consumer the kernel's taps are summed (exact away from zero-padded borders).
    """
    bias = layer.consumer.bias
    if bias is None:
        return
    outgoing = layer.outgoing_weights(units)  # (out, units, block * kernel)
    if mean_activation.dim() == 1:
        contribution = outgoing.sum(-1) @ mean_activation.to(outgoing.dtype)
    else:
        per_column = outgoing.reshape(outgoing.shape[0], units.numel(), layer.block, -1).sum(-1)
        contribution = (per_column * mean_activation.to(outgoing.dtype)).sum((1, 2))
    bias.add_(contribution)


@torch.no_grad()
def reset_unit_norm(layer: HiddenLayer, units: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    """The units' entries of the layer's normalisation start afresh: scale 1, shift 0, running mean 0 and
    running variance 1 (batch norm), and their optimizer state zero."""
    norm = layer.norm
    if norm is None:
        return
    if getattr(norm, "running_mean", None) is not None:
        norm.running_mean[units] = 0
        norm.running_var[units] = 1
    for param, fresh in ((norm.weight, 1.0), (norm.bias, 0.0)):
        if param is not None:
            param[units] = fresh
            if optimizer is not None:
                reset_optimizer_state(optimizer, param, (units,))


@torch.no_grad()
def reset_unit_optimizer_state(
    optimizer: torch.optim.Optimizer, layer: HiddenLayer, units: torch.Tensor
) -> None:
    """Zero optimizer state of the units' incoming rows, bias entries and outgoing columns."""
    reset_optimizer_state(optimizer, layer.producer.weight, (units,))
    if layer.producer.bias is not None:
        reset_optimizer_state(optimizer, layer.producer.bias, (units,))
    reset_optimizer_state(
        optimizer, layer.consumer.weight, (slice(None), layer.consumer_columns(units))
    )


@torch.no_grad()
def replace_units(
    layer: HiddenLayer,
    units: torch.Tensor,
    optimizer: torch.optim.Optimizer | None,
    *,
    init: str = "kaiming",
    gain: float = 1.0,
    generator: torch.Generator | None = None,
    mean_activation: torch.Tensor | None = None,
) -> None:
    """Re-initialise ``units`` of ``layer``: fresh incoming weights, zero bias, outgoing weights zero,
    and their normalisation entries (if the layer has one) reset.

    With ``mean_activation`` the units' mean contribution is first folded into the consumer's bias.
    The optimizer state at every touched position is zeroed.
    """
    if units.numel() == 0:
        return
    if mean_activation is not None:
        fold_into_consumer_bias(layer, units, mean_activation)
    reinit_incoming(layer, units, init, gain, generator)
    reset_unit_norm(layer, units, optimizer)
    zero_outgoing(layer, units)
    if optimizer is not None:
        reset_unit_optimizer_state(optimizer, layer, units)


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
        base_seed = self.generator.initial_seed()
        self.parts: list[RefreshStrategy] = []
        for index, name in enumerate(self.part_names):
            entry = strategies.get(name)
            values = {key: getattr(self.config, key) for key in entry.config.field_names()}
            part_config = entry.config.from_dict(values)
            self.parts.append(entry.cls(self.topology, optimizer, part_config, seed=derive_seed(base_seed, index)))

    def before_step(self) -> None:
        for part in self.parts:
            part.before_step()

    def after_step(self) -> RefreshStats:
        super().after_step()
        units = connections = 0
        for part in self.parts:
            stats = part.after_step()
            units += stats.units_replaced
            connections += stats.connections_regrown
        return RefreshStats(units, connections) if units or connections else NO_REFRESH

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
