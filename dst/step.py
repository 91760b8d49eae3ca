"""One training step's forward pass, per-member loss and gradients, for every member at once.

:class:`TrainingStep` is what :class:`dst.experiment.Experiment` calls between drawing a batch and the
strategy's ``before_step``: it leaves every parameter's ``.grad`` holding member s's gradient of its own loss
in member s's slice, and returns the output and the (S,) losses.

**Autograd, or the gradients written out.** A batch-one step of the small nets of plasticity benchmarks is
almost all per-operation overhead, and autograd's share (recording the graph, its engine, the Python autograd
functions) is larger than the arithmetic. For the common case, an ``nn.Sequential`` of linear layers (plain or
population :class:`dst.masked.MaskedLinear`) and elementwise activations, trained on the mean squared error or
the cross-entropy, the step computes the same quantities directly. With member s's layer l taking a_{l-1}
(batch, in) to h_l = a_{l-1} W_l^T + b_l and a_l = phi(h_l), and delta_l = dL/dh_l:

    MSE   L = mean over batch and outputs of (o - y)^2        delta_L = 2 (o - y) / (batch * outputs)
    CE    L = mean over batch of logsumexp(o) - o[y]            delta_L = (softmax(o) - onehot(y)) / batch
    dL/dW_l = delta_l^T a_{l-1}      dL/db_l = sum over batch of delta_l
    delta_{l-1} = (delta_l W_l) * phi'(h_{l-1}), with phi' written with a_{l-1} = phi(h_{l-1}) (:data:`ACTIVATIONS`)

The formulas are written once and run on torch, or for small CPU layers on numpy views of the same memory
(:mod:`dst.arrays`), whose per-call cost is several times lower. Gradients are dense, as autograd's: masks
are applied by the strategy, as before. On torch a weight's gradient is written into last step's ``.grad``
when no other code holds that tensor (a fresh one otherwise), which saves a pass over memory per layer. Forward hooks (the topology's activation capture, a plug-in's) are
called with each module's input and output; a model with any other hook (forward pre-hooks, backward hooks,
tensor hooks on parameters, global module hooks), another architecture or another loss takes autograd, and
so does every step with ``fused=False``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as torch_module

from .arrays import Arrays
from .masked import MaskedLinear
from .population import cross_entropy_per_member, forward, is_population, is_population_module, mse_per_member

__all__ = ["TrainingStep", "ACTIVATIONS"]

Array = Any  # a torch tensor or a numpy array: the formulas use what both provide (``xp`` is their module)


def _leaky_relu(module: nn.LeakyReLU):
    slope = module.negative_slope
    return (lambda xp, h: h.clip(min=0) + slope * h.clip(max=0)), (lambda d, a: d * (a > 0) + d * (a <= 0) * slope)


#: module type -> (module -> (phi(xp, h), (delta, a) -> delta * phi'(h) written with the output a = phi(h)),
#: or None where the module's settings are not covered (then the step takes autograd).
ACTIVATIONS: dict[type[nn.Module], Callable[[nn.Module], tuple[Callable, Callable] | None]] = {
    nn.ReLU: lambda module: ((lambda xp, h: h.clip(min=0)), (lambda d, a: d * (a > 0))),
    nn.Tanh: lambda module: ((lambda xp, h: xp.tanh(h)), (lambda d, a: d * (1 - a * a))),
    # sigmoid(h) = (1 + tanh(h / 2)) / 2: no overflow for large |h|
    nn.Sigmoid: lambda module: ((lambda xp, h: xp.tanh(h * 0.5) * 0.5 + 0.5), (lambda d, a: d * (a * (1 - a)))),
    nn.LeakyReLU: lambda module: _leaky_relu(module) if module.negative_slope >= 0 else None,
    nn.Identity: lambda module: ((lambda xp, h: h), (lambda d, a: d)),
}

_LOSSES = {mse_per_member: "mse", cross_entropy_per_member: "cross-entropy"}


class TrainingStep:
    """``step(x, y) -> (output, losses)`` for member-first batches, gradients left in ``.grad``.

    ``fused=None`` writes the gradients out whenever the model and loss allow (see the module's docstring);
    ``False`` always runs autograd. ``fused`` (the attribute) says which one the model allows."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        members: int,
        device: torch.device,
        fused: bool | None = None,
    ) -> None:
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.population = is_population(model)
        self._ones = torch.ones(members, device=device)
        self._layers = None if fused is False else _layers(model, loss_fn)
        self.fused = self._layers is not None
        if self.fused:
            self._loss = _LOSSES[loss_fn]
            weights = [linear.weight[0].numel() if self.population else linear.weight.numel()
                       for linear, _ in self._layers]
            compact = any("compact" in linear.__dict__ for linear, _ in self._layers)  # torch formulas only
            self.arrays = Arrays(host=not compact and Arrays.suits(device, weights))
            self._modules = list(model.modules())
            self._parameters = list(model.parameters())
            self._eye: Array | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused and self._hookless() and (self.population or x.shape[0] == 1):
            # a diverging member's inf and NaN are the experiment's to report, as with torch: no numpy warnings
            with torch.no_grad(), np.errstate(all="ignore"):
                return self._fused(x, y)
        output = forward(self.model, x, self.population)
        loss = self.loss_fn(output, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward(self._ones)  # the sum of the members' losses: each member gets its own gradient
        return output.detach(), loss.detach()

    def _hookless(self) -> bool:
        """No hook that the written-out step would skip: only forward hooks on the model's modules."""
        if (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks):
            return False
        for module in self._modules:
            if (module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
                    or module._forward_hooks_with_kwargs):
                return False
        return all(param._backward_hooks is None and param.requires_grad for param in self._parameters)

    def _fused(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        arrays = self.arrays
        xp = arrays.xp
        a = x.numpy() if arrays.host else x
        inputs = []
        compacts = []  # (a compact layer's state (dst.backends), what its weight gradient needs), else None
        for linear, activation in self._layers:  # forward: keep each layer's input a_{l-1}
            inputs.append(a)
            compact = linear.__dict__.get("compact")
            if compact is not None and compact.active:
                h, saved = compact.forward(a, None if linear.bias is None else arrays.parameter(linear, "bias"))
                compacts.append((compact, saved))
            else:
                compacts.append(None)
                h = _times_transposed(arrays.host, a, arrays.parameter(linear))  # a W^T
                if linear.bias is not None:
                    h = h + arrays.parameter(linear, "bias")[:, None]
            self._call_hooks(linear, a, h)
            a = h
            if activation is not None:
                module, (phi, _) = activation
                a = phi(xp, h)
                self._call_hooks(module, h, a)
        target = y.numpy() if arrays.host else y
        if self._loss == "mse":
            diff, count = a - target, math.prod(a.shape[1:])
            loss = (diff * diff).sum(tuple(range(1, diff.ndim))) * (1.0 / count)
            delta = diff * (2.0 / count)
        else:
            shifted = a - xp.amax(a, -1)[..., None]
            exp = xp.exp(shifted)
            total = exp.sum(-1)
            onehot = self._identity(a)[target]
            loss = (xp.log(total) - (shifted * onehot).sum(-1)).mean(1)
            delta = (exp / total[..., None] - onehot) * (1.0 / a.shape[1])
        for index in reversed(range(len(self._layers))):  # backward
            linear = self._layers[index][0]
            a_in = inputs[index]
            compact, saved = compacts[index] or (None, None)
            if compact is not None:
                self._store(compact.values, compact.weight_grad(delta, saved))
            else:  # delta^T a, into last step's gradient where it can be overwritten
                reuse = None if arrays.host else _overwritable(linear.weight, delta.shape[0], delta.shape[2], a_in.shape[2])
                gradient = _transposed_times(arrays.host, delta, a_in, out=reuse)
                if reuse is None:
                    self._store(linear.weight, gradient)
            if linear.bias is not None:
                self._store(linear.bias, delta.sum(1))
            if index:
                if compact is not None:
                    delta = compact.input_grad(delta)
                else:
                    delta = _times(arrays.host, delta, arrays.parameter(linear))  # delta W
                activation = self._layers[index - 1][1]
                if activation is not None:
                    delta = activation[1][1](delta, a_in)
        return arrays.tensor(a), arrays.tensor(loss)

    def _identity(self, output: Array) -> Array:
        """The (classes, classes) identity in the output's dtype and device: its rows are the one-hot labels."""
        if self._eye is None or self._eye.shape[0] != output.shape[-1]:
            first = self._layers[-1][0].weight
            self._eye = self.arrays.state(torch.eye(output.shape[-1], dtype=first.dtype, device=first.device))
        return self._eye

    def _call_hooks(self, module: nn.Module, inputs: Array, output: Array) -> None:
        if not module._forward_hooks:
            return
        tensor_in, tensor_out = self.arrays.tensor(inputs), self.arrays.tensor(output)
        if not self.population:  # a plain model's modules see (batch, ...) tensors
            tensor_in, tensor_out = tensor_in[0], tensor_out[0]
        for hook in module._forward_hooks.values():
            if hook(module, (tensor_in,), tensor_out) is not None:
                raise RuntimeError(
                    f"a forward hook on {type(module).__name__} returned a new output, which the written-out "
                    "training step (dst.step) cannot follow; build the Experiment with fused=False"
                )

    def _store(self, param: torch.Tensor, value: Array) -> None:
        """``value`` (member-first, fresh) becomes ``param.grad``, as autograd's gradient after ``zero_grad``.
        (Reshaped before it becomes a tensor: a torch ``view`` costs more than a small layer's arithmetic.)"""
        param.grad = self.arrays.tensor(value.reshape(param.shape))


# The three products per member (numpy's einsum runs tiny stacked products faster than its matmul; torch's
# matmul dispatches faster than its einsum).
def _times_transposed(host: bool, a: Array, b: Array) -> Array:
    """a b^T: (S, n, k), (S, m, k) -> (S, n, m)."""
    return np.einsum("snk,smk->snm", a, b) if host else a @ b.transpose(1, 2)


def _transposed_times(host: bool, a: Array, b: Array, out: torch.Tensor | None = None) -> Array:
    """a^T b: (S, k, n), (S, k, m) -> (S, n, m); for k = 1 (a batch of one) an outer product. On torch it
    may be written into ``out``."""
    if host:
        return np.einsum("skn,skm->snm", a, b)
    return torch.mul(a.transpose(1, 2), b, out=out) if a.shape[1] == 1 else torch.bmm(a.transpose(1, 2), b, out=out)


def _unshared_references() -> int:
    """What ``sys.getrefcount`` says of a parameter's ``.grad`` that only the parameter holds, seen as
    :func:`_overwritable` sees it (its local name, the call's argument, and whatever torch itself keeps):
    a higher count means some code kept a gradient, which must then not be overwritten."""
    param = nn.Parameter(torch.zeros(1))
    param.grad = torch.zeros(1)
    grad = param.grad
    return sys.getrefcount(grad)


_UNSHARED = _unshared_references()


def _overwritable(param: torch.Tensor, members: int, rows: int, columns: int) -> torch.Tensor | None:
    """``param.grad`` as an (S, rows, columns) view when the step may write this step's gradient into it
    (contiguous, not part of a graph, not held by other code), else None. At 2000 x 2000 a fresh
    16 MB gradient every step costs a second pass over memory (allocation, first touch)."""
    grad = param.grad
    if (grad is None or grad.requires_grad or not grad.is_contiguous() or grad.dtype != param.dtype
            or grad.numel() != members * rows * columns or sys.getrefcount(grad) > _UNSHARED):
        return None
    return grad.view(members, rows, columns)


def _times(host: bool, a: Array, b: Array) -> Array:
    """a b: (S, n, k), (S, k, m) -> (S, n, m)."""
    return np.einsum("snk,skm->snm", a, b) if host else a @ b


def _layers(model: nn.Module, loss_fn: Callable) -> list[tuple[nn.Linear, Any]] | None:
    """``[(linear, (activation module, (phi, phi')) or None), ...]`` when the written-out step covers
    ``model`` and ``loss_fn``, else None."""
    if loss_fn not in _LOSSES or type(model) is not nn.Sequential:
        return None
    population = is_population(model)
    layers: list[tuple[nn.Linear, Any]] = []
    for module in model:
        if isinstance(module, nn.Linear) and type(module) in (nn.Linear, MaskedLinear):
            if population != is_population_module(module) or not module.weight.dtype.is_floating_point:
                return None
            layers.append((module, None))
        elif type(module) in ACTIVATIONS and layers and layers[-1][1] is None:
            formulas = ACTIVATIONS[type(module)](module)
            if formulas is None:
                return None
            layers[-1] = (layers[-1][0], (module, formulas))
        else:
            return None
    return layers if layers and layers[-1][1] is None else None
