"""Plasticity metrics: pure functions on feature matrices or a model, one value per population member.

Loss of plasticity shows up as collapsing feature rank, dead or dormant units, saturated units and
growing weights long before accuracy falls, so the probe logs all of them. Each function states its
formula in its docstring (the exact definitions are in REFERENCE.md, "Metrics").

*Features* are activations shaped ``(..., samples, units)``: one matrix per leading index, usually
``(S, samples, units)`` for a population of S members. Every feature metric returns a tensor over the
leading dims, on the features' device: shape ``(S,)`` for a population, 0-d for a single
``(samples, units)`` matrix (``float(value)`` reads it). All members are computed in one batched call.
Singular values are computed in float64 whatever the input dtype (in float32 the small singular values
that decide the entropy and the 99% cut are round-off), with a batched SVD: from the Gram matrix
A^T A they would come 3-5x faster on CPU, but a small singular value sigma carries an error of about
sqrt(eps) * sigma_1 there, which moves the effective rank of a rank-deficient matrix in the 7th digit.

A conv activation (..., N, C, H, W) is not a matrix; :func:`conv_samples` and :func:`conv_units` turn
it into the two matrices the probe uses: ranks see one row per sample (..., N, C*H*W); unit metrics see
one column per channel whose values are all of ``h[n, c, :, :]`` (..., N*H*W, C). For
:func:`inactive_fraction`, where a channel counts as active on an input when positive at any position,
pass ``maps.amax((-2, -1))`` (..., N, C).

``weight_magnitude`` and ``gradient_norm`` work on a model and return (S,) tensors: member s's values
from member s's slice of every parameter (``dst.population.member_view``; a plain model is S = 1).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .errors import ConfigError
from .population import member_view, members

__all__ = [
    "conv_samples",
    "conv_units",
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
    if features.ndim < 2:
        raise ConfigError(
            f"{name}: features must be (..., samples, units) matrices (a population's are (S, samples, units)); "
            f"got shape {tuple(features.shape)}"
        )
    if features.numel() == 0:
        raise ConfigError(f"{name}: features of shape {tuple(features.shape)} are empty; probe a non-empty batch")


def conv_samples(maps: torch.Tensor) -> torch.Tensor:
    """Conv activations (..., N, C, H, W) as (..., N, C*H*W): one row per sample (for the rank metrics)."""
    return maps.flatten(-3)


def conv_units(maps: torch.Tensor) -> torch.Tensor:
    """Conv activations (..., N, C, H, W) as (..., N*H*W, C): channel c is one unit whose values are all
    of h[n, c, :, :] (for the dead, dormant and saturated fractions)."""
    return maps.movedim(-3, -1).flatten(-4, -2)


def singular_values(features: torch.Tensor) -> torch.Tensor:
    """Singular values sigma_1 >= sigma_2 >= ... of each (samples x units) matrix, in float64:
    (..., samples, units) -> (..., min(samples, units)), on ``features``' device."""
    _check_features(features, "singular_values")
    return torch.linalg.svdvals(features.detach().double())


def effective_rank(features: torch.Tensor) -> torch.Tensor:
    """Effective rank (Roy & Vetterli): erank = exp(-sum_{p_k>0} p_k ln p_k), p_k = sigma_k / sum_j sigma_j.

    Equals n for n equal nonzero singular values and 1 for a rank-1 matrix; 0 for the zero matrix.
    """
    return _effective_rank(singular_values(features))


def _effective_rank(sigma: torch.Tensor) -> torch.Tensor:
    total = sigma.sum(-1, keepdim=True)
    p = sigma / torch.where(total > 0, total, 1.0)
    entropy = -torch.special.xlogy(p, p).sum(-1)  # xlogy(0, 0) = 0: the sum runs over p_k > 0
    return torch.where(total[..., 0] > 0, torch.exp(entropy), 0.0)


def _check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
        raise ConfigError(f"srank: threshold is a fraction of the singular-value sum in (0, 1], got {threshold!r}")


