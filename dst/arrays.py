"""Where per-step formulas read and write their arrays: torch tensors, or numpy views of the same memory.

On the CPU, torch spends a few microseconds on every call, which for a layer of a few units costs more
than the arithmetic; numpy's per-call cost is several times lower. So the per-step formulas (the fused
training step :mod:`dst.fused`, CBP's :class:`cbp.utility.UnitUtility` and :class:`cbp.weights.WeightFactors`)
are written once, with the operators, methods and module functions numpy and torch share (``*=``, ``+``,
``@``, ``abs()``, ``.sum(axes)``, ``.reshape``, ``.clip``; ``xp.tanh``, ``xp.exp``, ``xp.swapaxes`` with
``xp`` the module :attr:`Arrays.xp`), and run on what an :class:`Arrays` hands them: member-first torch
views, or on the host numpy views of the very same memory, so both paths read and write one state.
Everything else (ranking, surgery, checkpoints) uses the torch tensors.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from .population import is_population_module, member_view
from .topology import HiddenLayer

__all__ = ["Arrays", "HOST_MAX_WEIGHTS"]

#: Weights per member (of a layer, or of a layer and its consumer) up to which a per-step update on the CPU
#: uses numpy.
HOST_MAX_WEIGHTS = 1 << 15


class Arrays:
    """Member-first arrays for the per-step update: torch (``host=False``) or numpy views (``host=True``,
    CPU tensors only). Views of parameters are kept until a parameter's memory moves (a ``.data``
    assignment, a new Parameter, ``.to()``)."""

    def __init__(self, host: bool) -> None:
        self.host = host
        #: the array module of the formulas: numpy on the host, torch otherwise
        self.xp = np if host else torch
        self._views: dict[tuple[int, str], tuple[int, torch.Tensor | np.ndarray]] = {}
        self._population: dict[int, bool] = {}

    @staticmethod
    def suits(device: torch.device, weights: Iterable[int]) -> bool:
        """Whether numpy pays off: CPU tensors, each of ``weights`` (per member) at most :data:`HOST_MAX_WEIGHTS`."""
        return device.type == "cpu" and all(count <= HOST_MAX_WEIGHTS for count in weights)

    def tensor(self, array: torch.Tensor | np.ndarray) -> torch.Tensor:
        """A result of the formulas as a torch tensor (sharing a host array's memory)."""
        return torch.from_numpy(array) if self.host else array

    def state(self, tensor: torch.Tensor) -> torch.Tensor | np.ndarray:
        """A state tensor as the update writes it: itself, or a numpy view of its memory."""
        return tensor.numpy() if self.host else tensor

    def parameter(self, module: nn.Module, name: str = "weight") -> torch.Tensor | np.ndarray:
        """``module``'s parameter ``name`` with its member dimension, detached (for reading)."""
        tensor = module._parameters[name]  # the module's own dict: cheaper than nn.Module.__getattr__
        key = (id(module), name)
        cached = self._views.get(key)
        if cached is None or cached[0] != tensor.data_ptr():
            view = member_view(module, tensor.detach())
            cached = self._views[key] = (tensor.data_ptr(), view.numpy() if self.host else view)
        return cached[1]

    def output(self, layer: HiddenLayer) -> torch.Tensor | np.ndarray:
        """The layer's captured activation, (S, batch, units[, H, W])."""
        h = layer.output
        if h is None:
            raise RuntimeError(
                f"no activation of {layer.name!r} was captured: call after_step() after a forward and "
                "optimizer step of the model the strategy was built on"
            )
        population = self._population.get(id(layer))
        if population is None:
            population = self._population[id(layer)] = is_population_module(layer.producer)
        if population:
            return h.numpy() if self.host else h
        return h.numpy()[None] if self.host else h.unsqueeze(0)
