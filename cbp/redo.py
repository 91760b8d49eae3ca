"""ReDo (Sokar et al. 2023), recycling dormant units, as the ``redo`` dst refresh strategy.

Every ``period`` steps each hidden unit gets the dormancy score s_i = E|h_i| / mean_k E|h_k| (the mean
absolute activation over the last ``window`` training batches, or over a fixed probe batch), and units
with s_i <= tau are reset with dst's shared surgery (fresh incoming weights, zero outgoing weights,
optimizer state zeroed).

Member layout: activity sums and scores are (S, units) tensors, and every member may have its own
``period``, ``tau`` and ``window``. Which members' next check a training batch feeds, and which members
check at a step, are host arrays (S,); a member's batches are summed only into its own rows, and at a
check only the checking members' dormant units are selected (``UnitSelection``: a member resets as many
as it finds), so member s does what a population of one with its settings does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from dst import strategies
from dst.config import setting
from dst.errors import TopologyError
from dst.init import INIT_SCHEMES, module_gain
from dst.population import forward
from dst.refresh import NO_REFRESH, RefreshStats, RefreshStrategy, StrategyConfig
from dst.surgery import UnitSelection, replace_units
from dst.topology import Topology

__all__ = ["ReDoConfig", "ReDo"]


@dataclass(frozen=True)
class ReDoConfig(StrategyConfig):
    """ReDo (Sokar et al. 2023): recycle tau-dormant units every ``period`` steps."""

    period: int = setting(1000, low=1, search=(100, 10_000), log=True, help="steps between dormancy checks")
    tau: float = setting(0.1, low=0.0, search=(0.0, 0.5), help="a unit with score <= tau is reset")
    window: int = setting(
        1, low=1, help="training steps whose scores are averaged for a check (1: the current batch)"
    )
    init: str = setting("kaiming", choices=INIT_SCHEMES, help="bound of re-initialised incoming weights")


def _mean_abs(h: torch.Tensor) -> torch.Tensor:
    """(S, batch, units[, H, W]) -> (S, units): E|h| over the batch and a channel's positions."""
    return h.abs().mean((1, *range(3, h.dim())))


@strategies.register("redo")
class ReDo(RefreshStrategy):
    """ReDo: every period steps reset units whose score E|h_i| / mean_k E|h_k| is at most tau."""

    Config = ReDoConfig
    #: what a unit's score measures: its activations, captured on the forward pass (a subclass measuring
    #: something else adds to ``self.sums`` itself and sets this False)
    captures_activations: ClassVar[bool] = True
    #: whether a reset unit's outgoing weights are zeroed (ReDo's surgery)
    zeroes_outgoing: bool = True

    def __init__(
        self,
        model: nn.Module | Topology,
        optimizer: torch.optim.Optimizer | None,
        config: ReDoConfig | list[ReDoConfig] | None = None,
        *,
        seed: int | list[int] | None = None,
    ) -> None:
        super().__init__(model, optimizer, config, seed=seed)
        self.layers = self.topology.hidden_layers
        if not self.layers:
            raise TopologyError("redo needs hidden layers, and the model has none")
        self.gains = [module_gain(layer.activation) for layer in self.layers]
        self.period, self.window = self.per_member("period"), self.per_member("window")
        dtype = self.layers[0].incoming().dtype
        self.tau = torch.as_tensor(self.per_member("tau"), dtype=dtype, device=self.device)[:, None]  # (S, 1)
        self.sums = [torch.zeros(self.members, layer.n_units, dtype=dtype, device=self.device) for layer in self.layers]
        self.seen = np.zeros(self.members, np.int64)  # batches summed into each member's rows since its last check
        self.probe: torch.Tensor | None = None
        if self.captures_activations and self._feeds(1).any():
            self.topology.start_capture()

    def set_probe(self, inputs: torch.Tensor | None) -> None:
        """Score units on this fixed member-first batch (S, batch, ...) at each check instead of the last
        ``window`` training batches (None: back to the training batches)."""
        self.probe = inputs
        if inputs is not None:
            self.topology.stop_capture()

    def _feeds(self, step: int) -> np.ndarray:
        """(S,) bool: whose next check training step ``step`` (1-based) feeds with its activations."""
        if self.probe is not None:
            return np.zeros(self.members, bool)
        return (-step) % self.period < self.window

    @staticmethod
    def scores(mean_abs_activation: torch.Tensor) -> torch.Tensor:
        """s_i = E|h_i| / mean_k E|h_k| over each member's units (0 for a member whose units are all silent)."""
        tiny = torch.finfo(mean_abs_activation.dtype).tiny
        return mean_abs_activation / mean_abs_activation.mean(-1, keepdim=True).clamp_min(tiny)

    def after_step(self) -> RefreshStats:
        super().after_step()
        step = self.step
        if self.topology.capturing:
            feeds = self._feeds(step)
            weight = None if feeds.all() else torch.as_tensor(feeds, dtype=self.tau.dtype, device=self.device)[:, None]
            for layer, total in zip(self.layers, self.sums):
                activity = _mean_abs(layer.member_output)
                total.add_(activity if weight is None else activity * weight)
            self.seen += feeds
        checking = step % self.period == 0
        replaced = self._recycle(checking) if checking.any() else None
        if self.captures_activations:  # capture during the next step exactly when it feeds a check
            if self._feeds(step + 1).any():
                self.topology.start_capture()
            else:
                self.topology.stop_capture()
        return NO_REFRESH if replaced is None else RefreshStats(units_replaced=replaced)

    @torch.no_grad()
    def _recycle(self, checking: np.ndarray) -> np.ndarray | None:
        """Reset the dormant units of the checking members; their activity sums start again."""
        if self.probe is not None:
            with self.topology.capture():
                forward(self.model, self.probe)
            activity = [_mean_abs(layer.member_output) for layer in self.layers]
        else:
            checking = checking & (self.seen > 0)
            seen = torch.as_tensor(np.maximum(self.seen, 1), dtype=self.tau.dtype, device=self.device)[:, None]
            activity = [total / seen for total in self.sums]
        chosen = torch.as_tensor(checking, device=self.device)[:, None]
        replaced = np.zeros(self.members, np.int64)
        for index, (layer, mean_abs) in enumerate(zip(self.layers, activity)):
            dormant = (self.scores(mean_abs) <= self.tau) & chosen
            members, units = dormant.nonzero(as_tuple=True)
            if members.numel() == 0:
                continue
            slots = (dormant.cumsum(1) - 1)[members, units]  # each member's picks numbered 0, 1, ...
            replace_units(layer, UnitSelection(members, units, slots), self.optimizer, self.random,
                          step=self.step, draw=index, init=self.config.init, gain=self.gains[index],
                          outgoing=self.zeroes_outgoing)
            replaced += torch.bincount(members, minlength=self.members).cpu().numpy()
        for total in self.sums:
            total.masked_fill_(chosen, 0)
        self.seen[checking] = 0
        return replaced if replaced.any() else None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(sums=[total.clone() for total in self.sums], seen=self.seen.copy(),
                     probe=None if self.probe is None else self.probe.clone())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for total, saved in zip(self.sums, state["sums"]):
            total.copy_(saved)
        self.seen = np.array(state["seen"], np.int64)
        probe = state["probe"]
        self.set_probe(None if probe is None else probe.to(self.device))
        if self.captures_activations and self._feeds(self.step + 1).any():
            self.topology.start_capture()
