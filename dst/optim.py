"""Optimizers for populations (the state surgery every refresh strategy shares: :mod:`dst.optim_state`).

**The member dimension.** A population stacks S independent learners (members): every parameter carries
a leading member dimension (a population linear layer's weight is (S, out, in), its bias (S, out)), and a
plain torch model is a population of one. :class:`SGD`, :class:`Adam`, :class:`AdamW` and
:class:`ElementwiseAdam` are elementwise, so members never influence each other. With a float ``lr`` they
perform ``torch.optim``'s operations in its order and match it to rounding; they batch each step over the
group's tensors with ``torch._foreach_*`` ops, which on CPU costs less than torch's own per-tensor loop.

**Per-member learning rates.** ``lr`` is one float shared by all members, or a sequence / 1-D tensor of S
floats, one per member. Then every parameter of that group must lead with the member dimension, and
member s's update is multiplied by lr[s] (a view of shape (S, 1, ..., 1) on the parameter's device and
dtype, built once per parameter): member s follows the trajectory that torch's optimizer with lr = lr[s]
gives its slice alone. Momentum, betas, eps and weight decay stay shared scalars. The rates live in the
param group as a float64 CPU tensor, so ``state_dict()`` / ``load_state_dict()`` carry them.

**Why ElementwiseAdam.** ``torch.optim.Adam`` keeps one step count per tensor. When a strategy resets a
weight (a re-initialised unit, a regrown connection) and zeroes its moments, the next update uses the
tensor's *old* bias correction (1 - beta^t ~ 1): with m = (1 - beta1) g and v = (1 - beta2) g^2 the first
step is lr * (1 - beta1) / sqrt(1 - beta2) ~ 3.2 lr instead of a fresh parameter's lr, and it stays inflated
for the first few dozen updates while the moments fill.
:class:`ElementwiseAdam` keeps a step count per element, so a reset weight restarts its own bias
correction and behaves exactly like a fresh Adam parameter. With nothing reset it matches
``torch.optim.Adam`` step for step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from .errors import ConfigError
from .masked import mask_of

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "ElementwiseAdam",
    "LearningRate",
    "build_optimizer",
    "OPTIMIZERS",
]

OPTIMIZERS = ("sgd", "adam", "adamw", "elementwise-adam")

#: One learning rate for all members, or one per member.
LearningRate = float | Sequence[float] | torch.Tensor


def _check_lr(owner: str, lr: LearningRate) -> float | torch.Tensor:
    """A positive finite float, or per-member rates as a float64 CPU tensor of shape (S,)."""
    problem = ConfigError(
        f"{owner}: invalid lr={lr!r}; give a positive finite number, or one per member "
        "(a sequence or 1-D tensor of S positive finite numbers)"
    )
    if isinstance(lr, torch.Tensor):
        if lr.dim() > 1 or lr.dtype == torch.bool or lr.is_complex():
            raise problem
        rates = lr.detach().to(device="cpu", dtype=torch.float64).clone()
    elif isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        rates = torch.tensor(float(lr), dtype=torch.float64)
    elif isinstance(lr, Sequence) and not isinstance(lr, str):
        if not all(isinstance(value, numbers.Real) and not isinstance(value, bool) for value in lr):
            raise problem
        rates = torch.tensor([float(value) for value in lr], dtype=torch.float64)
    else:
        raise problem
    if rates.numel() == 0 or not bool(torch.all((rates > 0) & torch.isfinite(rates))):
        raise problem
    return rates if rates.dim() == 1 else float(rates)


class _PopulationOptimizer(torch.optim.Optimizer):
    """What every optimizer here shares: the learning rate check, the member-dimension check, the cached
    per-member lr views, and a step that hands each group's parameters with a gradient to the subclass's
    ``_update(group, params, member_lrs)`` (``member_lrs``: the (S, 1, ...) rate views, or None for one rate)."""

    def __init__(self, params: Iterable, defaults: dict) -> None:
        self._member_cache: dict[tuple[torch.Tensor, str], tuple] = {}
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:  # deepcopy and pickle keep only torch's own fields
        super().__setstate__(state)
        self._member_cache = {}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # the loaded rates replace the group's, so cached views are rebuilt
            self._check_group(group)

    def _check_group(self, group: dict) -> None:
        group["lr"] = lr = _check_lr(type(self).__name__, group["lr"])
        if isinstance(lr, torch.Tensor):
            members = len(lr)
            for param in group["params"]:
                if param.dim() == 0 or param.shape[0] != members:
                    raise ConfigError(
                        f"{type(self).__name__}: a parameter of shape {tuple(param.shape)} has no leading "
                        f"member dimension of size {members}; per-member learning rates need population "
                        f"parameters (shape (S, ...) with S = {members}, one lr per member)"
                    )

    def _member_views(self, group: dict, params: list[torch.Tensor], kind: str) -> list[torch.Tensor]:
        """Per-member values of ``group`` computed in float64, viewed as (S, 1, ..., 1) on each parameter's
        device and dtype: the rates (``kind="lr"``) or the decoupled shrink factors 1 - lr * weight_decay
        (``"shrink"``, rounded once, as torch's AdamW rounds its float factor). Rebuilt only when the
        rates (replaced or changed in place) or the weight decay change."""
        lr = group["lr"]
        version = (lr._version, group["weight_decay"])
        views = []
        for param in params:
            cached = self._member_cache.get((param, kind))
            if cached is None or cached[0] is not lr or cached[1] != version:
                values = lr if kind == "lr" else 1 - lr * group["weight_decay"]
                view = values.to(device=param.device, dtype=param.dtype).view(-1, *[1] * (param.dim() - 1))
                cached = self._member_cache[(param, kind)] = (lr, version, view)
            views.append(cached[2])
        return views

    def _weight_decay(self, group: dict, params: list, grads: list, member_lrs: list | None) -> list:
        """Add weight_decay * p to the gradients (L2, as torch's SGD and Adam; returned), or with
        ``decoupled`` shrink the weights, p *= 1 - lr * weight_decay (AdamW)."""
        weight_decay = group["weight_decay"]
        if weight_decay == 0:
            return grads
        if not group.get("decoupled", False):
            return torch._foreach_add(grads, params, alpha=weight_decay)
        if member_lrs is None:
            torch._foreach_mul_(params, 1 - group["lr"] * weight_decay)
        else:
            torch._foreach_mul_(params, self._member_views(group, params, "shrink"))
        return grads

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One update of every parameter with a gradient. The step hooks of ``torch.optim`` (registered on
        this optimizer, or globally) run as torch runs them, but without the profiler scope torch wraps
        around every ``step``, which costs as much as a small population's whole update (so the class's
        ``step`` is marked ``hooked``: torch's ``Optimizer`` then leaves it unwrapped)."""
        args, kwargs = ((closure,) if closure is not None else ()), {}
        for hook in (*_global_optimizer_pre_hooks.values(), *self._optimizer_step_pre_hooks.values()):
            result = hook(self, args, kwargs)
            if result is not None:  # a hook may replace the arguments, as torch allows
                args, kwargs = result
        closure = args[0] if args else kwargs.get("closure")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [param for param in group["params"] if param.grad is not None]
            if params:
                per_member = isinstance(group["lr"], torch.Tensor)
                self._update(group, params, self._member_views(group, params, "lr") if per_member else None)
        self._optimizer_step_code()
        for hook in (*self._optimizer_step_post_hooks.values(), *_global_optimizer_post_hooks.values()):
            hook(self, args, kwargs)
        return loss

    step.hooked = True  # type: ignore[attr-defined]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) every gradient: torch's ``zero_grad`` without its profiler scope, which costs
        more than the rest of a small population-of-one step's optimizer work."""
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if set_to_none:
                    param.grad = None
                else:
                    param.grad.detach_().requires_grad_(False).zero_()


def _adam_moments(group: dict, grads: list, exp_avgs: list, exp_avg_sqs: list) -> None:
    """m <- beta1 m + (1 - beta1) g;  v <- beta2 v + (1 - beta2) g^2."""
    beta1, beta2 = group["betas"]
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)


def _adam_descend(
    params: list, numerators: list, denominators: list, lr: float, member_lrs: list | None, corrections: list
) -> None:
    """p -= lr / c * numerator / denominator for each parameter's bias correction c, lr[s] per member."""
    if member_lrs is not None:
        torch._foreach_div_(denominators, member_lrs)
        lr = 1.0
    torch._foreach_addcdiv_(params, numerators, denominators, [-lr / c for c in corrections])


def _one_minus_power(beta: float, step: torch.Tensor) -> torch.Tensor:
    """1 - beta^step per element as -expm1(step log beta): accurate where beta is near 1 (``torch.pow`` on a
    float32 step would round beta2 = 0.999 to float32 first, a 1e-5 relative error in 1 - beta2). For
    beta = 0, log is taken as -690 rather than -inf, whose product with step 0 would be NaN."""
    return torch.expm1(step * math.log(max(beta, 1e-300))).neg_()


def _check_adam_settings(owner: str, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not (all(0 <= beta < 1 for beta in betas) and eps >= 0 and weight_decay >= 0):
        raise ConfigError(
            f"{owner}: invalid betas={betas}, eps={eps}, weight_decay={weight_decay}; "
            "need 0 <= beta < 1, eps >= 0 and weight_decay >= 0"
        )


class SGD(_PopulationOptimizer):
    """SGD with momentum (dampening 0) and weight decay added to the gradient, as ``torch.optim.SGD``:
    g <- g + weight_decay p;  b <- momentum b + g (b = g on the first step);  p <- p - lr b."""

    def __init__(
        self, params: Iterable, lr: LearningRate = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        if not (0 <= momentum < 1 and weight_decay >= 0):
            raise ConfigError(
                f"SGD: invalid momentum={momentum}, weight_decay={weight_decay}; "
                "need 0 <= momentum < 1 and weight_decay >= 0"
            )
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def _update(self, group, params, member_lrs):
        momentum = group["momentum"]
        grads = self._weight_decay(group, params, [param.grad for param in params], member_lrs)
        if momentum != 0:
            # A zero buffer makes the first step's b = 0 * momentum + g = g exactly, as torch's copy of g.
            buffers = []
            for param in params:
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffers.append(state["momentum_buffer"])
            torch._foreach_mul_(buffers, momentum)
            torch._foreach_add_(buffers, grads)
            grads = buffers
        if member_lrs is None:
            torch._foreach_add_(params, grads, alpha=-group["lr"])
        else:
            torch._foreach_addcmul_(params, grads, member_lrs, value=-1)


class Adam(_PopulationOptimizer):
    """Adam as ``torch.optim.Adam``: weight decay added to the gradient, or with ``decoupled=True`` applied
    to the weights as AdamW does. One step count per tensor (state ``step``, an int)."""

    def __init__(
        self,
        params: Iterable,
        lr: LearningRate = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled: bool = False,
    ) -> None:
        _check_adam_settings(type(self).__name__, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled=decoupled)
        super().__init__(params, defaults)

    def _update(self, group, params, member_lrs):
        beta1, beta2 = group["betas"]
        states = [self.state[param] for param in params]
        for param, state in zip(params, states):
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
            state["step"] += 1
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        grads = self._weight_decay(group, params, [param.grad for param in params], member_lrs)
        _adam_moments(group, grads, exp_avgs, exp_avg_sqs)
        # denominator sqrt(v) / sqrt(1 - beta2^t) + eps; step size lr / (1 - beta1^t)
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, [(1 - beta2 ** state["step"]) ** 0.5 for state in states])
        torch._foreach_add_(denominators, group["eps"])
        corrections = [1 - beta1 ** state["step"] for state in states]
        _adam_descend(params, exp_avgs, denominators, group["lr"], member_lrs, corrections)


class AdamW(Adam):
    """Adam with decoupled weight decay (p *= 1 - lr * weight_decay), as ``torch.optim.AdamW``."""

    def __init__(
        self,
        params: Iterable,
        lr: LearningRate = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled=True)


class ElementwiseAdam(Adam):
    """Adam / AdamW with a per-element step count (state ``step`` is shaped like the parameter).

    ``decoupled=True`` applies weight decay as AdamW does (p -= lr * wd * p); otherwise it is added
    to the gradient, as in ``torch.optim.Adam``. Masked positions of a masked layer (``mask_of``, for a
    population layer shaped (S, out, in)) do not advance their clock, so every state tensor stays zero there.
    """

    def _update(self, group, params, member_lrs):
        beta1, beta2 = group["betas"]
        states = [self.state[param] for param in params]
        for param, state in zip(params, states):
            if not state:
                for key in ("step", "exp_avg", "exp_avg_sq"):
                    state[key] = torch.zeros_like(param)
            mask = mask_of(param)
            state["step"].add_(mask if mask is not None else 1)
        steps = [state["step"] for state in states]
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        grads = self._weight_decay(group, params, [param.grad for param in params], member_lrs)
        _adam_moments(group, grads, exp_avgs, exp_avg_sqs)
        # bias corrections per element; at a masked position step = 0 and exp_avg = 0
        corrections1 = [_one_minus_power(beta1, step).clamp_min_(1e-30) for step in steps]
        corrections2_sqrt = [_one_minus_power(beta2, step).sqrt_().clamp_min_(1e-30) for step in steps]
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, corrections2_sqrt)
        torch._foreach_add_(denominators, group["eps"])
        numerators = torch._foreach_div(exp_avgs, corrections1)
        _adam_descend(params, numerators, denominators, group["lr"], member_lrs, [1.0] * len(params))


@torch.no_grad()
def build_optimizer(
    name: str,
    params: Iterable[torch.Tensor],
    lr: LearningRate,
    *,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """Build an optimizer by name: ``sgd``, ``adam``, ``adamw`` or ``elementwise-adam``; ``lr`` is a float
    or one rate per member."""
    if name == "sgd":
        return SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "elementwise-adam":
        return ElementwiseAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")
