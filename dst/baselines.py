"""Classic baselines against loss of plasticity, as strategies set by config like everything else.

- ``shrink-perturb`` (Ash & Adams 2020): after every step, p <- (1 - lr * weight_decay) p + N(0, sigma^2)
  for every parameter (permuted MNIST: weight_decay 1e-4, sigma 1e-5). Masked weights stay 0.
- ``l2-init`` (Kumar et al. 2023): adds the gradient of lambda * ||theta - theta_0||^2 before the step.
- ``head-reset``: re-initialises the output layer (and its optimizer state) at every task boundary.

Plain L2 is the benchmark's ``weight_decay`` setting, and backprop with Adam its ``optimizer=adam``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import strategies
from .config import setting
from .init import INIT_SCHEMES, fans, uniform_
from .optim import reset_optimizer_state
from .refresh import NO_REFRESH, RefreshStats, RefreshStrategy, StrategyConfig

__all__ = ["ShrinkPerturbConfig", "ShrinkPerturb", "L2InitConfig", "L2Init", "HeadResetConfig", "HeadReset"]


@dataclass(frozen=True)
class ShrinkPerturbConfig(StrategyConfig):
    weight_decay: float = setting(1e-4, low=0.0, search=(1e-6, 1e-2), log=True, help="shrink: lr * wd per step")
    noise_std: float = setting(1e-5, low=0.0, search=(1e-7, 1e-3), log=True, help="perturb: sigma of the noise")


@strategies.register("shrink-perturb")
class ShrinkPerturb(RefreshStrategy):
    """Shrink & Perturb: decay every parameter and add Gaussian noise after every step."""

    Config = ShrinkPerturbConfig

    def __init__(self, model, optimizer, config=None, *, seed=None) -> None:
        super().__init__(model, optimizer, config, seed=seed)
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.lrs = [group["lr"] for group in optimizer.param_groups for _ in group["params"]]

    @torch.no_grad()
    def after_step(self) -> RefreshStats:
        super().after_step()
        c = self.config
        for param, lr in zip(self.params, self.lrs):
            if c.weight_decay:
                param.mul_(1 - lr * c.weight_decay)
            if c.noise_std:
                param.add_(torch.randn(param.shape, device=param.device, dtype=param.dtype,
                                       generator=self.generator), alpha=c.noise_std)
        for layer in self.masked:
            layer.apply_mask()
        return NO_REFRESH


@dataclass(frozen=True)
class L2InitConfig(StrategyConfig):
    strength: float = setting(1e-2, low=0.0, search=(1e-5, 1e-1), log=True, help="lambda of ||theta - theta_0||^2")


@strategies.register("l2-init")
class L2Init(RefreshStrategy):
    """L2 Init: regularise toward the initial parameters, lambda * ||theta - theta_0||^2."""

    Config = L2InitConfig

    def __init__(self, model, optimizer, config=None, *, seed=None) -> None:
        super().__init__(model, optimizer, config, seed=seed)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.initial = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def before_step(self) -> None:
        for param, start in zip(self.params, self.initial):
            if param.grad is not None:
                param.grad.add_(param - start, alpha=2 * self.config.strength)
        super().before_step()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initial": [t.clone() for t in self.initial]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for start, saved in zip(self.initial, state["initial"]):
            start.copy_(saved)


@dataclass(frozen=True)
class HeadResetConfig(StrategyConfig):
    init: str = setting("kaiming", choices=INIT_SCHEMES, help="bound of the re-initialised head weights")


@strategies.register("head-reset")
class HeadReset(RefreshStrategy):
    """Re-initialise the output layer at every task boundary (task 0 excluded)."""

    Config = HeadResetConfig

    def __init__(self, model, optimizer, config=None, *, seed=None) -> None:
        super().__init__(model, optimizer, config, seed=seed)
        layers = self.topology.weight_layers()
        if not layers:
            raise ValueError("head-reset needs a model with an nn.Linear or nn.Conv2d output layer")
        self.head = layers[-1]
        self.resets = 0

    @torch.no_grad()
    def on_task_start(self, task: int) -> None:
        if task == 0:
            return
        weight = self.head.weight
        fan_in, fan_out = fans(weight.shape)
        uniform_(weight, self.config.init, fan_in, fan_out, 1.0, self.generator)
        mask = getattr(self.head, "mask", None)
        if mask is not None:
            weight.mul_(mask)
        reset_optimizer_state(self.optimizer, weight, (slice(None),))
        if self.head.bias is not None:
            self.head.bias.zero_()
            reset_optimizer_state(self.optimizer, self.head.bias, (slice(None),))
        self.resets += 1

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "resets": self.resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.resets = int(state["resets"])
