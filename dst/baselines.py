"""Classic baselines against loss of plasticity, as strategies set by config like everything else.

- ``shrink-perturb`` (Ash & Adams 2020): after every step, p <- (1 - lr * weight_decay) p + N(0, sigma^2)
  for every parameter (permuted MNIST: weight_decay 1e-4, sigma 1e-5). Masked weights stay 0.
- ``l2-init`` (Kumar et al. 2023): adds the gradient of lambda * ||theta - theta_0||^2 before the step.
- ``head-reset``: re-initialises the output layer (and its optimizer state) at every task boundary.
- ``retrain``: a whole fresh network (and optimizer state) at every task boundary.

Plain L2 is the benchmark's ``weight_decay`` setting, and backprop with Adam its ``optimizer=adam``.

In a population every member may have its own ``weight_decay``, ``noise_std`` and ``strength`` (and its
own learning rate, where the optimizer holds one per member); parameters are read member-first
(``dst.population.member_view``), and the noise and the fresh head weights are each member's own draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from . import strategies
from .config import setting
from .errors import ConfigError
from .init import INIT_SCHEMES, fans, init_bound, module_gain
from .optim_state import reset_optimizer_state
from .population import MemberLayerNorm, member_view, parameter_owners
from .refresh import NO_REFRESH, RefreshStats, RefreshStrategy, StrategyConfig
from .streams.base import derive_seed

__all__ = ["ShrinkPerturbConfig", "ShrinkPerturb", "L2InitConfig", "L2Init", "HeadResetConfig", "HeadReset",
           "RetrainConfig", "Retrain"]


def _per_member(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """(S,) host values as a tensor that broadcasts over a member-first tensor shaped like ``like``."""
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(-1, *[1] * (like.dim() - 1))


@dataclass(frozen=True)
class ShrinkPerturbConfig(StrategyConfig):
    weight_decay: float = setting(1e-4, low=0.0, search=(1e-6, 1e-2), log=True, help="shrink: lr * wd per step")
    noise_std: float = setting(1e-5, low=0.0, search=(1e-7, 1e-3), log=True, help="perturb: sigma of the noise")


@strategies.register("shrink-perturb")
class ShrinkPerturb(RefreshStrategy):
    """Shrink & Perturb: decay every parameter and add Gaussian noise after every step.

    The learning rate of each parameter is its optimizer group's at construction (one value, or one per
    member).
    """

    Config = ShrinkPerturbConfig

    def __init__(self, model, optimizer, config=None, *, seed=None) -> None:
        super().__init__(model, optimizer, config, seed=seed)
        owners = parameter_owners(self.model)
        decay, noise = self.per_member("weight_decay"), self.per_member("noise_std")
        self.shrink, self.perturb = bool(decay.any()), bool(noise.any())
        # (parameter, its module, shrink factor 1 - lr * wd, sigma), the last two per member
        self.params: list[tuple[torch.Tensor, nn.Module, torch.Tensor, torch.Tensor]] = []
        for group in optimizer.param_groups:
            lr = np.broadcast_to(torch.as_tensor(group["lr"], dtype=torch.float64).cpu().numpy(), (self.members,))
            for param in group["params"]:
                module = owners[id(param)]
                view = member_view(module, param)
                self.params.append((param, module, _per_member(1 - lr * decay, view), _per_member(noise, view)))
        self.numel = sum(member_view(module, param)[0].numel() for param, module, _, _ in self.params)

    @torch.no_grad()
    def after_step(self) -> RefreshStats:
        super().after_step()
        # one draw per step for every parameter (per-call cost dominates small nets), split in order
        noise = self.random.normal((self.numel,), step=self.step) if self.perturb else None
        offset = 0
        for param, module, factor, sigma in self.params:
            param = member_view(module, param)
            if self.shrink:
                param.mul_(factor)
            if noise is not None:
                size = param[0].numel()
                part = noise[:, offset : offset + size].view(param.shape).to(param.dtype)
                param.add_(part.mul_(sigma))
                offset += size
        for layer in self.masked:
            layer.apply_mask()
        return NO_REFRESH


@dataclass(frozen=True)
class L2InitConfig(StrategyConfig):
    strength: float = setting(1e-2, low=0.0, search=(1e-5, 1e-1), log=True, help="lambda of ||theta - theta_0||^2")


@strategies.register("l2-init")
class L2Init(RefreshStrategy):
    """L2 Init: regularise toward the initial parameters, lambda * ||theta - theta_0||^2 (theta_0: each
    member's own parameters when the strategy is built)."""

    Config = L2InitConfig

    def __init__(self, model, optimizer, config=None, *, seed=None) -> None:
        super().__init__(model, optimizer, config, seed=seed)
        owners = parameter_owners(self.model)
        self.params = [(p, owners[id(p)]) for p in self.model.parameters() if p.requires_grad]
        self.initial = [p.detach().clone() for p, _ in self.params]
        strength = self.per_member("strength")
        self.coefficients = [_per_member(2 * strength, member_view(m, p)) for p, m in self.params]  # 2 lambda

    @torch.no_grad()
    def before_step(self) -> None:
        for (param, module), start, coefficient in zip(self.params, self.initial, self.coefficients):
            if param.grad is not None:
                pull = member_view(module, param - start).mul_(coefficient)  # 2 lambda (theta - theta_0)
                member_view(module, param.grad).add_(pull)
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
    """Re-initialise the output layer at every task boundary (task 0 excluded): weights U(-b, b) with the
    ``init`` scheme's bound at gain 1 (masked entries stay 0), bias 0, their optimizer state zeroed."""

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
        head = self.head
        weight = member_view(head, head.weight)
        fan_in, fan_out = fans(weight.shape[1:])
        bound = init_bound(self.config.init, fan_in, fan_out, 1.0)
        uniform = self.random.uniform(weight.shape[1:], step=self.step, dtype=torch.float64)
        weight.copy_((2 * uniform - 1) * bound)
        mask = getattr(head, "mask", None)
        if mask is not None:
            head.weight.mul_(mask)
        if self.optimizer is not None:
            reset_optimizer_state(self.optimizer, head.weight, (slice(None),))
        if head.bias is not None:
            head.bias.zero_()
            if self.optimizer is not None:
                reset_optimizer_state(self.optimizer, head.bias, (slice(None),))
        self.resets += 1

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "resets": self.resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.resets = int(state["resets"])


_RETRAIN = 61  # seed-derivation key of the fresh networks


@dataclass(frozen=True)
class RetrainConfig(StrategyConfig):
    init: str = setting("kaiming", choices=INIT_SCHEMES,
                        help="bound of the fresh weights (models without their own reinitialise)")


@strategies.register("retrain")
class Retrain(RefreshStrategy):
    """Retraining from scratch: at every task boundary (task 0 excluded) the network starts afresh, with new
    weights, zero biases, fresh normalisation layers (BatchNorm statistics included) and zero optimizer state.

    A model that knows how it was drawn (``model.reinitialise(generator)``, as :class:`dst.resnet.ResNet18`)
    draws itself again, from a generator of the member's seed and the task. Any other model gets each
    Linear/Conv2d weight from U(-b, b) with the ``init`` scheme's bound at the gain of the activation it
    feeds (1 for the output layer), masked entries 0, each member its own draw: as dst's ``mlp`` and
    ``convnet`` draw them. The authors' class-incremental CIFAR baseline draws the weights again but keeps
    SGD's momentum and the BatchNorm running statistics; a fresh network is what retraining means."""

    Config = RetrainConfig

    def __init__(self, model, optimizer, config=None, *, seed=None) -> None:
        super().__init__(model, optimizer, config, seed=seed)
        self.redraws_itself = callable(getattr(self.model, "reinitialise", None))
        if self.redraws_itself and self.members != 1:
            raise ConfigError(f"{type(self.model).__name__}.reinitialise draws one network; run it as a population of one")
        self.retrains = 0

    @torch.no_grad()
    def on_task_start(self, task: int) -> None:
        if task == 0:
            return
        if self.redraws_itself:
            self.model.reinitialise(torch.Generator().manual_seed(derive_seed(self.seeds[0], _RETRAIN, task)))
        else:
            self._redraw(task)
        if self.optimizer is not None:
            for param in self.model.parameters():
                reset_optimizer_state(self.optimizer, param, (slice(None),))
        self.retrains += 1

    def _redraw(self, task: int) -> None:
        gains = {id(layer.producer): module_gain(layer.activation) for layer in self.topology}
        for index, module in enumerate(self.topology.weight_layers()):
            weight = member_view(module, module.weight)
            fan_in, fan_out = fans(weight.shape[1:])
            bound = init_bound(self.config.init, fan_in, fan_out, gains.get(id(module), 1.0))
            uniform = self.random.uniform(weight.shape[1:], step=task, draw=index, dtype=torch.float64)
            weight.copy_((2 * uniform - 1) * bound)
            if module.bias is not None:
                module.bias.zero_()
        for layer in self.masked:
            layer.apply_mask()
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase):
                module.reset_running_stats()
            if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, MemberLayerNorm)):
                if getattr(module, "weight", None) is not None:
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "retrains": self.retrains}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.retrains = int(state["retrains"])