def _cumulative_rank(sigma: torch.Tensor, threshold: float) -> torch.Tensor:
    """The smallest k whose top-k values of the descending ``sigma`` (..., n) hold ``threshold`` of their sum."""
    total = sigma.sum(-1, keepdim=True)
    ratio = torch.cumsum(sigma, -1) / torch.where(total > 0, total, 1.0)
    below = (ratio < threshold - _RANK_TOLERANCE).sum(-1)
    rank = torch.clamp(below + 1, max=sigma.shape[-1])
    return torch.where(total[..., 0] > 0, rank, 0)


def srank(features: torch.Tensor, threshold: float = 0.99) -> torch.Tensor:
    """Kumar et al.'s srank (the reference code's "stable rank"): the smallest k with
    sum_{i<=k} sigma_i / sum_i sigma_i >= ``threshold``. int64.

    Ratios within 1e-12 below the threshold count as reaching it (float round-off). 0 for the zero matrix.
    """
    _check_threshold(threshold)
    return _cumulative_rank(singular_values(features), threshold)


def approximate_rank(features: torch.Tensor, threshold: float = 0.99) -> torch.Tensor:
    """Dohare et al.'s approximate rank: the smallest k with sum_{i<=k} sigma_i^2 / sum_i sigma_i^2 >=
    ``threshold`` (squared singular values: the share of the matrix's energy ||A||_F^2; srank sums them
    unsquared). int64. Ratios within 1e-12 below the threshold count as reaching it. 0 for the zero matrix.
    """
    _check_threshold(threshold)
    return _cumulative_rank(singular_values(features) ** 2, threshold)


def stable_rank(features: torch.Tensor) -> torch.Tensor:
    """Stable rank proper: ||A||_F^2 / ||A||_2^2 = sum_k sigma_k^2 / sigma_1^2. 0 for the zero matrix."""
    return _stable_rank(singular_values(features))


def _stable_rank(sigma: torch.Tensor) -> torch.Tensor:
    top = sigma[..., 0]
    return torch.where(top > 0, (sigma**2).sum(-1) / torch.where(top > 0, top, 1.0) ** 2, 0.0)


def spectral_ranks(features: torch.Tensor, threshold: float = 0.99) -> dict[str, torch.Tensor]:
    """``effective_rank``, ``srank``, ``approximate_rank`` and ``stable_rank`` from one batched SVD (what
    the probe reports), each over the leading dims of ``features``."""
    _check_threshold(threshold)
    sigma = singular_values(features)
    return {
        "effective_rank": _effective_rank(sigma),
        "srank": _cumulative_rank(sigma, threshold),
        "approximate_rank": _cumulative_rank(sigma**2, threshold),
        "stable_rank": _stable_rank(sigma),
    }


def dead_fraction(features: torch.Tensor) -> torch.Tensor:
    """Fraction of units whose activation is exactly 0 on every sample.

    dead_i = [h_i(x) = 0 for all probe inputs x]; returns mean_i dead_i (float64).
    """
    _check_features(features, "dead_fraction")
    dead = (features.detach() == 0).all(dim=-2)
    return dead.double().mean(-1)


def dormant_fraction(features: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """ReDo's tau-dormant fraction: the share of units with s_i <= tau, where s_i = E|h_i| / mean_k E|h_k|.

    The expectation runs over the samples. A matrix whose activations are all zero has every unit
    dormant: 1.
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau < 0:
        raise ConfigError(f"dormant_fraction: tau must be a non-negative number (ReDo uses 0.1 or 0.025), got {tau!r}")
    _check_features(features, "dormant_fraction")
    samples = features.shape[-2]
    mean_abs = torch.linalg.vector_norm(features.detach(), 1, dim=-2, dtype=torch.float64) / samples  # E|h_i|
    layer_mean = mean_abs.mean(-1, keepdim=True)  # mean_k E|h_k|
    score = mean_abs / torch.where(layer_mean > 0, layer_mean, 1.0)
    dormant = (score <= tau).double().mean(-1)
    return torch.where(layer_mean[..., 0] > 0, dormant, 1.0)


def inactive_fraction(features: torch.Tensor, threshold: float = 0.01) -> torch.Tensor:
    """Dormant in the continual-CIFAR sense: the share of units active (h > 0) on fewer than ``threshold``
    of the inputs, i.e. mean_i [ mean_x [h_i(x) > 0] < threshold ].

    Meant for ReLU-family units; a unit that is only ever negative counts as inactive. For conv channels
    pass ``maps.amax((-2, -1))``: a channel is active on an input when h > 0 at any of its positions.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"inactive_fraction: threshold is a fraction of inputs in [0, 1], got {threshold!r}")
    _check_features(features, "inactive_fraction")
    active_rate = (features.detach() > 0).sum(dim=-2, dtype=torch.float64) / features.shape[-2]
    return (active_rate < threshold).double().mean(-1)


