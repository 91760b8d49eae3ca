"""Layer-density distributions and exact-count random masks.

Given the weight shapes of the layers to sparsify and a global density D, each distribution returns a
per-layer density d_l so that sum_l d_l * n_l = D * sum_l n_l (n_l: the layer's weight count):

- ``uniform``: d_l = D.
- ``er`` (Erdos-Renyi, Mocanu et al. 2018): d_l = eps * (n_in + n_out) / (n_in * n_out).
- ``erk`` (Erdos-Renyi-Kernel, Evci et al. 2020): for a conv,
  d_l = eps * (n_in + n_out + k_h + k_w) / (n_in * n_out * k_h * k_w); for a linear layer as ``er``.

- ``constant-fan-in`` (the layout of SRigL, Lasby et al. 2024): the densities of ``erk``, and every unit
  (a row: an output feature, or a conv's output channel over its in x k_h x k_w weights) of a layer gets
  the same number of incoming connections, fan_in_l = round(d_l * row size), at least one
  (:func:`layer_fan_ins`). The rounding moves the realised budget by at most half a weight per row.

eps is solved for the budget. A layer whose density would exceed 1 is made dense and the budget it frees
is spread over the others; this repeats until no layer exceeds 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .errors import ConfigError

__all__ = ["DISTRIBUTIONS", "layer_densities", "layer_counts", "layer_fan_ins", "random_mask", "fan_in_mask"]

DISTRIBUTIONS = ("uniform", "er", "erk", "constant-fan-in")


def _raw_density(shape: Sequence[int], distribution: str) -> float:
    n_out, n_in = shape[0], shape[1]
    kernel = tuple(shape[2:])
    if distribution == "er" or not kernel:
        return (n_in + n_out) / (n_in * n_out)
    return (n_in + n_out + sum(kernel)) / (n_in * n_out * math.prod(kernel))


def layer_densities(
    shapes: Sequence[Sequence[int]], density: float, distribution: str = "erk"
) -> list[float]:
    """Per-layer densities whose weighted mean is ``density`` (see the module docstring)."""
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density!r}")
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(
            f"unknown density distribution {distribution!r}; use one of {', '.join(DISTRIBUTIONS)}"
        )
    sizes = [math.prod(shape) for shape in shapes]
    if distribution == "uniform":
        return [density] * len(shapes)
    raw = [_raw_density(shape, "erk" if distribution == "constant-fan-in" else distribution) for shape in shapes]
    budget = density * sum(sizes)
    dense: set[int] = set()
    while True:
        free = budget - sum(sizes[i] for i in dense)
        weighted = sum(raw[i] * sizes[i] for i in range(len(shapes)) if i not in dense)
        if weighted == 0:
            return [1.0] * len(shapes)
        eps = free / weighted
        over = {i for i in range(len(shapes)) if i not in dense and eps * raw[i] > 1.0}
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense |= over


def layer_counts(shapes: Sequence[Sequence[int]], densities: Sequence[float]) -> list[int]:
    """Exact number of active weights per layer: round(d_l * n_l), at least one."""
    return [max(1, min(math.prod(s), round(d * math.prod(s)))) for s, d in zip(shapes, densities)]


def random_mask(
    shape: Sequence[int], density: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A boolean mask with exactly ``round(density * numel)`` (at least one) True entries at random."""
    numel = math.prod(shape)
    (count,) = layer_counts([shape], [density])
    mask = torch.zeros(numel, dtype=torch.bool)
    if count == numel:
        mask[:] = True
    else:
        mask[torch.randperm(numel, generator=generator)[:count]] = True
    return mask.view(*shape)


def layer_fan_ins(shapes: Sequence[Sequence[int]], densities: Sequence[float]) -> list[int]:
    """Incoming connections per unit of each layer for ``constant-fan-in``: round(d_l * row size), at least
    one and at most the row size (a row: everything but the leading output dimension)."""
    rows = [math.prod(shape[1:]) for shape in shapes]
    return [max(1, min(row, round(d * row))) for row, d in zip(rows, densities)]


def fan_in_mask(shape: Sequence[int], fan_in: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A boolean mask in which every row (output unit) has exactly ``fan_in`` True entries at random."""
    rows, row = shape[0], math.prod(shape[1:])
    if not 1 <= fan_in <= row:
        raise ConfigError(
            f"a constant fan-in of {fan_in} does not fit rows of {row} inputs; give a fan-in in [1, {row}] "
            "(a density in (0, 1])"
        )
    order = torch.rand(rows, row, generator=generator).argsort(dim=1)
    mask = torch.zeros(rows, row, dtype=torch.bool)
    mask.scatter_(1, order[:, :fan_in], True)
    return mask.view(*shape)
