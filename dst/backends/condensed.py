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

:class:`CondensedLinear` holds one :class:`dst.masked.MaskedLinear`'s condensed state and converts both ways:
``condense`` builds the index from the layer's mask and moves the weights and every optimizer state tensor
shaped like them into ``values`` (the optimizer then updates ``values`` instead of the weight);
``expand`` writes them back, so the masked layer is exact again for a refresh, a probe or a checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..optim import replace_parameter
from ..population import member_view

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


class _CondensedFunction(torch.autograd.Function):
    """The layer's autograd path (models the written-out step does not cover)."""

    @staticmethod
    def forward(ctx, x, values, bias, layout):  # type: ignore[override]
        g = gather_inputs(x, layout.flat, values.shape[1], values.shape[2])
        ctx.save_for_backward(g, values)
        ctx.layout, ctx.n_in, ctx.has_bias = layout, x.shape[-1], bias is not None
        return forward(g, values, bias)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        g, values = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = input_grad(grad, values, ctx.layout.flat, ctx.n_in) if ctx.needs_input_grad[0] else None
        grad_values = weight_grad(grad, g, ctx.layout.valid) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_values, grad_bias, None


class CondensedLinear:
    """The condensed state of one masked linear layer (see the module docstring), ``active`` while the
    optimizer updates ``values`` and the layer's dense weight is not current."""

    name = "condensed"

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.active = False
        self.values: nn.Parameter | None = None
        self.index = self.flat = self.valid = None
        condensed_layout(member_view(layer, layer.mask))  # refuses a mask it cannot hold

    @torch.no_grad()
    def condense(self, optimizer: torch.optim.Optimizer | None) -> None:
        layer = self.layer
        mask = member_view(layer, layer.mask)
        self.index, valid = condensed_layout(mask)
        self.valid = None if valid is None else valid.to(layer.weight.dtype)
        members, _, n_in = mask.shape
        offsets = torch.arange(members, device=mask.device).view(-1, 1, 1) * n_in
        self.flat = (self.index + offsets).view(-1)
        weight = member_view(layer, layer.weight)
        values = weight.gather(-1, self.index)
        if self.values is not None and self.values.shape == values.shape:
            self.values.copy_(values)
            new = self.values
        else:
            new = nn.Parameter(values, requires_grad=layer.weight.requires_grad)
        if optimizer is not None:
            replace_parameter(optimizer, layer.weight, new, lambda state: member_view(layer, state).gather(-1, self.index))
        self.values = new
        self.values.grad = None
        layer.weight.grad = None
        self.active = True

    @torch.no_grad()
    def expand(self, optimizer: torch.optim.Optimizer | None) -> None:
        layer, values = self.layer, self.values
        assert values is not None and self.active
        weight = member_view(layer, layer.weight)

        def dense(state: torch.Tensor) -> torch.Tensor:  # padding (a per-element clock there too) -> 0
            out = torch.zeros_like(layer.weight)
            member_view(layer, out).scatter_(-1, self.index, state if self.valid is None else state * self.valid)
            return out

        weight.zero_().scatter_(-1, self.index, values)
        if optimizer is not None:
            replace_parameter(optimizer, values, layer.weight, dense)
        values.grad = None
        self.active = False

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's forward on a member-first input (S, batch, in), through autograd."""
        bias = self.layer.bias
        return _CondensedFunction.apply(x, self.values, None if bias is None else member_view(self.layer, bias), self)
