"""Optimizer-state surgery that every refresh strategy and sparse backend shares.

Every state tensor shaped like its parameter (SGD's momentum, Adam's moments and AMSGrad's maximum,
ElementwiseAdam's per-element step counts, for the optimizers of :mod:`dst.optim` and torch's) is what a
refresh must reset where it re-initialises weights, and what a backend must carry when it replaces a
parameter by another layout of the same weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["reset_optimizer_state", "replace_parameter"]


def reset_optimizer_state(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, index, *, flat: bool = False
) -> None:
    """Zero every state tensor shaped like ``param`` at ``index`` (a boolean mask or an index tuple, for a
    population parameter led by its member index; with ``flat=True`` a 1-D tensor of flat positions, which
    avoids a full-size mask for a few positions).

    Covers SGD momentum buffers, Adam/AdamW moments (and AMSGrad's max), and ElementwiseAdam's
    per-element step counts, for the optimizers here and torch's. An Adam's scalar step count cannot be
    reset per element: use :class:`ElementwiseAdam` where that matters.
    """
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            if flat:
                value.view(-1)[index] = 0
            else:
                value[index] = 0


def replace_parameter(
    optimizer: torch.optim.Optimizer,
    old: torch.Tensor,
    new: torch.Tensor,
    convert: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """Let ``optimizer`` update ``new`` where it updated ``old`` (same group, same place): every state tensor
    of ``old`` shaped like it becomes ``convert(tensor)`` under ``new``; other state (a scalar step count)
    moves as it is. (A sparse backend swaps a layer's dense weight for its compact values this way.)"""
    for group in optimizer.param_groups:
        params = group["params"]
        for position, param in enumerate(params):
            if param is old:
                params[position] = new
                break
        else:
            continue
        break
    else:
        raise ValueError("replace_parameter: the optimizer does not hold the parameter to replace")
    state = optimizer.state.pop(old, None)
    if state:
        optimizer.state[new] = {
            key: convert(value) if isinstance(value, torch.Tensor) and value.shape == old.shape else value
            for key, value in state.items()
        }
    cache = getattr(optimizer, "_member_cache", None)
    if cache:
        for key in [key for key in cache if key[0] is old]:
            del cache[key]
