"""Hare & Tortoise (Lee, Cho, Kim, Kim, Min, Choo & Lyle, ICML 2024).

The trained network is the *hare*. A *tortoise* copy of its parameters follows it slowly, and the hare is
periodically put back to the tortoise:

    after every step:          theta_T <- beta theta_T + (1 - beta) theta_H
    every ``reset_every`` steps: theta_H <- theta_T   (and, with ``reset_optimizer``, the hare's optimizer
                                                       state is zeroed, as for a re-initialised network)

The tortoise starts as a copy of the initial hare. Predictions, losses and metrics are the hare's (the
network being trained). Masked weights are 0 in both. Defaults (beta 0.999, a reset every 1,000 steps,
optimizer state zeroed) are not checked against the paper: its body and its code (dojeon-ai/hare-tortoise)
could not be read from this machine, only its abstract; tune them with ``studies``. In a population each
member has its own beta and reset period.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import strategies
from ..config import setting
from ..population import member_view, parameter_owners
from ..refresh import NO_REFRESH, RefreshStats, RefreshStrategy, StrategyConfig

__all__ = ["HareTortoiseConfig", "HareTortoise"]


@dataclass(frozen=True)
class HareTortoiseConfig(StrategyConfig):
    beta: float = setting(0.999, low=0.0, high=1.0, high_open=True, search=(0.9, 0.9999),
                          help="the tortoise's EMA decay toward the hare")
    reset_every: int = setting(1000, low=1, search=(100, 100_000), log=True,
                               help="steps between resets of the hare to the tortoise")
    reset_optimizer: bool = setting(True, help="zero the hare's optimizer state at each reset")


@strategies.register("hare-tortoise")
class HareTortoise(RefreshStrategy):
    """Hare & Tortoise: the tortoise is an EMA of the trained hare, which is reset to it periodically."""

    Config = HareTortoiseConfig

    def __init__(self, model, optimizer, config=None, *, seed=None) -> None:
        super().__init__(model, optimizer, config, seed=seed)
        owners = parameter_owners(self.model)
        self.params = [(p, owners[id(p)]) for p in self.model.parameters() if p.requires_grad]
        self.tortoise = [member_view(module, p).detach().clone() for p, module in self.params]
        self.beta = torch.as_tensor(self.per_member("beta"), device=self.device)
        self.reset_every = self.per_member("reset_every")

    @torch.no_grad()
    def after_step(self) -> RefreshStats:
        super().after_step()
        for (param, module), tortoise in zip(self.params, self.tortoise):
            beta = self.beta.to(tortoise.dtype).view(-1, *[1] * (tortoise.dim() - 1))
            tortoise.mul_(beta).add_(member_view(module, param) * (1 - beta))
        resetting = (self.step % self.reset_every == 0).nonzero()[0]
        if len(resetting) == 0:
            return NO_REFRESH
        members = torch.as_tensor(resetting, device=self.device)
        for (param, module), tortoise in zip(self.params, self.tortoise):
            member_view(module, param)[members] = tortoise[members]
            if self.optimizer is not None and self.config.reset_optimizer:
                for value in self.optimizer.state.get(param, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        member_view(module, value)[members] = 0
        for layer in self.masked:
            layer.apply_mask()
        return NO_REFRESH

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tortoise": [t.clone() for t in self.tortoise]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for mine, saved in zip(self.tortoise, state["tortoise"]):
            mine.copy_(saved)
