"""Plasticity metrics: pure functions on a feature matrix or a model, named without ambiguity.

Loss of plasticity shows up as collapsing feature rank, dead or dormant units, saturated units and
growing weights long before accuracy falls, so the probe logs all of them. Each function returns a
Python ``float`` (``int`` for ``srank``), works on any device, and states its formula in its docstring
(the exact definitions are in REFERENCE.md, "Metrics").

*Features* are activations with the samples along dim 0: ``(N, units)`` from a linear layer or
``(N, C, H, W)`` from a conv layer. Rank metrics treat a conv map as the ``(N, C*H*W)`` matrix of
flattened samples. Unit metrics treat channel ``c`` as one unit whose values are all of
``h[:, c, :, :]``. Singular values are computed in float64 whatever the input dtype: in float32 the
small singular values that decide the entropy and the 99% cut are round-off.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError

__all__ = [
    "singular_values",
    "effective_rank",
    "srank",
    "approximate_rank",
    "stable_rank",
    "spectral_ranks",
    "dead_fraction",
    "dormant_fraction",
    "inactive_fraction",
    "saturated_fraction",
    "weight_magnitude",
    "gradient_norm",
]

# Relative slack on the srank / approximate-rank threshold, so that a cumulative ratio equal to it up to round-off counts.
_RANK_TOLERANCE = 1e-12


def _check_features(features: torch.Tensor, name: str) -> None:
    if not isinstance(features, torch.Tensor):
        raise ConfigError(f"{name}: features must be a torch.Tensor, got {type(features).__name__}")
    if features.ndim not in (2, 4):
        raise ConfigError(
            f"{name}: features must be (samples, units) or conv activations (samples, channels, H, W); "
            f"got shape {tuple(features.shape)}"
        )
    if features.numel() == 0:
        raise ConfigError(f"{name}: features of shape {tuple(features.shape)} are empty; probe a non-empty batch")


def _unit_columns(features: torch.Tensor) -> torch.Tensor:
    """(rows, units): a 2-D matrix as is; (N, C, H, W) as (N*H*W, C), one column per channel."""
    if features.ndim == 4:
        return features.movedim(1, -1).reshape(-1, features.shape[1])
    return features


def singular_values(features: torch.Tensor) -> torch.Tensor:
    """Singular values sigma_1 >= sigma_2 >= ... of the (samples x features) matrix, in float64.

    A conv map (N, C, H, W) is flattened to (N, C*H*W). The result lies on ``features``' device.
    """
    _check_features(features, "singular_values")
    matrix = features.detach().reshape(features.shape[0], -1).double()
    return torch.linalg.svdvals(matrix)


def effective_rank(features: torch.Tensor) -> float:
    """Effective rank (Roy & Vetterli): erank = exp(-sum_{p_k>0} p_k ln p_k), p_k = sigma_k / sum_j sigma_j.

    Equals n for n equal nonzero singular values and 1 for a rank-1 matrix; 0.0 for the zero matrix.
    """
    return _effective_rank(singular_values(features))


def _effective_rank(sigma: torch.Tensor) -> float:
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma / total
    entropy = -torch.special.xlogy(p, p).sum()  # xlogy(0, 0) = 0: the sum runs over p_k > 0
    return float(torch.exp(entropy))


def srank(features: torch.Tensor, threshold: float = 0.99) -> int:
    """Kumar et al.'s srank (the reference code's "stable rank"): the smallest k with
    sum_{i<=k} sigma_i / sum_i sigma_i >= ``threshold``.

    Ratios within 1e-12 below the threshold count as reaching it (float round-off). 0 for the zero matrix.
    """
    _check_threshold(threshold)
    return _cumulative_rank(singular_values(features), threshold)


def _check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise ConfigError(f"srank: threshold is a fraction of the singular-value sum in (0, 1], got {threshold!r}")


def _cumulative_rank(sigma: torch.Tensor, threshold: float) -> int:
    """The smallest k whose top-k values of the descending ``sigma`` hold ``threshold`` of their sum."""
    total = sigma.sum()
    if total <= 0:
        return 0
    ratio = torch.cumsum(sigma, 0) / total
    below = int((ratio < threshold - _RANK_TOLERANCE).sum())
    return min(below + 1, sigma.numel())


def approximate_rank(features: torch.Tensor, threshold: float = 0.99) -> int:
    """Dohare et al.'s approximate rank: the smallest k with sum_{i<=k} sigma_i^2 / sum_i sigma_i^2 >=
    ``threshold`` (squared singular values: the share of the matrix's energy ||A||_F^2; srank sums them
    unsquared). Ratios within 1e-12 below the threshold count as reaching it. 0 for the zero matrix.
    """
    _check_threshold(threshold)
    return _cumulative_rank(singular_values(features) ** 2, threshold)


def stable_rank(features: torch.Tensor) -> float:
    """Stable rank proper: ||A||_F^2 / ||A||_2^2 = sum_k sigma_k^2 / sigma_1^2. 0.0 for the zero matrix."""
    return _stable_rank(singular_values(features))


def _stable_rank(sigma: torch.Tensor) -> float:
    if sigma[0] <= 0:
        return 0.0
    return float((sigma**2).sum() / sigma[0] ** 2)


def spectral_ranks(features: torch.Tensor, threshold: float = 0.99) -> dict[str, float]:
    """``effective_rank``, ``srank``, ``approximate_rank`` and ``stable_rank`` from one SVD (what the probe
    reports)."""
    _check_threshold(threshold)
    sigma = singular_values(features)
    return {
        "effective_rank": _effective_rank(sigma),
        "srank": float(_cumulative_rank(sigma, threshold)),
        "approximate_rank": float(_cumulative_rank(sigma**2, threshold)),
        "stable_rank": _stable_rank(sigma),
    }


def dead_fraction(features: torch.Tensor) -> float:
    """Fraction of units whose activation is exactly 0 on every sample (a conv channel: at every N, H, W).

    dead_i = [h_i(x) = 0 for all probe inputs x]; returns mean_i dead_i.
    """
    _check_features(features, "dead_fraction")
    dead = (_unit_columns(features.detach()) == 0).all(dim=0)
    return float(dead.double().mean())


def dormant_fraction(features: torch.Tensor, tau: float = 0.1) -> float:
    """ReDo's tau-dormant fraction: the share of units with s_i <= tau, where s_i = E|h_i| / mean_k E|h_k|.

    The expectation runs over the samples (and, for a conv channel, over its H x W positions too). A layer
    whose activations are all zero has every unit dormant: 1.0.
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau < 0:
        raise ConfigError(f"dormant_fraction: tau must be a non-negative number (ReDo uses 0.1 or 0.025), got {tau!r}")
    _check_features(features, "dormant_fraction")
    mean_abs = _unit_columns(features.detach()).double().abs().mean(dim=0)  # E|h_i|
    layer_mean = mean_abs.mean()  # mean_k E|h_k|
    if layer_mean <= 0:
        return 1.0
    score = mean_abs / layer_mean
    return float((score <= tau).double().mean())


