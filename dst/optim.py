"""Optimizers and the optimizer-state surgery that every refresh strategy shares.

``torch.optim.Adam`` keeps one step count per tensor. When a strategy resets a weight (a re-initialised
unit, a regrown connection) and zeroes its moments, the next update uses the tensor's *old* bias
correction (1 - beta^t ~ 1): with m = (1 - beta1) g and v = (1 - beta2) g^2 the first step is
lr * (1 - beta1) / sqrt(1 - beta2) ~ 3.2 lr instead of a fresh parameter's lr, and it stays inflated
for the first few dozen updates while the moments fill.
:class:`ElementwiseAdam` keeps a step count per element, so a reset weight restarts its own bias
correction and behaves exactly like a fresh Adam parameter. With nothing reset it matches
``torch.optim.Adam`` step for step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .errors import ConfigError
from .masked import mask_of

__all__ = ["ElementwiseAdam", "reset_optimizer_state", "build_optimizer", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "adam", "adamw", "elementwise-adam")


class ElementwiseAdam(torch.optim.Optimizer):
    """Adam / AdamW with a per-element step count (state ``step`` is shaped like the parameter).

    ``decoupled=True`` applies weight decay as AdamW does (p -= lr * wd * p); otherwise it is added
    to the gradient, as in ``torch.optim.Adam``. Masked positions of a masked layer do not advance
    their clock, so every state tensor stays zero there.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled: bool = False,
    ) -> None:
        if lr <= 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"ElementwiseAdam: invalid lr={lr}, betas={betas}, eps={eps}, wd={weight_decay}")
        super().__init__(
            params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled=decoupled)
        )

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros_like(param)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                if weight_decay != 0:
                    if group["decoupled"]:
                        param.mul_(1 - lr * weight_decay)
                    else:
                        grad = grad.add(param, alpha=weight_decay)
                mask = mask_of(param)
                step = state["step"]
                step.add_(mask if mask is not None else 1)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                # bias corrections per element; at a masked position step = 0 and exp_avg = 0
                bias_correction1 = 1 - torch.pow(beta1, step)
                bias_correction2_sqrt = (1 - torch.pow(beta2, step)).sqrt_()
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt.clamp_min_(1e-30)).add_(eps)
                param.addcdiv_(exp_avg / bias_correction1.clamp_min_(1e-30), denom, value=-lr)
        return loss


@torch.no_grad()
def reset_optimizer_state(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, index, *, flat: bool = False
) -> None:
    """Zero every state tensor shaped like ``param`` at ``index`` (a boolean mask or an index tuple; with
    ``flat=True`` a 1-D tensor of flat positions, which avoids a full-size mask for a few positions).

    Covers SGD momentum buffers, Adam/AdamW moments (and AMSGrad's max), and ElementwiseAdam's
    per-element step counts. ``torch.optim.Adam``'s scalar step count cannot be reset per element:
    use :class:`ElementwiseAdam` where that matters.
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


def build_optimizer(
    name: str,
    params: Iterable[torch.Tensor],
    lr: float,
    *,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """Build an optimizer by name: ``sgd``, ``adam``, ``adamw`` or ``elementwise-adam``."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "elementwise-adam":
        return ElementwiseAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")
