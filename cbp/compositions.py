"""Strategies built from shared pieces: CBP on a RigL/SET-sparse net, and RigL with a utility drop score."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dst import strategies
from dst.config import setting
from dst.prune_regrow import RigL, RigLConfig
from dst.refresh import compose

from . import strategy as _registers_cbp  # noqa: F401  (cbp must be registered before composing it)
from .utility import UTILITIES, UnitUtility
from .weights import weight_factors

__all__ = ["CBPRigL", "CBPSET", "RigLUtilityConfig", "RigLUtility"]

#: RigL first, so it reads the dense gradient before any part masks it.
CBPRigL = compose("cbp-rigl", "rigl", "cbp", summary="CBP on a RigL-sparse net: units and connections both refreshed.")
CBPSET = compose("cbp-set", "set", "cbp", summary="CBP on a SET-sparse net: units and connections both refreshed.")


@dataclass(frozen=True)
class RigLUtilityConfig(RigLConfig):
    utility: str = setting("contribution", choices=UTILITIES, help="unit utility whose share a connection gets")
    decay_rate: float = setting(0.99, low=0.0, high=1.0, high_open=True, help="running-utility decay eta")


@strategies.register("rigl-utility")
class RigLUtility(RigL):
    """RigL whose drop score is a connection's share of its unit's utility (CBP's running utility).

    For connection w_ij into layer l: if its source j is a hidden unit, score = u_hat_j |w_ij| / sum_k |w_kj|
    (its share of the source's utility, which CBP measures through outgoing weights); otherwise, if its
    destination i is a hidden unit, score = u_hat_i |w_ij| / sum_k |w_ik|; otherwise |w_ij|.
    """

    Config = RigLUtilityConfig

    def __init__(self, model, optimizer, config=None, *, seed=None) -> None:
        super().__init__(model, optimizer, config, seed=seed)
        c = self.config
        self.layers = self.topology.hidden_layers
        self.utilities = [UnitUtility(layer, c.utility, c.decay_rate, self.device) for layer in self.layers]
        self.by_consumer = {id(layer.consumer): i for i, layer in enumerate(self.layers)}
        self.by_producer = {id(layer.producer): i for i, layer in enumerate(self.layers)}
        self.topology.start_capture()

    def after_step(self):
        factors = weight_factors(self.layers, self.config.utility)
        for layer, utility, factor in zip(self.layers, self.utilities, factors):
            utility.update(layer.output, factor, self.generator)
        return super().after_step()

    def drop_scores(self, index: int, layer: nn.Module, positions: torch.Tensor | None = None) -> torch.Tensor:
        """A connection's share of its unit's corrected utility (see the class docstring)."""
        scores = self._utility_shares(index, layer)
        return scores if positions is None else scores.reshape(-1)[positions]

    def _utility_shares(self, index: int, layer: nn.Module) -> torch.Tensor:
        magnitude = layer.weight.detach().abs()
        tiny = torch.finfo(magnitude.dtype).tiny
        if id(layer) in self.by_consumer:  # source units are hidden: columns (blocks) belong to units
            hidden = self.layers[self.by_consumer[id(layer)]]
            utility = self.utilities[self.by_consumer[id(layer)]].corrected_utility()
            per_unit = magnitude.reshape(magnitude.shape[0], hidden.n_units, -1)
            share = per_unit / per_unit.sum((0, 2), keepdim=True).clamp_min(tiny)
            return (share * utility.view(1, -1, 1)).reshape(magnitude.shape)
        if id(layer) in self.by_producer:  # destination units are hidden: rows belong to units
            utility = self.utilities[self.by_producer[id(layer)]].corrected_utility()
            rows = magnitude.reshape(magnitude.shape[0], -1)
            share = rows / rows.sum(1, keepdim=True).clamp_min(tiny)
            return (share * utility.view(-1, 1)).reshape(magnitude.shape)
        return magnitude

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "utilities": [u.state_dict() for u in self.utilities]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for utility, saved in zip(self.utilities, state["utilities"]):
            utility.load_state_dict(saved)
