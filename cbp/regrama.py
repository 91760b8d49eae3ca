"""ReGraMa (Liu et al. 2025, "Measure gradients not activations!"): ReDo whose dormancy score is a unit's
gradient magnitude, as the ``regrama`` dst refresh strategy.

Every ``period`` steps each hidden unit gets the score

    s_i = G_i / mean_k G_k,    G_i = mean over unit i's incoming connections of |dL/dw_ij|

(the current batch's gradient, or its mean over the last ``window`` training steps), and units with
s_i <= tau are reset with ReDo's surgery: fresh incoming weights, zero outgoing weights, optimizer state
zeroed. A unit whose gradient vanishes has stopped learning whether or not it is active, which the
activation score of ReDo misses (a ReLU unit can fire on every input and still get no gradient).

The released code (torressliu / rippl-svg ``grad-based-plasticity-metrics``, ``GradientReDo``) differs in
its surgery: it re-initialises the incoming weights only and leaves the outgoing weights as they are
(``outgoing=keep`` here), and it also scores and resets the output layer's units (not done here: an
output unit is not a hidden unit that the unit graph can recycle). On a sparse layer, G_i runs over the
unit's active connections. Schedule, per-member settings and resume are ReDo's (:mod:`cbp.redo`).

Defaults are the released code's: a check every 1000 steps, tau = 0 (only units whose gradient is exactly
zero), the current batch. At batch 1 a ReLU unit that is silent on the one example has a zero gradient,
so score over many steps there (``window`` of a few hundred).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dst import strategies
from dst.config import setting
from dst.errors import ConfigError
from dst.population import member_view

from .redo import ReDo, ReDoConfig

__all__ = ["ReGraMaConfig", "ReGraMa"]


@dataclass(frozen=True)
class ReGraMaConfig(ReDoConfig):
    tau: float = setting(0.0, low=0.0, search=(0.0, 0.5), help="a unit with score <= tau is reset (0: a zero gradient)")
    outgoing: str = setting("zero", choices=("zero", "keep"),
                            help="a reset unit's outgoing weights: zeroed (ReDo's surgery) or kept (the released code)")


@strategies.register("regrama")
class ReGraMa(ReDo):
    """ReGraMa: every period steps reset units whose score G_i / mean_k G_k (mean |incoming gradient|) is at most tau."""

    Config = ReGraMaConfig
    captures_activations = False

    @property
    def zeroes_outgoing(self) -> bool:
        return self.config.outgoing == "zero"

    def set_probe(self, inputs: torch.Tensor | None) -> None:
        if inputs is not None:
            raise ConfigError("regrama scores units by their training gradients; it takes no probe batch")
        super().set_probe(None)

    @torch.no_grad()
    def before_step(self) -> None:
        feeds = self._feeds(self.step + 1)
        if feeds.any():
            weight = None if feeds.all() else torch.as_tensor(feeds, dtype=self.tau.dtype, device=self.device)[:, None]
            for layer, total in zip(self.layers, self.sums):
                magnitude = _mean_abs_incoming_gradient(layer)
                total.add_(magnitude if weight is None else magnitude * weight)
            self.seen += feeds
        super().before_step()


def _mean_abs_incoming_gradient(layer) -> torch.Tensor:
    """(S, units): each unit's mean |gradient| over its incoming connections (the active ones of a sparse row)."""
    producer = layer.producer
    if producer.weight.grad is None:
        raise ConfigError("regrama: a hidden layer's weight has no gradient this step")
    grad = member_view(producer, producer.weight.grad)
    grad = grad.reshape(*grad.shape[:2], -1).abs()
    mask = layer.incoming_mask()
    if mask is None:
        return grad.mean(-1)
    mask = mask.reshape(grad.shape)
    return (grad * mask).sum(-1) / mask.sum(-1).clamp_min(1)
