"""Unit surgery every unit-level strategy shares, on the member layout.

Surgery on hidden units (:func:`replace_units` and its parts) re-initialises incoming rows while
respecting the mask, zeroes outgoing columns (a conv channel's whole block of consumer columns), folds
the unit's mean contribution into the consumer's bias, and zeroes the optimizer state at exactly those
positions. The units are a :class:`UnitSelection` of (member, unit) pairs, so one call serves every
member of a population, each with its own count. Unit-level strategies (CBP, ReDo) call it; none copies it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .init import fans, init_bound
from .optim_state import reset_optimizer_state
from .population import MemberRandom, is_population_module, member_view
from .topology import HiddenLayer

__all__ = [
    "UnitSelection",
    "reinit_incoming",
    "zero_outgoing",
    "fold_into_consumer_bias",
    "reset_unit_optimizer_state",
    "reset_unit_norm",
    "replace_units",
]


@dataclass(frozen=True)
class UnitSelection:
    """Hidden units picked across members: unit ``units[p]`` of member ``members[p]``.

    ``slots[p]`` numbers a member's picks 0, 1, ... and indexes their random draws, so a member's fresh
    weights do not depend on what the other members pick. Members pick different numbers of units:
    :meth:`from_ranked` keeps the first ``counts[m]`` of each member's ranked candidates.
    """

    members: torch.Tensor
    units: torch.Tensor
    slots: torch.Tensor

    def __len__(self) -> int:
        return self.units.numel()

    @classmethod
    def of_member(cls, units: torch.Tensor, member: int = 0) -> "UnitSelection":
        """``units`` (1-D) of one member, slots in the order given."""
        units = units.reshape(-1).to(torch.long)
        return cls(torch.full_like(units, member), units, torch.arange(units.numel(), device=units.device))

    @classmethod
    def from_ranked(cls, members: torch.Tensor, ranked: torch.Tensor, counts: torch.Tensor) -> "UnitSelection":
        """Members ``members`` (M,), their candidates best first ``ranked`` (M, k), how many each keeps
        ``counts`` (M,) (at most k)."""
        k = ranked.shape[1]
        slots = torch.arange(k, device=ranked.device).expand_as(ranked)
        keep = slots < counts.to(ranked.device)[:, None]
        return cls(members.to(ranked.device)[:, None].expand_as(ranked)[keep], ranked[keep], slots[keep])


def _reset_state(optimizer: torch.optim.Optimizer | None, module: nn.Module, param: torch.Tensor, index) -> None:
    """Zero the optimizer state of ``param`` at a member-first ``index`` (its member index dropped for a
    plain layer, whose only member is 0)."""
    if optimizer is not None:
        reset_optimizer_state(optimizer, param, index if is_population_module(module) else index[1:])


@torch.no_grad()
def reinit_incoming(
    layer: HiddenLayer,
    units: UnitSelection,
    random: MemberRandom,
    *,
    step: int,
    draw: int = 0,
    init: str = "kaiming",
    gain: float = 1.0,
) -> None:
    """Draw the units' incoming weights afresh from U(-b, b) (masked entries stay 0) and zero their bias.

    The bound uses the layer's dense fan-in, as the initial weights did. Member m's slot j takes row j
    of its draw (``random``, keyed by ``step`` and ``draw``).
    """
    weight = layer.incoming()
    fan_in, fan_out = fans(weight.shape[1:])
    bound = init_bound(init, fan_in, fan_out, gain)
    uniform = random.uniform(weight.shape[2:], step=step, draw=draw, members=units.members, rows=units.slots)
    fresh = uniform.to(weight.dtype).mul_(2 * bound).sub_(bound)
    mask = layer.incoming_mask()
    if mask is not None:
        fresh.mul_(mask[units.members, units.units])
    weight[units.members, units.units] = fresh
    bias = layer.incoming_bias()
    if bias is not None:
        bias[units.members, units.units] = 0


def _columns(layer: HiddenLayer, units: UnitSelection) -> tuple[torch.Tensor, torch.Tensor]:
    """(members, consumer columns) fed by the units: ``block`` columns per unit."""
    if layer.block == 1:
        return units.members, units.units
    offsets = torch.arange(layer.block, device=units.units.device)
    columns = (units.units[:, None] * layer.block + offsets).reshape(-1)
    return units.members.repeat_interleave(layer.block), columns


@torch.no_grad()
def zero_outgoing(layer: HiddenLayer, units: UnitSelection) -> None:
    """Zero the consumer's input columns fed by the units (a conv channel's whole block)."""
    members, columns = _columns(layer, units)
    layer.outgoing()[members, :, columns] = 0


@torch.no_grad()
def fold_into_consumer_bias(layer: HiddenLayer, units: UnitSelection, mean_activation: torch.Tensor) -> None:
    """consumer.bias += sum over the units' columns of w_out[:, column] * f_unit, per member.

    Call before :func:`zero_outgoing`: the consumer's output then stays what it was on average,
    because the replaced unit's mean contribution moves into the bias. ``mean_activation`` has one
    value per selected unit, or one per consumer column of the unit (shape ``(units, block)``). For a
    conv consumer the kernel's taps are summed (exact away from zero-padded borders).
    """
    bias = layer.consumer_bias()
    if bias is None:
        return
    outgoing = layer.outgoing_weights()[units.members, :, units.units]  # (P, out, block * kernel)
    mean = mean_activation.to(outgoing.dtype)
    if mean.dim() == 1:
        contribution = outgoing.sum(-1) * mean[:, None]
    else:
        per_column = outgoing.reshape(outgoing.shape[0], outgoing.shape[1], layer.block, -1).sum(-1)
        contribution = (per_column * mean[:, None, :]).sum(-1)
    bias.index_put_((units.members,), contribution, accumulate=True)


@torch.no_grad()
def reset_unit_norm(layer: HiddenLayer, units: UnitSelection, optimizer: torch.optim.Optimizer | None) -> None:
    """The units' entries of the layer's normalisation start afresh: scale 1, shift 0, running mean 0 and
    running variance 1 (batch norm), and their optimizer state zero (each member's own entries in a
    population's :class:`dst.population.MemberLayerNorm`)."""
    norm = layer.norm
    if norm is None:
        return
    if getattr(norm, "running_mean", None) is not None:
        norm.running_mean[units.units] = 0
        norm.running_var[units.units] = 1
    index = (units.members, units.units)
    for param, fresh in ((norm.weight, 1.0), (norm.bias, 0.0)):
        if param is not None:
            member_view(norm, param)[index] = fresh
            _reset_state(optimizer, norm, param, index)


@torch.no_grad()
def reset_unit_optimizer_state(
    optimizer: torch.optim.Optimizer | None, layer: HiddenLayer, units: UnitSelection
) -> None:
    """Zero optimizer state of the units' incoming rows, bias entries and outgoing columns."""
    producer, consumer = layer.producer, layer.consumer
    _reset_state(optimizer, producer, producer.weight, (units.members, units.units))
    if producer.bias is not None:
        _reset_state(optimizer, producer, producer.bias, (units.members, units.units))
    members, columns = _columns(layer, units)
    _reset_state(optimizer, consumer, consumer.weight, (members, slice(None), columns))


@torch.no_grad()
def replace_units(
    layer: HiddenLayer,
    units: UnitSelection,
    optimizer: torch.optim.Optimizer | None,
    random: MemberRandom,
    *,
    step: int,
    draw: int = 0,
    init: str = "kaiming",
    gain: float = 1.0,
    mean_activation: torch.Tensor | None = None,
    outgoing: bool = True,
) -> None:
    """Re-initialise the selected units: fresh incoming weights, zero bias, outgoing weights zero (kept
    with ``outgoing=False``), and their normalisation entries (if the layer has one) reset.

    With ``mean_activation`` (one value per selected unit) the units' mean contribution is first folded
    into the consumer's bias. The optimizer state at every touched position is zeroed.
    """
    if len(units) == 0:
        return
    if mean_activation is not None:
        fold_into_consumer_bias(layer, units, mean_activation)
    reinit_incoming(layer, units, random, step=step, draw=draw, init=init, gain=gain)
    reset_unit_norm(layer, units, optimizer)
    if outgoing:
        zero_outgoing(layer, units)
    reset_unit_optimizer_state(optimizer, layer, units)
