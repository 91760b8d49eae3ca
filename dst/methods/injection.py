"""Plasticity injection (Nikishin, Oh, Ostrovski, Lyle, Pascanu, Dabney & Barreto, NeurIPS 2023).

The net is an encoder phi followed by a head h (its last ``head_layers`` weight layers, with what lies
between them). At an injection the head's current parameters theta are frozen and the head trains again
from fresh parameters theta' = theta'_0, while a frozen copy of theta'_0 is subtracted:

    y = h(phi(x); theta) + h(phi(x); theta') - h(phi(x); theta'_0)

so the output is unchanged at the moment of injection, the number of trainable parameters is unchanged
(the encoder keeps training), and only theta' and phi learn afterwards. Here the trainable head keeps its
parameter tensors (the optimizer is untouched; their state is zeroed at each injection) and the frozen
theta and theta'_0 are buffers of the head's wrapper, :class:`InjectedHead`. Injecting again (``every_task``)
freezes the whole current head function the same way: after n injections
y = h(z; theta) + sum_j [h(z; A_j) - h(z; B_j)].

When: at step ``at_step`` (0: halfway through the run), or at the start of every task after the first
(``every_task``). theta' is drawn as the net was initialised (``init``, the gain of the activation after
each layer, zero biases; masked entries stay 0), each member from its own random numbers. The head must be
the tail of an ``nn.Sequential`` with at least one weight layer before it (the encoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .. import strategies
from ..config import setting
from ..errors import ConfigError, TopologyError
from ..init import INIT_SCHEMES, fans, init_bound, module_gain
from ..masked import MaskedMixin
from ..optim_state import reset_optimizer_state
from ..population import member_view
from ..refresh import NO_REFRESH, RefreshStats, RefreshStrategy, StrategyConfig
from ..topology import ACTIVATIONS

__all__ = ["PlasticityInjectionConfig", "PlasticityInjection", "InjectedHead"]

_WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)


class InjectedHead(nn.Module):
    """The head h and the frozen parameter sets of past injections: forward is
    h(z; theta) + sum_j [h(z; A_j) - h(z; B_j)], A_j and B_j buffers ``frozen{j}_{a|b}_{k}`` (k: the k-th
    trainable parameter of h). Loading a state dict with more injections than this module has creates the
    missing buffers, so a resumed run rebuilds the injections it had."""

    def __init__(self, head: nn.Sequential) -> None:
        super().__init__()
        self.head = head
        self.names = [name for name, param in head.named_parameters() if param.requires_grad]
        self.injections = 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.head(z)
        for j in range(self.injections):
            out = out + functional_call(self.head, self._frozen(j, "a"), (z,)) \
                - functional_call(self.head, self._frozen(j, "b"), (z,))
        return out

    def _frozen(self, j: int, which: str) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"frozen{j}_{which}_{k}") for k, name in enumerate(self.names)}

    @torch.no_grad()
    def inject(self, fresh: list[torch.Tensor]) -> None:
        """Freeze the current parameters as A_j, put ``fresh`` (one tensor per trainable parameter) into the
        head, and freeze a copy of it as B_j."""
        j = self.injections
        params = dict(self.head.named_parameters())
        for k, (name, value) in enumerate(zip(self.names, fresh)):
            self.register_buffer(f"frozen{j}_a_{k}", params[name].detach().clone())
            params[name].copy_(value)
            self.register_buffer(f"frozen{j}_b_{k}", value.detach().clone())
        self.injections += 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        while f"{prefix}frozen{self.injections}_a_0" in state_dict:  # the injections of a checkpoint
            j = self.injections
            for k in range(len(self.names)):  # the order inject registers them in
                for which in ("a", "b"):
                    key = f"{prefix}frozen{j}_{which}_{k}"
                    self.register_buffer(f"frozen{j}_{which}_{k}", torch.empty_like(state_dict[key]))
            self.injections += 1
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@dataclass(frozen=True)
class PlasticityInjectionConfig(StrategyConfig):
    head_layers: int = setting(2, low=1, help="trailing weight layers that form the head")
    at_step: int = setting(0, low=0, help="the step to inject at (0: halfway through the run)")
    every_task: bool = setting(False, help="inject at the start of every task after the first instead")
    init: str = setting("kaiming", choices=INIT_SCHEMES, help="the initialisation theta' is drawn from")


@strategies.register("plasticity-injection")
class PlasticityInjection(RefreshStrategy):
    """Plasticity injection: freeze the head, train a fresh one on top minus its frozen initial copy."""

    Config = PlasticityInjectionConfig

    def __init__(self, model, optimizer, config=None, *, seed=None) -> None:
        super().__init__(model, optimizer, config, seed=seed)
        for key in ("head_layers", "at_step"):
            if not self.shared(key):
                raise ConfigError(f"plasticity-injection: members differ in {key!r}; give every member one value")
        self.head = self._wrap_head(self.model, self.config.head_layers)
        self.layers = [m for m in self.head.head.modules() if isinstance(m, _WEIGHT_LAYERS)]
        self.gains = self._gains(self.head.head)

    @staticmethod
    def _wrap_head(model: nn.Module, head_layers: int) -> InjectedHead:
        existing = [m for m in model.modules() if isinstance(m, InjectedHead)]
        if existing:
            return existing[0]
        weights = [i for i, m in enumerate(model) if isinstance(m, _WEIGHT_LAYERS)] if isinstance(model, nn.Sequential) else []
        if len(weights) <= head_layers:
            raise TopologyError(
                f"plasticity-injection needs a separable head: an nn.Sequential with an encoder of at least one "
                f"weight layer before its last head_layers={head_layers} ones (this model has {len(weights)}); "
                "lower --set head_layers"
            )
        start = weights[-head_layers]
        head = InjectedHead(nn.Sequential(*list(model)[start:]))
        for index in reversed(range(start, len(model))):
            del model[index]
        model.append(head)
        return head

    @staticmethod
    def _gains(head: nn.Sequential) -> list[float]:
        """The gain of the activation after each weight layer of the head (1 for the last)."""
        modules, gains = list(head), []
        for i, module in enumerate(modules):
            if isinstance(module, _WEIGHT_LAYERS):
                after = next((m for m in modules[i + 1:] if isinstance(m, ACTIVATIONS + _WEIGHT_LAYERS)), None)
                gains.append(module_gain(after) if after is not None and not isinstance(after, _WEIGHT_LAYERS) else 1.0)
        return gains

    def _due(self, step: int) -> bool:
        at = self.config.at_step or (self.total_steps // 2 if self.total_steps else 0)
        return not self.config.every_task and at > 0 and step == at

    def after_step(self) -> RefreshStats:
        super().after_step()
        if self._due(self.step):
            self._inject()
        return NO_REFRESH

    def on_task_start(self, task: int) -> None:
        if self.config.every_task and task > 0:
            self._inject()

    @torch.no_grad()
    def _inject(self) -> None:
        """theta' for every trainable parameter of the head, in the wrapper's order: weights drawn as the net
        was initialised, biases 0, normalisation scales 1 and shifts 0."""
        drawn = {}
        for index, (layer, gain) in enumerate(zip(self.layers, self.gains)):
            weight = member_view(layer, layer.weight)
            fan_in, fan_out = fans(weight.shape[1:])
            bound = init_bound(self.config.init, fan_in, fan_out, gain)
            draw = self.random.uniform(weight.shape[1:], step=self.step, draw=index, dtype=torch.float64)
            value = ((2 * draw - 1) * bound).to(weight.dtype).view(layer.weight.shape)
            if isinstance(layer, MaskedMixin) and layer.mask is not None:
                value = value * layer.mask
            drawn[id(layer.weight)] = value
        params = dict(self.head.head.named_parameters())
        fresh = []
        for name in self.head.names:
            param = params[name]
            if id(param) in drawn:
                fresh.append(drawn[id(param)])
            else:  # a bias (0), or a normalisation's scale (1) or shift (0)
                fresh.append(torch.ones_like(param) if name.endswith("weight") else torch.zeros_like(param))
        self.head.inject(fresh)
        if self.optimizer is not None:
            for param in self.head.head.parameters():
                reset_optimizer_state(self.optimizer, param, (slice(None),))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "injections": self.head.injections}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if int(state["injections"]) != self.head.injections:
            raise ConfigError(
                f"plasticity-injection: the checkpoint's strategy made {state['injections']} injections but its "
                f"model holds {self.head.injections}; the checkpoint is inconsistent"
            )