def inactive_fraction(features: torch.Tensor, threshold: float = 0.01) -> float:
    """Dormant in the continual-CIFAR sense: the share of units active (h > 0) on fewer than ``threshold``
    of the inputs, i.e. mean_i [ mean_x [h_i(x) > 0] < threshold ].

    A conv channel counts as active on an input when h > 0 at any of its H x W positions. Meant for
    ReLU-family units; a unit that is only ever negative counts as inactive.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"inactive_fraction: threshold is a fraction of inputs in [0, 1], got {threshold!r}")
    _check_features(features, "inactive_fraction")
    active = features.detach() > 0
    if active.ndim == 4:
        active = active.flatten(2).any(dim=2)  # (N, C): channel active anywhere on the input
    active_rate = active.double().mean(dim=0)
    return float((active_rate < threshold).double().mean())


_SATURATION = {
    "tanh": lambda h: h.abs() > 0.99,
    "sigmoid": lambda h: (h < 0.01) | (h > 0.99),
}
_SATURATING_MODULES: dict[type[nn.Module], str] = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}


def saturated_fraction(features: torch.Tensor, activation: str | nn.Module) -> float:
    """Fraction of activation entries (sample x unit [x position]) in the saturated region.

    tanh: |h| > 0.99; sigmoid: h < 0.01 or h > 0.99. ``activation`` is ``"tanh"``, ``"sigmoid"`` or an
    ``nn.Tanh`` / ``nn.Sigmoid`` module; ``features`` are the activation's outputs h.
    """
    if isinstance(activation, nn.Module):
        name = _SATURATING_MODULES.get(type(activation), type(activation).__name__)
    else:
        name = str(activation).lower()
    if name not in _SATURATION:
        raise ConfigError(
            f"saturated_fraction is defined for {sorted(_SATURATION)} activations, got {name!r}; "
            "for ReLU-family units use dead_fraction or inactive_fraction"
        )
    _check_features(features, "saturated_fraction")
    return float(_SATURATION[name](features.detach()).double().mean())


def weight_magnitude(model: nn.Module, active_only: bool = False) -> dict[str, float]:
    """Mean |w| of each nn.Linear / nn.Conv2d weight, keyed by module name, plus ``"overall"``.

    ``overall`` = sum_l sum |w_l| / sum_l numel(w_l): the mean over all weight entries together, not the
    mean of the layer means. By default the zeros of masked layers count as stored entries (the
    magnitude of the dense tensor); with ``active_only=True`` a layer with a ``mask`` averages over its
    mask-active entries only (a layer with no active entry reports 0.0). Biases are not included.
    """
    names, sums, counts = [], [], []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        magnitude = module.weight.detach().abs()
        mask = getattr(module, "mask", None) if active_only else None
        if mask is not None:
            magnitude = magnitude * mask
            count = mask.sum().to(torch.float64)
        else:
            count = torch.tensor(float(magnitude.numel()), dtype=torch.float64, device=magnitude.device)
        names.append(name)
        sums.append(magnitude.sum(dtype=torch.float64))
        counts.append(count)
    if not names:
        raise ConfigError(f"weight_magnitude found no nn.Linear or nn.Conv2d layer in {type(model).__name__}")
    device = sums[0].device
    sums_t = torch.stack([s.to(device) for s in sums])
    counts_t = torch.stack([c.to(device) for c in counts])
    per_layer = torch.where(counts_t > 0, sums_t / counts_t.clamp(min=1), torch.zeros_like(sums_t))
    total = counts_t.sum()
    overall = sums_t.sum() / total if total > 0 else torch.zeros((), dtype=torch.float64)
    values = per_layer.tolist()  # one device sync for all layers
    result = dict(zip(names, values))
    result["overall"] = float(overall)
    return result


def gradient_norm(model: nn.Module) -> float:
    """Global L2 norm of the gradients present: sqrt(sum over parameters with a .grad of sum g^2).

    Parameters without a gradient are skipped; 0.0 when none has one (e.g. before the first backward).
    """
    norms = [
        torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64)
        for p in model.parameters()
        if p.grad is not None
    ]
    if not norms:
        return 0.0
    device = norms[0].device
    return float(torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms])))

