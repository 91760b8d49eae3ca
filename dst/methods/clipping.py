"""Weight clipping (Elsayed, Lan, Lyle & Mahmood, RLJ 2024; mohmdelsayed/weight-clipping).

After every optimizer step, every parameter of weight layer l is clipped to its initialisation range
stretched by kappa:

    w <- clip(w, -kappa * b_l, kappa * b_l)

b_l is the bound of U(-b_l, b_l) that initialised layer l's weights: the scheme ``init`` (``dst.init``; the
benchmarks' nets use ``kaiming``) at the layer's fans, with the gain of the activation after it (1 for the
output layer), as ``dst.nets`` initialises. A layer's bias is clipped with its weights' bound, as in the
released code (whose minimal version clips with PyTorch's default bound 1 / sqrt(fan_in), our
``init=default``; its default kappa is 1). Masked weights are 0 and stay 0. In a population every member
may have its own kappa.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import strategies
from ..config import setting
from ..init import INIT_SCHEMES, fans, init_bound, module_gain
from ..population import member_view
from ..refresh import NO_REFRESH, RefreshStats, RefreshStrategy, StrategyConfig

__all__ = ["WeightClippingConfig", "WeightClipping"]


@dataclass(frozen=True)
class WeightClippingConfig(StrategyConfig):
    kappa: float = setting(1.0, low=0.0, low_open=True, search=(1.0, 10.0), log=True,
                           help="clip each weight to +-kappa x its layer's initialisation bound")
    init: str = setting("kaiming", choices=INIT_SCHEMES, help="the scheme whose bound b_l the net was initialised with")


@strategies.register("weight-clipping")
class WeightClipping(RefreshStrategy):
    """Clip every weight and bias to +-kappa x its layer's initialisation bound after each step."""

    Config = WeightClippingConfig

    def __init__(self, model, optimizer, config=None, *, seed=None) -> None:
        super().__init__(model, optimizer, config, seed=seed)
        gains = {id(layer.producer): module_gain(layer.activation) for layer in self.topology.hidden_layers}
        kappa = torch.as_tensor(self.per_member("kappa"), device=self.device)
        #: (module, (S, 1, ...) clip limit kappa_s * b_l) per weight layer
        self.limits: list[tuple[torch.nn.Module, torch.Tensor]] = []
        for module in self.topology.weight_layers():
            weight = member_view(module, module.weight)
            fan_in, fan_out = fans(weight.shape[1:])
            bound = init_bound(self.config.init, fan_in, fan_out, gains.get(id(module), 1.0))
            self.limits.append((module, (kappa * bound).to(weight.dtype)))

    @torch.no_grad()
    def after_step(self) -> RefreshStats:
        super().after_step()
        for module, limit in self.limits:
            for param in (module.weight, module.bias):
                if param is not None:
                    view = member_view(module, param)
                    bound = limit.view(-1, *[1] * (view.dim() - 1))
                    torch.clamp(view, -bound, bound, out=view)
        return NO_REFRESH
