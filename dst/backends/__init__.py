"""Sparse backends behind the masked layer: how a sparse linear layer computes between refreshes.

- ``masked`` (the reference): the dense weight times its mask; exact for every strategy and optimizer.
- ``condensed``: constant fan-in layers as values and input indices (:mod:`dst.backends.condensed`).
- ``csr``: unstructured layers as torch.sparse CSR, the members as diagonal blocks (:mod:`dst.backends.csr`).

A backend never changes what is computed, only how: a strategy, a probe and a checkpoint always see the
masked layer. :class:`Backends` keeps a model's layers compact on the steps at which the strategy leaves
weights, masks, gradients and optimizer state alone (``RefreshStrategy.refreshes_at``), and masked on the
others: before such a step the values and every optimizer state tensor are written back into the masked
layer, the step runs exactly as on the masked backend (dense gradient, the strategy's refresh), and the next
quiet step rebuilds the compact layout from the refreshed mask (:mod:`dst.backends.compact`). So a refresh
every 100 steps costs one conversion each way per 100 steps, and a strategy that may refresh at every step
(CBP) keeps the layers masked under ``auto``.

``auto`` gives a linear layer of at least :data:`MIN_WEIGHTS` weights per member (below that a step is
per-call overhead, which the masked layer's fewer calls win), trained online (batch 1), under a strategy
that says at which steps it refreshes, the condensed layout if its mask has a constant fan-in and density
at most :data:`CONDENSED_MAX_DENSITY`, else CSR at density at most :data:`CSR_MAX_DENSITY`, else masked:
where ``benchmarks/sparse_speed.py`` measured them cheaper than the masked layer. With larger batches the
dense product's matrix-matrix kernel wins at every density measured (down to 0.02), so ``auto`` stays masked.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import ConfigError
from ..masked import MaskedLinear, masked_layers
from ..population import member_view
from .compact import CompactLinear
from .condensed import CondensedLinear, condensed_layout
from .csr import CSRLinear

__all__ = ["BACKENDS", "CONDENSED_MAX_DENSITY", "CSR_MAX_DENSITY", "MIN_WEIGHTS", "Backends", "CompactLinear",
           "CondensedLinear", "CSRLinear"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "masked", "condensed", "csr")
#: ``auto``: the densities up to which the condensed and CSR layouts beat the masked layer at batch 1
#: (benchmarks/sparse_speed.py: 784-2000x3-10, masked ~1.4x plain dense, condensed 0.80x at 0.2, CSR 1.13x at 0.2)
CONDENSED_MAX_DENSITY = 0.25
CSR_MAX_DENSITY = 0.2
#: ... for layers of at least this many weights per member
MIN_WEIGHTS = 1 << 16


class Backends:
    """The backend of each sparse linear layer of ``model``, switched step by step (see the module docstring)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, strategy, backend: str = "masked",
                 batch_size: int = 1):
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
        self.optimizer, self.strategy = optimizer, strategy
        self.layers: list[CompactLinear] = []
        self.dense = True  # every layer is its masked self
        if backend == "masked":
            return
        linear = [layer for layer in masked_layers(model) if isinstance(layer, MaskedLinear) and layer.density < 1]
        if backend != "auto":
            if not linear:
                raise ConfigError(f"backend={backend} needs sparse linear layers (--bench density < 1); use backend=masked")
            kind = CondensedLinear if backend == "condensed" else CSRLinear
            self.layers = [kind(layer) for layer in linear]
            if not getattr(strategy, "knows_refresh_steps", False):
                log.warning("strategy %r may refresh at every step, so backend=%s converts its layers to masked "
                            "and back at every step; backend=auto keeps them masked", strategy.name, backend)
        elif batch_size == 1 and getattr(strategy, "knows_refresh_steps", False):
            self.layers = [kind(layer) for layer in linear if (kind := _chosen(layer)) is not None]
        for record in self.layers:
            record.layer.compact = record

    def __bool__(self) -> bool:
        return bool(self.layers)

    def prepare(self, step: int) -> None:
        """Before (1-based) step ``step``: masked layers if the strategy refreshes there, else compact ones."""
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
        """Which backend the sparse linear layers run on, for the run's log."""
        kinds = [record.name for record in self.layers]
        return ", ".join(f"{kinds.count(kind)} layer(s) {kind}" for kind in dict.fromkeys(kinds)) or "masked"


def _chosen(layer: MaskedLinear) -> type[CompactLinear] | None:
    """``auto``: the compact layout that pays off for ``layer``, or None (masked)."""
    mask = member_view(layer, layer.mask)
    if mask[0].numel() < MIN_WEIGHTS or layer.density > max(CONDENSED_MAX_DENSITY, CSR_MAX_DENSITY):
        return None
    if layer.density <= CONDENSED_MAX_DENSITY:
        try:
            condensed_layout(mask)
            return CondensedLinear
        except ConfigError:
            pass
    if layer.density <= CSR_MAX_DENSITY and bool((mask.reshape(mask.shape[0], -1).sum(1) == mask[0].sum()).all()):
        return CSRLinear
    return None
