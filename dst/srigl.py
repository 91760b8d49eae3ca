"""SRigL (Lasby et al., ICLR 2024): RigL that keeps every unit's fan-in constant, with neuron ablation.

The net starts from a constant fan-in mask (``distribution='constant-fan-in'``: every unit of a layer has k
incoming connections, the layer's budget B = units x k). At each update, with drop fraction f from RigL's
schedule (cosine, alpha 0.3, every 100 steps, none after 0.75 x the run), in each masked layer of every
updating member:

1. n = active weights, n_drop = floor(f n), n_keep = n - n_drop. The kept weights are the n_keep largest
   magnitudes |w| of the layer (over all its units, as RigL's drop).
2. Neuron ablation (for layers whose units are hidden, never the output layer). A weight is *salient* if it
   is kept, or among the layer's n_drop largest |dense gradient| (at any position). A unit with fewer than
   t = max(1, floor(gamma_sal x k)) salient weights is ablated: its incoming row is emptied and it grows
   nothing. The threshold is lowered where needed so that more than floor(B / row size) units stay active
   (the budget must fit in their rows).
3. The budget is spread over the A active units: k' = floor(B / A). A unit keeping more than k' weights keeps
   its k' largest; one keeping fewer grows the inactive positions of its row with the largest |dense
   gradient| until it has k'. So every active unit has exactly k' incoming connections.

Grown weights start at 0 (or ``grow_init=random``) with zero optimizer state, dropped ones are zeroed with
their optimizer state, as in :mod:`dst.prune_regrow`; a position dropped and regrown at once restarts like
any grown weight. A layer's fan-in k' changes only when its number of ablated units does.

The released code (calgaryml/condensed-sparsity, ``rigl_constant_fan.py``; defaults from its
``configs/config.yaml``: ``min_salient_weights_per_neuron`` 0.3 of the sparse fan-in, dynamic ablation,
grown weights 0) differs in two details, both cases where its result depends on sort order rather than on
the scores: a unit keeping more than k' weights keeps an arbitrary k' of them (we keep the largest), and
when fewer than n_keep weights are non-zero its global top-k may "keep" inactive zeros at arbitrary
positions (we keep only active weights and let each row grow by gradient).

Population layout as everywhere: member m's scores and counts are its own, each selection is
:func:`dst.ranking.ranked` (ties to the lower position), so a member's update does not depend on the
others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from . import strategies
from .config import setting
from .backends.condensed import condensed_layout
from .errors import TopologyError
from .optim_state import reset_optimizer_state
from .prune_regrow import RigL, RigLConfig
from .ranking import picked, ranked
from .population import member_view

__all__ = ["SRigLConfig", "SRigL", "row_fan_ins"]


def row_fan_ins(mask: torch.Tensor) -> torch.Tensor:
    """Incoming connections of every unit: (members, units, ...) mask -> (members, units) counts."""
    return mask.reshape(mask.shape[0], mask.shape[1], -1).sum(-1)


@dataclass(frozen=True)
class SRigLConfig(RigLConfig):
    gamma_sal: float = setting(
        0.3, low=0.0, high=1.0, search=(0.0, 0.9),
        help="neuron ablation: a unit with fewer than gamma_sal x fan-in salient weights is ablated (0: never)",
    )


@strategies.register("srigl")
class SRigL(RigL):
    """SRigL: RigL within each unit's row, so the fan-in stays constant; dynamic neuron ablation."""

    Config = SRigLConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.budget: list[np.ndarray] = []  # B per layer and member (S,): the masks' counts (or a checkpoint's)
        for layer in self.masked:
            counts = row_fan_ins(member_view(layer, layer.mask))
            widest = counts.max(1, keepdim=True).values
            if bool(((counts != widest) & (counts > 0)).any()):  # (an empty unit is an ablated one)
                raise TopologyError(
                    f"srigl keeps every unit's fan-in constant, but {type(layer).__name__} "
                    f"{tuple(member_view(layer, layer.weight).shape[1:])} has units with different fan-ins: "
                    "sparsify with distribution='constant-fan-in' (--bench distribution=constant-fan-in)"
                )
            self.budget.append(counts.sum(1).cpu().numpy())
        producers = {id(hidden.producer) for hidden in self.topology.hidden_layers}
        self.ablates = [id(layer) in producers for layer in self.masked]  # never the output layer
        #: per layer, the (S, units) ablated units after the last update
        self.ablated = [
            torch.zeros(self.members, member_view(layer, layer.weight).shape[1], dtype=torch.bool, device=self.device)
            for layer in self.masked
        ]

    @torch.no_grad()
    def update_layer(self, index: int, layer: nn.Module, fractions: np.ndarray) -> np.ndarray:
        members = np.flatnonzero(fractions > 0)
        m = len(members)
        regrown = np.zeros(self.members, dtype=np.int64)
        weight = self.rows(member_view(layer, layer.weight), members).detach()
        units = weight.shape[1]
        weight = weight.reshape(m, units, -1)  # a conv's unit: an output channel over in x kh x kw
        mask = self.rows(member_view(layer, layer.mask), members).reshape(m, units, -1)  # (M, units, row)
        row = mask.shape[-1]
        n = units * row
        gradient = self.grow_scores(index, layer, members).reshape(m, n)

        # 1. the n_drop smallest active magnitudes go: ranked over the active weights only, (M, units, k)
        inputs, valid = condensed_layout(mask)
        k = inputs.shape[-1]
        keep = torch.ones_like(inputs, dtype=torch.bool) if valid is None else valid.clone()
        magnitude = weight.abs().gather(-1, inputs)
        active = keep.sum((1, 2)).cpu().numpy()
        dropping = np.floor(fractions[members] * active).astype(np.int64)
        if dropping.max() > 0:
            scores = magnitude.masked_fill(~keep, torch.inf).view(m, units * k)
            _mark(keep.view(m, units * k), ranked(scores, dropping, largest=False), dropping, False)

        budget = self.budget[index][members]
        ablated = torch.zeros(m, units, dtype=torch.bool, device=self.device)
        if self.ablates[index] and dropping.max() > 0:  # 2. neuron ablation
            salient = _dense(keep, inputs, row).view(m, n)
            salient = _mark(salient, ranked(gradient, dropping, largest=True), dropping, True)
            ablated = self._ablated(salient.view(m, units, row).sum(-1), budget, row, members)
        fan_in = budget // (units - ablated.sum(1).cpu().numpy())  # 3. k' = floor(B / A)

        keep[ablated] = False
        limit = torch.as_tensor(fan_in, device=self.device)[:, None]
        kept = keep.sum(-1)
        over = kept > limit
        if bool(over.any()):  # an over-full unit keeps its k' largest magnitudes
            member, unit = over.nonzero(as_tuple=True)
            scores = magnitude[member, unit].masked_fill(~keep[member, unit], -torch.inf)
            counts = fan_in[member.cpu().numpy()]
            keep[member, unit] = _mark(torch.zeros_like(keep[member, unit]), ranked(scores, counts, largest=True), counts, True)
            kept = keep.sum(-1)
        kept_dense = _dense(keep, inputs, row)
        need = torch.where(ablated, 0, limit - kept)  # (M, units)
        grown_member = grown_position = torch.empty(0, dtype=torch.long, device=self.device)
        if bool((need > 0).any()):  # an under-full unit grows its largest |gradient| outside what it keeps
            member, unit = (need > 0).nonzero(as_tuple=True)
            if len(member) == m * units:  # every unit grows (the common case): no gathered copy of the rows
                scores = gradient.view(m * units, row).masked_fill(kept_dense.view(m * units, row), -torch.inf)
            else:
                scores = gradient.view(m, units, row)[member, unit].masked_fill(kept_dense[member, unit], -torch.inf)
            counts = need[member, unit].cpu().numpy()
            picks = ranked(scores, counts, largest=True)
            slots = picked(counts, self.device)
            grown_member = member[:, None].expand_as(picks)[slots]
            grown_position = (unit[:, None] * row + picks)[slots]

        rows = torch.as_tensor(members, device=self.device)
        was = torch.ones_like(keep) if valid is None else valid
        member, unit, slot = (was & ~keep).nonzero(as_tuple=True)  # dropped: active before, not kept
        dropped_at = rows[member] * n + unit * row + inputs[member, unit, slot]
        grown_at = rows[grown_member] * n + grown_position
        flat_weight, flat_mask = layer.weight.view(-1), layer.mask.view(-1)
        flat_weight[dropped_at] = 0
        flat_mask[dropped_at] = False
        flat_weight[grown_at] = self.grown_values(index, layer, rows[grown_member], grown_position)
        flat_mask[grown_at] = True
        if self.optimizer is not None:
            reset_optimizer_state(self.optimizer, layer.weight, torch.cat((dropped_at, grown_at)), flat=True)
        self.ablated[index][rows] = ablated
        regrown[members] = torch.bincount(grown_member, minlength=m).cpu().numpy()
        return regrown

    def _ablated(self, salient: torch.Tensor, budget: np.ndarray, row: int, members: np.ndarray) -> torch.Tensor:
        """(M, units) salient counts -> the units to ablate (see step 2 of the module docstring)."""
        units = salient.shape[1]
        gamma = torch.as_tensor(self.per_member("gamma_sal")[members], device=salient.device)
        fan_in = torch.as_tensor(budget // units, device=salient.device)
        threshold = torch.clamp((gamma * fan_in).floor(), min=1).to(salient.dtype)
        keep_at_least = budget // row  # units that must stay active: more than this
        order = salient.sort(dim=1, descending=True).values
        floor = order.gather(1, torch.as_tensor(np.minimum(keep_at_least, units - 1), device=salient.device)[:, None])[:, 0]
        threshold = torch.minimum(threshold, floor)
        threshold = torch.where(torch.as_tensor(keep_at_least < units, device=salient.device), threshold, 0)
        return (salient < threshold[:, None]) & (gamma > 0)[:, None]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "budget": [b.copy() for b in self.budget],
                "ablated": [mask.clone() for mask in self.ablated]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.budget = [np.asarray(b, dtype=np.int64).copy() for b in state["budget"]]
        for mine, saved in zip(self.ablated, state["ablated"]):
            mine.copy_(saved)


def _dense(keep: torch.Tensor, inputs: torch.Tensor, row: int) -> torch.Tensor:
    """The (M, units, row) boolean mask of the (M, units, k) entries ``keep`` at input positions ``inputs``."""
    dense = torch.zeros(*keep.shape[:2], row, dtype=torch.bool, device=keep.device)
    return dense.scatter_(-1, inputs, keep)


def _mark(mask: torch.Tensor, positions: torch.Tensor, counts: np.ndarray, value: bool) -> torch.Tensor:
    """Set row r of ``mask`` (rows, n) to ``value`` at its first counts[r] ``positions``; returns ``mask``."""
    valid = picked(counts, mask.device)
    row = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(positions)
    mask[row[valid], positions[valid]] = value
    return mask
