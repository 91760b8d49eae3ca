"""Strategies built from shared pieces: CBP on a RigL/SRigL/SET-sparse net, and RigL with a utility drop score.

Member layout as everywhere: the composed parts refresh every member of a population at once, and
RigL-utility's unit utilities are (S, units) tensors (:mod:`cbp.utility`); its drop scores are shaped
like the updating members' weights, (M, *one member's weight shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dst import strategies
from dst.config import setting
from dst.population import member_view
from dst.prune_regrow import RigL, RigLConfig
from dst.refresh import compose

from . import strategy as _registers_cbp  # noqa: F401  (cbp must be registered before composing it)
from .utility import UTILITIES, UnitUtility
from .weights import WeightFactors

__all__ = ["CBPRigL", "CBPSRigL", "CBPSET", "RigLUtilityConfig", "RigLUtility"]

#: RigL first, so it reads the dense gradient before any part masks it.
CBPRigL = compose("cbp-rigl", "rigl", "cbp", summary="CBP on a RigL-sparse net: units and connections both refreshed.")
CBPSRigL = compose(
    "cbp-srigl", "srigl", "cbp", summary="CBP on an SRigL-sparse net: units replaced, connections refreshed within each unit's row."
)
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
        first_draw = 2 * len(self.masked)  # after RigL's draws (2 per masked layer)
        self.utilities = [
            UnitUtility(layer, c.utility, self.per_member("decay_rate"), random=self.random, draw=first_draw + index)
            for index, layer in enumerate(self.layers)
        ]
        self.factors = WeightFactors(self.layers, c.utility)
        self.by_consumer = {id(layer.consumer): i for i, layer in enumerate(self.layers)}
        self.by_producer = {id(layer.producer): i for i, layer in enumerate(self.layers)}
        self.topology.start_capture()

    def after_step(self):
        for layer, utility, factor in zip(self.layers, self.utilities, self.factors()):
            utility.update(layer.member_output, factor)
        return super().after_step()

    def drop_scores(self, index: int, layer: nn.Module, members: np.ndarray) -> torch.Tensor:
        """A connection's share of its unit's corrected utility (see the class docstring), (M, ...)."""
        magnitude = self.rows(member_view(layer, layer.weight).detach(), members).abs()
        rows = torch.as_tensor(members, device=magnitude.device)
        tiny = torch.finfo(magnitude.dtype).tiny
        if id(layer) in self.by_consumer:  # source units are hidden: columns (blocks) belong to units
            hidden = self.by_consumer[id(layer)]
            utility = self.utilities[hidden].corrected_utility(rows)  # (M, units)
            per_unit = magnitude.reshape(magnitude.shape[0], magnitude.shape[1], self.layers[hidden].n_units, -1)
            share = per_unit / per_unit.sum((1, 3), keepdim=True).clamp_min(tiny)
            return (share * utility[:, None, :, None]).reshape(magnitude.shape)
        if id(layer) in self.by_producer:  # destination units are hidden: rows belong to units
            utility = self.utilities[self.by_producer[id(layer)]].corrected_utility(rows)
            per_row = magnitude.reshape(magnitude.shape[0], magnitude.shape[1], -1)
            share = per_row / per_row.sum(2, keepdim=True).clamp_min(tiny)
            return (share * utility[:, :, None]).reshape(magnitude.shape)
        return magnitude

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "utilities": [u.state_dict() for u in self.utilities]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for utility, saved in zip(self.utilities, state["utilities"]):
            utility.load_state_dict(saved)
