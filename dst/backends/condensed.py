"""The condensed backend: a constant fan-in linear layer as values and input indices, (members, units, k).

A mask in which every unit (row) of a member has k incoming connections, or none (a unit SRigL ablated),
is stored as ``index`` (S, units, k), the input positions of each row in ascending order, and ``values``
(S, units, k), the weights there: k / in_features of the dense bytes. With a_s (batch, in) member s's
input, g[s, u, j, b] = a_s[b, index[s, u, j]] its gathered inputs, and delta = dL/dh:

    forward         h[s, b, u]      = sum_j values[s, u, j] g[s, u, j, b]  (+ bias)
    weight gradient dvalues[s, u, j] = sum_b delta[s, b, u] g[s, u, j, b]
    input gradient  da[s, b, i]     = sum over (u, j) with index[s, u, j] = i of delta[s, b, u] values[s, u, j]

No dense matrix is read or written: a gather, a batched dot product per unit, and a scatter-add. Where
members differ in k (or a unit is ablated), rows are padded to the largest k with distinct inactive positions
whose values stay 0: their gradient is zeroed (``valid``), so every optimizer keeps them at 0.

:class:`CondensedLinear` is one :class:`dst.masked.MaskedLinear`'s condensed state; the conversions both ways
(weights and optimizer state) are :class:`dst.backends.compact.CompactLinear`'s.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .compact import CompactLinear

__all__ = ["CondensedLinear", "condensed_layout", "gather_inputs", "forward", "weight_grad", "input_grad"]


def condensed_layout(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(index (S, units, k), valid (S, units, k) bool or None) of a member-first mask (S, units, in).

    ``index`` lists each row's active inputs in ascending order, then (where a row has fewer than k) distinct
    inactive ones, marked False in ``valid`` (None when no row is padded). Refuses a mask in which a member's
    non-empty rows differ in fan-in: the condensed layout is for constant fan-in (the CSR backend takes any)."""
    counts = mask.sum(-1)
    widest = counts.max(-1, keepdim=True).values
    if bool(((counts != widest) & (counts > 0)).any()):
        raise ConfigError(
            "the condensed backend needs a constant fan-in (every unit of a member with the same number of "
            "inputs, or none), and this mask has units with different fan-ins: sparsify with "
            "distribution='constant-fan-in', or use backend=masked or backend=csr"
        )
    k = int(widest.max())
    if k == 0:
        raise ConfigError("the condensed backend got a layer without any active connection; use backend=masked")
    if bool((counts == k).all()):
        index = mask.nonzero()[:, -1].view(*mask.shape[:-1], k)  # row-major: each row's inputs ascending
        return index, None
    index = mask.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)[..., :k]
    return index, mask.gather(-1, index)


def gather_inputs(a: torch.Tensor, flat: torch.Tensor, units: int, k: int) -> torch.Tensor:
    """g (S * units, k, batch) from the input a (S, batch, in) at the global positions ``flat`` (index + s * in)."""
    members, batch, n_in = a.shape
    if batch == 1:  # a 1-D gather: several times faster than one of rows of one element
        return a.reshape(members * n_in).index_select(0, flat).view(members * units, k, 1)
    return a.transpose(1, 2).reshape(members * n_in, batch).index_select(0, flat).view(members * units, k, batch)


def forward(g: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """h (S, batch, units) = sum_j values g (+ bias)."""
    members, units, k = values.shape
    h = torch.bmm(values.reshape(members * units, 1, k), g).view(members, units, -1).transpose(1, 2)
    return h if bias is None else h + bias.unsqueeze(1)


def weight_grad(delta: torch.Tensor, g: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """dvalues (S, units, k) = sum_b delta g, zero at padding."""
    members, batch, units = delta.shape
    per_unit = delta.transpose(1, 2).reshape(members * units, batch, 1)
    # one example: an elementwise product (a batched matrix product of 1 x 1 blocks costs ~10x more)
    grad = (g * per_unit) if batch == 1 else torch.bmm(g, per_unit)
    grad = grad.view(members, units, -1)
    return grad if valid is None else grad.mul_(valid)


def input_grad(delta: torch.Tensor, values: torch.Tensor, flat: torch.Tensor, n_in: int) -> torch.Tensor:
    """da (S, batch, in): every connection's delta x value added at its input."""
    members, batch, units = delta.shape
    k = values.shape[-1]
    parts = values.reshape(members * units, k, 1) * delta.transpose(1, 2).reshape(members * units, 1, batch)
    if batch == 1:
        da = torch.zeros(members * n_in, dtype=delta.dtype, device=delta.device)
        return da.scatter_add_(0, flat, parts.view(-1)).view(members, 1, n_in)
    da = torch.zeros(members * n_in, batch, dtype=delta.dtype, device=delta.device)
    da.index_add_(0, flat, parts.view(members * units * k, batch))
    return da.view(members, n_in, batch).transpose(1, 2)


class CondensedLinear(CompactLinear):
    """A constant fan-in layer as ``values`` and ``index`` (S, units, k), see the module docstring."""

    name = "condensed"

    def build(self, mask: torch.Tensor) -> tuple[int, ...]:
        self.index, valid = condensed_layout(mask)
        members, units, n_in = mask.shape
        k = self.index.shape[-1]
        self.flat = (self.index + torch.arange(members, device=mask.device).view(-1, 1, 1) * n_in).view(-1)
        self.positions = (self.index + torch.arange(units, device=mask.device).view(1, -1, 1) * n_in).view(members, -1)
        self.valid = None if valid is None else valid.view(members, -1).to(self.layer.weight.dtype)
        return members, units, k

    def forward(self, a: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        values = self.values.detach()
        g = gather_inputs(a, self.flat, values.shape[1], values.shape[2])
        return forward(g, values, bias), g

    def weight_grad(self, delta: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
        valid = None if self.valid is None else self.valid.view(self.values.shape)
        return weight_grad(delta, saved, valid)

    def input_grad(self, delta: torch.Tensor) -> torch.Tensor:
        return input_grad(delta, self.values.detach(), self.flat, self.n_in)
