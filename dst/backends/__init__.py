"""Sparse backends behind the masked layer: how a sparse linear layer computes between refreshes.

- ``masked`` (the reference): the dense weight times its mask; exact for every strategy and optimizer.
- ``condensed``: constant fan-in layers as values and input indices (:mod:`dst.backends.condensed`).

A backend never changes what is computed, only how: a strategy, a probe and a checkpoint always see the
masked layer. :class:`Backends` keeps a model's layers condensed on the steps at which the strategy leaves
weights, masks, gradients and optimizer state alone (``RefreshStrategy.refreshes_at``), and masked on the
others: before such a step the values and every optimizer state tensor are written back into the masked
layer, the step runs exactly as on the masked backend (dense gradient, the strategy's refresh), and the next
quiet step rebuilds the condensed layout from the refreshed mask. So a refresh every 100 steps costs one
conversion each way per 100 steps, and a strategy that may refresh at every step (CBP) keeps the layers
masked under ``auto``.

``auto`` condenses a linear layer when its mask has a constant fan-in, its density is at most
:data:`CONDENSED_MAX_DENSITY` (the break-even measured by ``benchmarks/sparse_speed.py``), it has at least
:data:`CONDENSED_MIN_WEIGHTS` weights per member (below that a step is per-call overhead, which the masked
layer's fewer calls win), and the strategy says at which steps it refreshes.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import ConfigError
from ..masked import MaskedLinear, masked_layers
from ..population import member_view
from .condensed import CondensedLinear, condensed_layout

__all__ = ["BACKENDS", "CONDENSED_MAX_DENSITY", "CONDENSED_MIN_WEIGHTS", "Backends", "CondensedLinear"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "masked", "condensed")
#: ``auto`` condenses layers up to this density (benchmarks/sparse_speed.py: break-even ~0.5 at 2000 x 2000)
CONDENSED_MAX_DENSITY = 0.3
#: ... and of at least this many weights per member
CONDENSED_MIN_WEIGHTS = 1 << 16


class Backends:
    """The backend of each sparse linear layer of ``model``, switched step by step (see the module docstring)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, strategy, backend: str = "masked"):
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
        self.optimizer, self.strategy, self.backend = optimizer, strategy, backend
        self.layers: list[CondensedLinear] = []
        self.dense = True  # every layer is its masked self
        if backend == "masked":
            return
        linear = [layer for layer in masked_layers(model) if isinstance(layer, MaskedLinear)]
        if backend == "condensed":
            if not linear:
                raise ConfigError("backend=condensed needs sparse linear layers (--bench density < 1); use backend=masked")
            self.layers = [CondensedLinear(layer) for layer in linear if layer.density < 1]  # dense ones stay
            if not getattr(strategy, "knows_refresh_steps", False):
                log.warning("strategy %r may refresh at every step, so backend=condensed converts its layers to masked "
                            "and back at every step; backend=auto keeps them masked", strategy.name)
        elif getattr(strategy, "knows_refresh_steps", False):
            self.layers = [CondensedLinear(layer) for layer in linear if _condenses(layer)]
        for record in self.layers:
            record.layer.condensed = record

    def __bool__(self) -> bool:
        return bool(self.layers)

    def prepare(self, step: int) -> None:
        """Before (1-based) step ``step``: masked layers if the strategy refreshes there, else condensed."""
        if self.strategy.refreshes_at(step):
            self.expand()
        elif self.dense:
            for record in self.layers:
                record.condense(self.optimizer)
            self.dense = False

    def expand(self) -> None:
        """Make every layer the exact masked layer again (weights, optimizer state) until the next quiet step."""
        if not self.dense:
            for record in self.layers:
                record.expand(self.optimizer)
            self.dense = True

    def describe(self) -> str:
        """Which backend each sparse linear layer runs on, for the run's log."""
        if not self.layers:
            return "masked"
        return f"condensed for {len(self.layers)} layer(s), masked for the others"


def _condenses(layer: MaskedLinear) -> bool:
    """``auto``: whether the condensed layout pays off for ``layer``."""
    mask = member_view(layer, layer.mask)
    if mask[0].numel() < CONDENSED_MIN_WEIGHTS or layer.density > CONDENSED_MAX_DENSITY:
        return False
    try:
        condensed_layout(mask)
    except ConfigError:
        return False
    return True