_SATURATION = {
    "tanh": lambda h: h.abs() > 0.99,
    "sigmoid": lambda h: (h < 0.01) | (h > 0.99),
}
_SATURATING_MODULES: dict[type[nn.Module], str] = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}


def saturated_fraction(features: torch.Tensor, activation: str | nn.Module) -> torch.Tensor:
    """Fraction of activation entries (sample x unit) in the saturated region.

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
    return _SATURATION[name](features.detach()).double().mean((-2, -1))


def _stack_members(values: list[torch.Tensor], what: str) -> torch.Tensor:
    """(count, S) from per-module (S,) tensors; a model whose modules disagree on S is refused."""
    sizes = {value.shape[0] for value in values}
    if len(sizes) > 1:
        raise ConfigError(
            f"{what}: the model's layers hold {sorted(sizes)} members; a population's layers all have one "
            "size (a plain layer is a population of one and cannot sit in a larger population)"
        )
    device = values[0].device
    return torch.stack([value.to(device) for value in values])


def weight_magnitude(model: nn.Module, active_only: bool = False) -> dict[str, torch.Tensor]:
    """Mean |w| of each nn.Linear / nn.Conv2d weight per member, keyed by module name, plus ``"overall"``.

    Each value is an (S,) float64 tensor. ``overall`` = sum_l sum |w_l| / sum_l numel(w_l) per member:
    the mean over all weight entries together, not the mean of the layer means. By default the zeros of
    masked layers count as stored entries (the magnitude of the dense tensor); with ``active_only=True``
    a layer with a ``mask`` averages over its mask-active entries only (a member with no active entry in
    a layer reports 0 there). Biases are not included.
    """
    names, sums, counts = [], [], []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        magnitude = member_view(module, module.weight.detach()).abs().flatten(1)  # (S, entries)
        mask = getattr(module, "mask", None) if active_only else None
        if mask is not None:
            mask = member_view(module, mask).flatten(1)
            sums.append((magnitude * mask).sum(1, dtype=torch.float64))
            counts.append(mask.sum(1, dtype=torch.float64))
        else:
            sums.append(magnitude.sum(1, dtype=torch.float64))
            counts.append(torch.full_like(sums[-1], float(magnitude.shape[1])))
        names.append(name)
    if not names:
        raise ConfigError(f"weight_magnitude found no nn.Linear or nn.Conv2d layer in {type(model).__name__}")
    sums_t = _stack_members(sums, "weight_magnitude")  # (layers, S)
    counts_t = _stack_members(counts, "weight_magnitude")
    per_layer = torch.where(counts_t > 0, sums_t / counts_t.clamp(min=1), 0.0)
    total = counts_t.sum(0)
    result = dict(zip(names, per_layer.unbind(0)))
    result["overall"] = torch.where(total > 0, sums_t.sum(0) / total.clamp(min=1), 0.0)
    return result


def gradient_norm(model: nn.Module, gradients: Mapping[str, torch.Tensor | None] | None = None) -> torch.Tensor:
    """Global L2 norm of each member's gradient: sqrt(sum over parameters of sum g_s^2), an (S,) float64 tensor.

    The gradients are the parameters' ``.grad``, or ``gradients`` (parameter name as in
    ``model.named_parameters()`` -> gradient) when given, e.g. a gradient computed aside with
    ``torch.autograd.grad``. Parameters without a gradient are skipped; 0 when none has one (before the
    first backward).
    """
    squares, seen = [], set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            grad = param.grad if gradients is None else gradients.get(name)
            if grad is not None:
                squares.append(member_view(module, grad.detach()).flatten(1).double().square().sum(1))
    if not squares:
        device = next((p.device for p in model.parameters()), None)
        return torch.zeros(members(model), dtype=torch.float64, device=device)
    return _stack_members(squares, "gradient_norm").sum(0).sqrt()
