"""UPGD: utility-based perturbed gradient descent (Elsayed & Mahmood, ICLR 2024; mohmdelsayed/upgd).

Each weight's first-order utility is traced with bias correction, then squashed into a gate in (0, 1) that
protects useful weights from both the gradient and the perturbation:

    u_t     = beta_u u_{t-1} + (1 - beta_u) (-g_t * w_t)           (the utility trace)
    u_hat_t = u_t / (1 - beta_u^t)                                   (bias correction)
    u_bar_t = sigmoid(u_hat_t / eta_t)     eta_t = the largest u_t over every parameter   (``scaling=global``)
    u_bar_t = sigmoid(u_hat_t / ||u_hat_t||)   over the last dimension of each parameter   (``scaling=local``)
    w_{t+1} = w_t (1 - lr * weight_decay) - lr (g_t + xi_t) (1 - u_bar_t),    xi_t ~ N(0, sigma^2)

as the released code's ``FirstOrderGlobalUPGD`` and ``FirstOrderLocalUPGD`` (eta is the largest *uncorrected*
trace, and the local variant's norm is ``F.normalize(u_hat, dim=-1)``: each row of a weight matrix, a whole
bias). Where eta is 0 (every trace is 0, as at the first step of a net whose gradients are all 0) the code
divides by 0; here u_bar = sigmoid(0) = 1/2 then. The defaults are the released code's best settings for
input-permuted MNIST (``ex10_statistics_input_permuted_mnist_upgd.py``: lr 0.001, beta_u 0.999, sigma
0.01, no weight decay); the learning rate is the benchmark's.

The update is written into the gradient before the optimizer's step, g <- (g + xi)(1 - u_bar) +
weight_decay * w, so that plain SGD's w <- w - lr g is the UPGD step; the strategy therefore requires SGD
without momentum or weight decay of its own. Masked positions get no noise (their gradient stays 0), and
eta runs over active weights only. In a population each member has its own traces, eta, draws and
settings (beta_u, sigma, weight_decay).
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Any

import torch

from .. import strategies
from ..config import setting
from ..errors import ConfigError
from ..masked import mask_of
from ..optim import SGD
from ..population import member_view, parameter_owners
from ..refresh import RefreshStrategy, StrategyConfig

__all__ = ["UPGDConfig", "UPGD"]

_NOISE = 0  # MemberRandom draw index of the perturbation


@dataclass(frozen=True)
class UPGDConfig(StrategyConfig):
    beta_utility: float = setting(0.999, low=0.0, high=1.0, high_open=True, search=(0.9, 0.9999),
                                  help="decay of each weight's utility trace")
    sigma: float = setting(0.01, low=0.0, search=(1e-4, 1.0), log=True, help="std of the Gaussian perturbation")
    weight_decay: float = setting(0.0, low=0.0, search=(1e-5, 1e-2), log=True, help="w <- w (1 - lr x weight_decay)")
    scaling: str = setting("global", choices=("global", "local"),
                           help="utility scaled by its global maximum, or normalised per row of each parameter")


@strategies.register("upgd")
class UPGD(RefreshStrategy):
    """UPGD: each weight's gradient and Gaussian perturbation scaled by 1 - sigmoid(its scaled utility)."""

    Config = UPGDConfig

    def __init__(self, model, optimizer, config=None, *, seed=None) -> None:
        super().__init__(model, optimizer, config, seed=seed)
        plain_sgd = isinstance(optimizer, (SGD, torch.optim.SGD)) and not any(
            group.get("momentum") or group.get("weight_decay") or group.get("nesterov") for group in optimizer.param_groups)
        if optimizer is not None and not plain_sgd:
            raise ConfigError(
                "upgd is its own update rule on top of plain SGD: use --bench optimizer=sgd momentum=0 "
                "weight_decay=0 (upgd's weight_decay setting is the decay)"
            )
        owners = parameter_owners(self.model)
        #: (parameter, its module, member-first shape) in order: the flat (S, N) tensors below concatenate them
        self.params = [(p, owners[id(p)], member_view(owners[id(p)], p).shape)
                       for p in self.model.parameters() if p.requires_grad]
        self.sizes = [math.prod(shape[1:]) for _, _, shape in self.params]
        dtype = next(self.model.parameters()).dtype
        self.trace = torch.zeros(self.members, sum(self.sizes), dtype=dtype, device=self.device)  # u, flat
        self.beta, self.sigma, self.decay = (
            torch.as_tensor(self.per_member(key), dtype=dtype, device=self.device)[:, None]  # (S, 1)
            for key in ("beta_utility", "sigma", "weight_decay")
        )
        self.perturb = bool((self.sigma > 0).any())

    def _flat(self, tensors) -> torch.Tensor:
        """(S, N): each member's tensors of every parameter, concatenated in order."""
        return torch.cat([member_view(module, t).reshape(self.members, -1)
                          for t, (_, module, _) in zip(tensors, self.params)], 1)

    @torch.no_grad()
    def before_step(self) -> None:
        super().before_step()  # masked gradients are 0
        params = [param for param, _, _ in self.params]
        if any(param.grad is None for param in params):
            raise ConfigError("upgd: a trainable parameter has no gradient this step; every one needs one")
        w, g = self._flat(params), self._flat([param.grad for param in params])
        trace, beta = self.trace, self.beta
        trace.mul_(beta).add_(g * w * (beta - 1))  # beta u + (1 - beta)(-g w)
        masks = [mask_of(param) for param in params]
        active = None if all(m is None for m in masks) else self._flat(
            [torch.ones_like(p, dtype=torch.bool) if m is None else m for p, m in zip(params, masks)])
        corrected = trace / (1 - beta ** (self.step + 1))  # u_hat
        if self.config.scaling == "global":
            eta = (trace if active is None else trace.masked_fill(~active, -torch.inf)).amax(1, keepdim=True)
            # u_hat / eta, divided (1 / eta overflows for a subnormal eta, and 0 x inf is NaN); 0 where eta is 0
            gate = torch.sigmoid(torch.where(eta == 0, 0.0, corrected / eta))
        else:  # each parameter's last dimension (a weight row, a whole bias) normalised to unit length
            rows = [part.reshape(*shape[:-1], -1) for part, (_, _, shape) in zip(corrected.split(self.sizes, 1), self.params)]
            gate = torch.sigmoid(self._flat([part / torch.linalg.vector_norm(part, dim=-1, keepdim=True).clamp_min(1e-12)
                                             for part in rows]))
        update = g
        if self.perturb:
            xi = self.random.normal((trace.shape[1],), step=self.step, draw=_NOISE).to(trace) * self.sigma
            update = g + (xi if active is None else xi * active)
        update = update * (1 - gate) + w * self.decay
        for (param, module, shape), part in zip(self.params, update.split(self.sizes, 1)):
            member_view(module, param.grad).copy_(part.view(shape))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "trace": self.trace.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.trace.copy_(state["trace"])

