"""The probe: plasticity metrics of every hidden layer on a fixed probe batch.

The experiment loop runs it at the start of every task, on the first ``probe_size`` examples of the new
task (before the model learns from them), and every ``every`` steps if set; ``gradient_norm`` is the norm
of the gradient of the loss on the probe batch. Its values land in the next
metrics row: per hidden layer ``METRIC_LAYER`` (layer index 0, 1, ...) and overall ``METRIC``. Overall
ranks and fractions are computed on all hidden units side by side (the concatenated feature matrix);
a conv layer contributes one feature per channel, its activation averaged over positions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import metrics
from .topology import Topology

__all__ = ["Probe"]

_SATURATING = {"Tanh": "tanh", "Sigmoid": "sigmoid"}


class Probe:
    """Computes plasticity metrics of ``topology``'s hidden layers on a probe batch."""

    def __init__(self, every: int = 0, dormant_tau: float = 0.1, srank_threshold: float = 0.99) -> None:
        self.every = every
        self.dormant_tau = dormant_tau
        self.srank_threshold = srank_threshold

    def _layer_metrics(self, features: torch.Tensor, activation: nn.Module | None) -> dict[str, float]:
        values: dict[str, float] = {
            **metrics.spectral_ranks(features, self.srank_threshold),
            "dead_fraction": metrics.dead_fraction(features),
            "dormant_fraction": metrics.dormant_fraction(features, self.dormant_tau),
        }
        kind = _SATURATING.get(type(activation).__name__)
        if kind is not None:
            values["saturated_fraction"] = metrics.saturated_fraction(features, kind)
        return values

    def __call__(
        self,
        model: nn.Module,
        topology: Topology,
        inputs: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """One probe: a forward pass on ``inputs`` with activation capture, then the metrics.

        With ``targets`` and ``loss_fn`` it also reports ``gradient_norm``: the L2 norm of the gradient of
        the probe loss with respect to all parameters (computed aside; ``.grad`` is not touched).
        """
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            with topology.capture() as layers, torch.set_grad_enabled(loss_fn is not None):
                output = model(inputs)
                outputs = [(layer.output, layer.activation) for layer in layers]
                row: dict[str, Any] = {}
                if loss_fn is not None and targets is not None:
                    params = [p for p in model.parameters() if p.requires_grad]
                    grads = torch.autograd.grad(loss_fn(output, targets), params, allow_unused=True)
                    squares = sum(g.double().pow(2).sum() for g in grads if g is not None)
                    row["gradient_norm"] = float(torch.as_tensor(squares).sqrt())
        finally:
            model.train(was_training)
        columns = []
        for index, (features, activation) in enumerate(outputs):
            if features is None:
                continue
            for name, value in self._layer_metrics(features, activation).items():
                row[f"{name}_{index}"] = value
            columns.append(features.mean((2, 3)) if features.dim() == 4 else features)
        if columns:
            row.update(self._layer_metrics(torch.cat(columns, dim=1), None))
        for name, value in metrics.weight_magnitude(model).items():
            row["weight_magnitude" if name == "overall" else f"weight_magnitude_{name}"] = value
        row["probe_seconds"] = time.perf_counter() - start
        return row
