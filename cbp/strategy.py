"""Continual backpropagation (``cbp``) as a dst refresh strategy, on the member layout.

It registers into ``dst.strategies`` through the entry-point group, exactly as a third-party package
would, and uses dst's shared surgery (``dst.surgery.replace_units``); it copies none of it.

A population of S members is refreshed in one pass: utilities are (S, units) tensors
(:mod:`cbp.utility`, :mod:`cbp.weights`), and the replacement counts are host integers per member
(:mod:`cbp.turnover`). Members may differ in ``replacement_rate``, ``maturity_threshold`` and
``decay_rate``; ``magnitude_every`` is structural and shared. On a step where some member replaces
units, each replacing member's eligible units are ranked by utility (ties to the lower unit index) and
its own count of the lowest is replaced, all members of a layer at once (``UnitSelection``); the new
weights come from the member's own random numbers, so member s does exactly what a population of one
with its seed and settings does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dst import strategies
from dst.arrays import Arrays
from dst.config import setting
from dst.errors import ConfigError, TopologyError
from dst.init import INIT_SCHEMES, module_gain
from dst.nets import CReLU
from dst.population import MemberRandom
from dst.refresh import NO_REFRESH, RefreshStats, RefreshStrategy, StrategyConfig
from dst.surgery import UnitSelection, replace_units
from dst.topology import HiddenLayer, Topology

from .turnover import Turnover
from .utility import UTILITIES, UnitUtility
from .weights import WeightFactors

__all__ = ["CBPConfig", "ContinualBackprop", "redraw_fan_in"]

#: purposes of a step's random draws: draw id = 4 * layer index + purpose
_REINIT, _FAN_IN, _UTILITY, _ROUNDING = range(4)


@dataclass(frozen=True)
class CBPConfig(StrategyConfig):
    """Continual backpropagation settings; defaults are the paper's (REFERENCE.md)."""

    replacement_rate: float = setting(
        1e-4, low=0.0, high=1.0, search=(1e-6, 1e-2), log=True, help="units replaced per eligible unit per step"
    )
    maturity_threshold: int = setting(
        100, low=0, search=(10, 10_000), log=True, help="steps a unit is protected after (re)initialisation"
    )
    decay_rate: float = setting(
        0.99, low=0.0, high=1.0, high_open=True, search=(0.9, 0.999), help="running-average decay eta"
    )
    utility: str = setting("adaptable_contribution", choices=UTILITIES, help="unit utility measure")
    init: str = setting("kaiming", choices=INIT_SCHEMES, help="bound of re-initialised incoming weights")
    accumulate: str = setting(
        "exact", choices=("exact", "probabilistic"),
        help="exact fractional accumulator, or the released code's probabilistic rounding",
    )
    bias_correction: bool = setting(True, help="fold a replaced unit's mean contribution into the consumer bias")
    refresh_fan_in: str = setting(
        "keep", choices=("keep", "redraw"), help="sparse layers: keep the incoming mask row or draw a new one"
    )
    magnitude_every: int = setting(
        1, low=1,
        help="steps between recomputing the |w| sums of large weight matrices (1: every step, exact; "
        "larger amortises the reads of every weight on wide nets; matrices under 65,536 entries per member "
        "and the replaced units' own sums stay exact); one value for all members of a population",
    )


@torch.no_grad()
def redraw_fan_in(layer: HiddenLayer, selection: UnitSelection, random: MemberRandom, *, step: int, draw: int) -> None:
    """Give each selected unit a new random incoming mask row with as many connections as it had.

    The positions are the unit's row's lowest ranks of a uniform draw (member ``members[p]``'s row
    ``slots[p]`` of draw ``draw`` at ``step``), ties to the lower position."""
    mask = layer.incoming_mask()
    if mask is None:
        return
    index = (selection.members, selection.units)
    rows = mask[index].reshape(len(selection), -1)
    counts = rows.sum(1, keepdim=True)
    scores = random.uniform(rows.shape[1:], step=step, draw=draw, members=selection.members, rows=selection.slots)
    ranks = scores.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
    mask[index] = (ranks < counts).reshape(len(selection), *mask.shape[2:])


def _uniforms(random: MemberRandom, draw: int) -> Callable[[int], np.ndarray]:
    """step -> one U[0, 1) draw per member (S,), on the host."""
    return lambda step: random.uniform((), step=step, draw=draw, dtype=torch.float64).numpy()


