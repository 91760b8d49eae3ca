"""Penalties on each weight matrix's geometry, added to the gradient before the step.

- ``parseval`` (Chung, Cherif, Precup & Meger, NeurIPS 2024; wechu/parseval_reg): lambda ||W W^T - s I||_F^2
  per layer, whose gradient is 4 lambda (W W^T - s I) W. W is the layer's (out, fan_in) matrix (a conv's
  kernels flattened), s the scale its rows' squared norms are pulled to. As the released code: every layer
  but the output layer (``output_layer=true`` adds it), s = the init gain squared (2 for ReLU nets, its
  default), lambda 1e-3 (its gridworld and MetaWorld setting; 1e-4 for LunarLander and the quadruped). The
  code also multiplies lambda by (64 / width)^2 for its width-64 PPO nets; here lambda is the paper's, as is.
- ``spectral-reg`` (Lewandowski, Kumar, Schuurmans & Machado, 2024): lambda (sigma_max(W)^k - 1)^2 per layer,
  whose gradient is 2 lambda k sigma^(k-1) (sigma^k - 1) u v^T, where sigma = u^T W v and u, v are W's top
  singular vectors, kept from step to step and refined by ``power_iterations`` power iterations per step
  (v <- W^T u / |W^T u|, u <- W v / |W v|). Every weight layer, the output layer included. Defaults k = 2,
  lambda 1e-4: neither the paper's text nor its code could be read from this machine, so these are not
  checked against it; tune them with ``studies``.

Both act on the member matrices of a population ((S, out, fan_in) batched products, each member its own
lambda), and on sparse nets through their masked weights: the penalty's gradient is masked with the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import strategies
from ..config import setting
from ..errors import ConfigError
from ..population import member_view
from ..refresh import RefreshStrategy, StrategyConfig

__all__ = ["ParsevalConfig", "Parseval", "SpectralRegConfig", "SpectralReg"]

_START = 0  # MemberRandom draw index of the power iteration's starting vectors


class _MatrixPenalty(RefreshStrategy):
    """Adds each regularised layer's penalty gradient, lambda x dR/dW, to its weight's gradient, then masks.
    A subclass defines ``penalty_gradient(index, w)``: dR/dW for layer ``index``'s (S, out, fan_in) matrices."""

    def __init__(self, model, optimizer, config=None, *, seed=None) -> None:
        super().__init__(model, optimizer, config, seed=seed)
        layers = self.topology.weight_layers()
        self.layers = layers if self.config.output_layer else layers[:-1]
        self.strength = torch.as_tensor(self.per_member("strength"), device=self.device)[:, None, None]  # (S, 1, 1)

    def matrix(self, layer: torch.nn.Module) -> torch.Tensor:
        """The layer's weight as (S, out, fan_in) member matrices (a view)."""
        weight = member_view(layer, layer.weight)
        return weight.reshape(*weight.shape[:2], -1)

    @torch.no_grad()
    def before_step(self) -> None:
        for index, layer in enumerate(self.layers):
            if layer.weight.grad is not None:
                w = self.matrix(layer)
                gradient = self.penalty_gradient(index, w) * self.strength.to(w.dtype)
                member_view(layer, layer.weight.grad).add_(gradient.view(member_view(layer, layer.weight).shape))
        super().before_step()  # masked positions: the penalty's gradient is masked too


@dataclass(frozen=True)
class ParsevalConfig(StrategyConfig):
    strength: float = setting(1e-3, low=0.0, search=(1e-5, 1e-1), log=True, help="lambda of ||W W^T - s I||_F^2")
    scale: float = setting(2.0, low=0.0, low_open=True, search=(0.5, 4.0),
                           help="s: rows' squared norms pulled to it (the init gain squared: 2 for ReLU)")
    output_layer: bool = setting(False, help="regularise the output layer too (the released code does not)")


@strategies.register("parseval")
class Parseval(_MatrixPenalty):
    """Parseval regularisation: lambda ||W W^T - s I||_F^2 on every weight matrix but the output layer's."""

    Config = ParsevalConfig

    def __init__(self, model, optimizer, config=None, *, seed=None) -> None:
        super().__init__(model, optimizer, config, seed=seed)
        self.scale = torch.as_tensor(self.per_member("scale"), device=self.device)[:, None, None]

    def penalty_gradient(self, index: int, w: torch.Tensor) -> torch.Tensor:
        gram = w @ w.transpose(1, 2)  # (S, out, out)
        gram.diagonal(dim1=1, dim2=2).sub_(self.scale[:, :, 0].to(w.dtype))  # W W^T - s I
        return 4 * gram @ w


@dataclass(frozen=True)
class SpectralRegConfig(StrategyConfig):
    strength: float = setting(1e-4, low=0.0, search=(1e-6, 1e-1), log=True, help="lambda of (sigma_max^k - 1)^2")
    power: int = setting(2, low=1, high=4, help="k: the power of the largest singular value pulled to 1")
    power_iterations: int = setting(1, low=1, high=20, help="power iterations per step on the kept singular vectors")
    output_layer: bool = setting(True, help="regularise the output layer too")


@strategies.register("spectral-reg")
class SpectralReg(_MatrixPenalty):
    """Spectral regularisation: lambda (sigma_max(W)^k - 1)^2 per weight matrix, sigma_max by power iteration."""

    Config = SpectralRegConfig

    def __init__(self, model, optimizer, config=None, *, seed=None) -> None:
        super().__init__(model, optimizer, config, seed=seed)
        for key in ("power", "power_iterations"):
            if not self.shared(key):
                raise ConfigError(f"spectral-reg: members differ in {key!r}; give every member of a population one value")
        self.u = []  # (S, out) left singular vector estimate per layer
        for index, layer in enumerate(self.layers):
            w = self.matrix(layer)
            start = self.random.normal((w.shape[1],), step=0, draw=_START + index).to(w)
            self.u.append(start / torch.linalg.vector_norm(start, dim=1, keepdim=True))

    def penalty_gradient(self, index: int, w: torch.Tensor) -> torch.Tensor:
        u = self.u[index]
        for _ in range(self.config.power_iterations):
            v = _unit((w.transpose(1, 2) @ u[..., None])[..., 0])  # (S, fan_in)
            u = _unit((w @ v[..., None])[..., 0])
        self.u[index] = u
        sigma = (u[:, None, :] @ w @ v[..., None])[:, 0, 0]  # u^T W v, (S,)
        k = self.config.power
        coefficient = 2 * k * sigma ** (k - 1) * (sigma**k - 1)
        return coefficient[:, None, None] * (u[:, :, None] * v[:, None, :])

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "u": [u.clone() for u in self.u]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for mine, saved in zip(self.u, state["u"]):
            mine.copy_(saved)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit length (a zero row stays zero)."""
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)
