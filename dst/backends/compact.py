"""What every compact backend shares: the values that replace a masked layer's weight, and the conversions.

A compact layer holds ``values``, member s's active weights at the flat positions ``positions[s]`` of its
(units x in) weight (padding positions, if any, are inactive ones whose values stay 0, marked False in
``valid``). :meth:`CompactLinear.condense` gathers the weight and every optimizer state tensor shaped like it
into ``values`` (the optimizer then updates ``values`` in the weight's place, ``dst.optim.replace_parameter``);
:meth:`CompactLinear.expand` scatters them back, so the masked layer is exact again. A subclass gives the
layout (:meth:`build`) and three formulas, used by the written-out step (:mod:`dst.step`) and by the autograd
function here:

    forward(a, bias) -> (h, saved)       h (S, batch, units) from the input a (S, batch, in)
    weight_grad(delta, saved)            dL/dvalues, zero at padding
    input_grad(delta)                    dL/da (S, batch, in)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from ..optim_state import replace_parameter
from ..population import member_view

__all__ = ["CompactLinear"]


class _CompactFunction(torch.autograd.Function):
    """A compact layer's autograd path (models the written-out step does not cover)."""

    @staticmethod
    def forward(ctx, x, values, bias, layer):  # type: ignore[override]
        h, saved = layer.forward(x, bias)
        ctx.layer, ctx.saved, ctx.has_bias = layer, saved, bias is not None
        return h

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        layer = ctx.layer
        grad = grad.contiguous()
        grad_x = layer.input_grad(grad) if ctx.needs_input_grad[0] else None
        grad_values = layer.weight_grad(grad, ctx.saved) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_values, grad_bias, None


class CompactLinear(ABC):
    """The compact state of one masked linear layer, ``active`` while the optimizer updates ``values`` and
    the layer's dense weight is not current."""

    name = "compact"

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.active = False
        self.values: nn.Parameter | None = None
        self.positions: torch.Tensor | None = None  # (S, N) flat positions in a member's weight
        self.valid: torch.Tensor | None = None  # (S, N) 1.0 / 0.0 in the weight's dtype, or None: no padding
        self.n_in = layer.in_features
        self.build(member_view(layer, layer.mask))  # refuses a mask the layout cannot hold

    @abstractmethod
    def build(self, mask: torch.Tensor) -> tuple[int, ...]:
        """Build the layout of ``mask`` (S, units, in): set ``positions`` and ``valid``; return the shape of
        ``values``."""

    @abstractmethod
    def forward(self, a: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        """(h (S, batch, units), what ``weight_grad`` needs) for the input ``a`` (S, batch, in)."""

    @abstractmethod
    def weight_grad(self, delta: torch.Tensor, saved: Any) -> torch.Tensor:
        """dL/dvalues from delta = dL/dh (S, batch, units), zero at padding."""

    @abstractmethod
    def input_grad(self, delta: torch.Tensor) -> torch.Tensor:
        """dL/da (S, batch, in)."""

    @torch.no_grad()
    def condense(self, optimizer: torch.optim.Optimizer | None) -> None:
        layer = self.layer
        shape = self.build(member_view(layer, layer.mask))
        members = self.positions.shape[0]

        def compact(tensor: torch.Tensor) -> torch.Tensor:
            return member_view(layer, tensor).reshape(members, -1).gather(1, self.positions).view(shape)

        values = compact(layer.weight.detach())
        if self.values is not None and self.values.shape == values.shape:
            self.values.copy_(values)
            new = self.values
        else:
            new = nn.Parameter(values, requires_grad=layer.weight.requires_grad)
        if optimizer is not None:
            replace_parameter(optimizer, layer.weight, new, compact)
        self.values = new
        self.values.grad = None
        layer.weight.grad = None
        self.active = True

    @torch.no_grad()
    def expand(self, optimizer: torch.optim.Optimizer | None) -> None:
        layer, values = self.layer, self.values
        assert values is not None and self.active
        members = self.positions.shape[0]

        def dense(state: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
            flat = state.reshape(members, -1)
            if self.valid is not None:  # padding, a per-element clock there too, -> 0
                flat = flat * self.valid
            out = torch.zeros_like(layer.weight) if out is None else out.zero_()
            member_view(layer, out).reshape(members, -1).scatter_(1, self.positions, flat)
            return out

        dense(values.detach(), layer.weight.data)
        if optimizer is not None:
            replace_parameter(optimizer, values, layer.weight, dense)
        values.grad = None
        self.active = False

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's forward on a member-first input (S, batch, in), through autograd."""
        bias = self.layer.bias
        return _CompactFunction.apply(x, self.values, None if bias is None else member_view(self.layer, bias), self)