@strategies.register("cbp")
class ContinualBackprop(RefreshStrategy):
    """Continual backpropagation: replace a tiny fraction of mature, low-utility hidden units each step."""

    Config = CBPConfig

    def __init__(
        self,
        model: nn.Module | Topology,
        optimizer: torch.optim.Optimizer | None,
        config: CBPConfig | list[CBPConfig] | None = None,
        *,
        seed: int | list[int] | None = None,
    ) -> None:
        super().__init__(model, optimizer, config, seed=seed)
        c = self.config
        self.layers = self.topology.hidden_layers
        if not self.layers:
            raise TopologyError("cbp needs hidden layers, and the model has none")
        if not self.shared("magnitude_every"):
            raise ConfigError(
                f"cbp: members differ in magnitude_every ({sorted(set(self.per_member('magnitude_every').tolist()))}), "
                "which sets when the weight sums of the whole population are read; give every member one value"
            )
        # small layers on the CPU: the per-step update in numpy on the tensors' memory (dst.arrays)
        sizes = [layer.incoming()[0].numel() + layer.outgoing()[0].numel() for layer in self.layers]
        self.arrays = Arrays(host=c.magnitude_every == 1 and Arrays.suits(self.device, sizes))
        decay = self.per_member("decay_rate")
        self.utilities = [
            UnitUtility(layer, c.utility, decay, random=self.random, draw=4 * index + _UTILITY, arrays=self.arrays)
            for index, layer in enumerate(self.layers)
        ]
        self.gains = [module_gain(layer.activation) for layer in self.layers]
        if c.bias_correction and any(isinstance(layer.activation, CReLU) for layer in self.layers):
            raise TopologyError(
                "cbp's bias correction folds one mean activation per unit into the next layer's bias, but a "
                "CReLU unit has two outputs with different means; use --set bias_correction=false"
            )
        rate, maturity = self.per_member("replacement_rate"), self.per_member("maturity_threshold")
        self.maturity = torch.as_tensor(maturity, device=self.device)[:, None]  # (S, 1)
        host_random = self.random.to("cpu")  # the same keys: each member's draws for probabilistic rounding
        self.turnover = [
            Turnover(layer.n_units, rate, maturity,
                     uniform=None if c.accumulate == "exact" else _uniforms(host_random, 4 * index + _ROUNDING))
            for index, layer in enumerate(self.layers)
        ]
        self.next_change = min(turnover.next_change for turnover in self.turnover)
        self.factors = WeightFactors(self.layers, c.utility, c.magnitude_every, arrays=self.arrays)
        self.topology.start_capture()

    def after_step(self) -> RefreshStats:
        super().after_step()
        step = self.step
        factors = self.factors(step % self.config.magnitude_every == 0)
        for layer, utility, factor in zip(self.layers, self.utilities, factors):
            utility.update(self.arrays.output(layer), factor)
        if step < self.next_change:
            return NO_REFRESH
        replaced = None
        # Deepest layer first: a unit replaced in layer l + 1 gets fresh incoming weights, and the zeroed
        # outgoing columns of a unit replaced in layer l are written after that, so they stay zero.
        for index in reversed(range(len(self.layers))):
            counts = self.turnover[index].take(step)
            if counts is not None:
                self._replace(index, counts)
                replaced = counts if replaced is None else replaced + counts
        self.next_change = min(turnover.next_change for turnover in self.turnover)
        return NO_REFRESH if replaced is None else RefreshStats(units_replaced=replaced)

    def _replace(self, index: int, counts: np.ndarray) -> None:
        """Replace ``counts[s]`` of the lowest-utility eligible units of member s, in layer ``index``."""
        c, layer, utility = self.config, self.layers[index], self.utilities[index]
        replacing = np.flatnonzero(counts)
        members = torch.as_tensor(replacing, device=self.device)
        eligible = utility.age[members] > self.maturity[members]
        scores = torch.where(eligible, utility.corrected_utility(members), torch.inf)
        ranked = torch.sort(scores, dim=1, stable=True).indices[:, : int(counts[replacing].max())]
        selection = UnitSelection.from_ranked(members, ranked, torch.as_tensor(counts[replacing], device=self.device))
        before = self.factors.neighbour_shares(index, selection) if self.factors.amortises else None
        if c.refresh_fan_in == "redraw":
            redraw_fan_in(layer, selection, self.random, step=self.step, draw=4 * index + _FAN_IN)
        replace_units(
            layer,
            selection,
            self.optimizer,
            self.random,
            step=self.step,
            draw=4 * index + _REINIT,
            init=c.init,
            gain=self.gains[index],
            mean_activation=utility.corrected_mean(selection) if c.bias_correction else None,
        )
        utility.reset(selection)
        if before is not None:
            self.factors.patch(index, selection, before)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            utilities=[utility.state_dict() for utility in self.utilities],
            turnover=[turnover.state_dict() for turnover in self.turnover],
            weight_sums=self.factors.state_dict(),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for utility, saved in zip(self.utilities, state["utilities"]):
            utility.load_state_dict(saved)
        for turnover, saved in zip(self.turnover, state["turnover"]):
            turnover.load_state_dict(saved)
        self.factors.load_state_dict(state["weight_sums"])
        self.next_change = min(turnover.next_change for turnover in self.turnover)
