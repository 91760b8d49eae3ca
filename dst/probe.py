"""The probe: plasticity metrics of every hidden layer of every member on a fixed probe batch.

The experiment loop runs it at the start of every task, on the first ``probe_size`` examples of the new
task (before the model learns from them), and every ``every`` steps if set. It gives one row fragment
per member, whose values land in that member's next metrics row: per hidden layer ``METRIC_LAYER``
(layer index 0, 1, ...) and overall ``METRIC``. Overall ranks and fractions are computed on all hidden
units side by side (the concatenated feature matrix); there a conv layer contributes one feature per
channel, its activation averaged over positions. A conv layer's own ranks see each sample's whole map
(N, C*H*W) and its unit fractions treat a channel as one unit over all samples and positions
(``dst.metrics.conv_samples`` / ``conv_units``). ``gradient_norm`` is the norm of each member's gradient
of its loss on the probe batch, and ``probe_seconds`` the time the probe took for the whole population.

All members go through one forward pass and every metric is computed for all of them in one batched
call; the results reach the host in one transfer.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from . import metrics
from .nets import CReLU
from .population import forward
from .topology import Topology

__all__ = ["Probe"]

_SATURATING = {"Tanh": "tanh", "Sigmoid": "sigmoid"}


class Probe:
    """Computes plasticity metrics of ``topology``'s hidden layers on a probe batch, per member."""

    def __init__(self, every: int = 0, dormant_tau: float = 0.1, srank_threshold: float = 0.99) -> None:
        self.every = every
        self.dormant_tau = dormant_tau
        self.srank_threshold = srank_threshold

    def _layer_metrics(
        self, samples: torch.Tensor, units: torch.Tensor, activation: nn.Module | None
    ) -> dict[str, torch.Tensor]:
        """(S,) values from ``samples`` (S, rows, features) for the ranks and ``units`` (S, rows, units)."""
        values = {
            **metrics.spectral_ranks(samples, self.srank_threshold),
            "dead_fraction": metrics.dead_fraction(units),
            "dormant_fraction": metrics.dormant_fraction(units, self.dormant_tau),
        }
        kind = _SATURATING.get(type(activation).__name__)
        if kind is not None:
            values["saturated_fraction"] = metrics.saturated_fraction(units, kind)
        return values

    def __call__(
        self,
        model: nn.Module,
        topology: Topology,
        inputs: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> list[dict[str, float]]:
        """One probe on member-first ``inputs`` (S, P, ...): one forward pass with activation capture, then
        the metrics; returns S dicts, member s's row fragment at index s.

        With ``targets`` (S, P, ...) and ``loss_fn`` (output, targets) -> per-member losses (S,)
        (``dst.population.mse_per_member`` / ``cross_entropy_per_member``) it also reports
        ``gradient_norm``: the L2 norm of each member's gradient of its probe loss with respect to its
        parameters (computed aside; ``.grad`` is not touched).
        """
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        values: dict[str, torch.Tensor] = {}
        try:
            with topology.capture() as layers, torch.set_grad_enabled(loss_fn is not None):
                output = forward(model, inputs)
                captured = [(layer.member_output, layer.activation) for layer in layers]
                if loss_fn is not None and targets is not None:
                    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
                    grads = torch.autograd.grad(loss_fn(output, targets).sum(), [p for _, p in named],
                                                allow_unused=True)
                    values["gradient_norm"] = metrics.gradient_norm(model, {n: g for (n, _), g in zip(named, grads)})
        finally:
            model.train(was_training)
        columns, linear_values = [], None
        for index, (features, activation) in enumerate(captured):
            if features is None:
                continue
            features = features.double()  # once: the SVD needs float64, and so does the overall matrix
            if isinstance(activation, CReLU):  # each unit's pair: (S, P, units, 2[, H, W])
                features = _crelu_as_positions(features)
            if features.dim() == 5:  # conv (S, P, C, H, W)
                layer_values = self._layer_metrics(
                    metrics.conv_samples(features), metrics.conv_units(features), activation
                )
                columns.append(features.mean((-2, -1)))
            else:
                layer_values = linear_values = self._layer_metrics(features, features, activation)
                columns.append(features)
            values.update({f"{name}_{index}": value for name, value in layer_values.items()})
        if len(columns) == 1 and linear_values is not None:  # one linear layer: the overall matrix is its own
            values.update({name: value for name, value in linear_values.items() if name != "saturated_fraction"})
        elif columns:
            overall = torch.cat(columns, dim=-1)
            values.update(self._layer_metrics(overall, overall, None))
        for name, value in metrics.weight_magnitude(model).items():
            values["weight_magnitude" if name == "overall" else f"weight_magnitude_{name}"] = value
        names = list(values)
        device = next(iter(values.values())).device
        table = torch.stack([values[name].to(device, torch.float64) for name in names], dim=1).tolist()
        seconds = time.perf_counter() - start
        return [{**dict(zip(names, member)), "probe_seconds": seconds} for member in table]


def _crelu_as_positions(features: torch.Tensor) -> torch.Tensor:
    """A CReLU layer's (S, P, units, 2[, H, W]) features as conv maps (S, P, units, 2[ x H], [1 x] W): each
    unit's two outputs count as two positions of its channel, so its dead fraction asks whether either
    ever fires; the ranks run over units x positions as for a conv layer."""
    if features.dim() == 4:
        return features[..., None]
    return features.flatten(3, 4)
