"""Continual backpropagation (``cbp``) and ReDo (``redo``) as dst refresh strategies.

Both register into ``dst.strategies`` through the entry-point group, exactly as a third-party package
would, and both use dst's shared surgery (``dst.refresh.replace_units``); neither copies it.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dst import strategies
from dst.config import setting
from dst.errors import TopologyError
from dst.init import INIT_SCHEMES, module_gain
from dst.refresh import NO_REFRESH, RefreshStats, RefreshStrategy, StrategyConfig, replace_units
from dst.topology import HiddenLayer, Topology

from .utility import UTILITIES, UnitUtility
from .weights import HostWeightFactors, WeightFactors

__all__ = ["CBPConfig", "ContinualBackprop", "ReDoConfig", "ReDo", "redraw_fan_in"]


HOST_MAX_WEIGHTS = 1 << 15  # producer + consumer weights per layer up to which CPU updates use numpy


@dataclass(frozen=True)
class CBPConfig(StrategyConfig):
    """Continual backpropagation settings; defaults are the paper's (REFERENCE.md)."""

    replacement_rate: float = setting(
        1e-4, low=0.0, high=1.0, search=(1e-6, 1e-2), log=True, help="units replaced per eligible unit per step"
    )
    maturity_threshold: int = setting(
        100, low=0, search=(10, 10_000), log=True, help="steps a unit is protected after (re)initialisation"
    )
    decay_rate: float = setting(
        0.99, low=0.0, high=1.0, high_open=True, search=(0.9, 0.999), help="running-average decay eta"
    )
    utility: str = setting("adaptable_contribution", choices=UTILITIES, help="unit utility measure")
    init: str = setting("kaiming", choices=INIT_SCHEMES, help="bound of re-initialised incoming weights")
    accumulate: str = setting(
        "exact", choices=("exact", "probabilistic"),
        help="exact fractional accumulator, or the released code's probabilistic rounding",
    )
    bias_correction: bool = setting(True, help="fold a replaced unit's mean contribution into the consumer bias")
    refresh_fan_in: str = setting(
        "keep", choices=("keep", "redraw"), help="sparse layers: keep the incoming mask row or draw a new one"
    )
    magnitude_every: int = setting(
        1, low=1,
        help="steps between recomputing the |w| sums of large weight matrices (1: every step, exact; "
        "larger amortises the reads of every weight on wide nets; matrices under 65,536 entries and the "
        "replaced units' own sums stay exact)",
    )


def redraw_fan_in(layer: HiddenLayer, units: torch.Tensor, generator: torch.Generator | None) -> None:
    """Give each unit a new random incoming mask row with as many connections as it had."""
    mask = getattr(layer.producer, "mask", None)
    if mask is None:
        return
    rows = mask[units].reshape(units.numel(), -1)
    counts = rows.sum(1, keepdim=True)
    scores = torch.rand(rows.shape, device=rows.device, generator=generator)
    ranks = scores.argsort(1).argsort(1)
    mask[units] = (ranks < counts).reshape(mask[units].shape)


@strategies.register("cbp")
class ContinualBackprop(RefreshStrategy):
    """Continual backpropagation: replace a tiny fraction of mature, low-utility hidden units each step."""

    Config = CBPConfig

    def __init__(
        self,
        model: nn.Module | Topology,
        optimizer: torch.optim.Optimizer,
        config: CBPConfig | None = None,
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__(model, optimizer, config, seed=seed)
        c = self.config
        self.layers = self.topology.hidden_layers
        if not self.layers:
            raise TopologyError("cbp needs hidden layers, and the model has none")
        self.utilities = [UnitUtility(layer, c.utility, c.decay_rate, self.device) for layer in self.layers]
        self.gains = [module_gain(layer.activation) for layer in self.layers]
        # Host-side bookkeeping, so steps that replace nothing never synchronise with the device:
        # how many units are eligible (age > maturity), and when the immature ones mature.
        self.eligible = [0] * len(self.layers)
        self.maturing: list[deque[list[int]]] = [
            deque([[c.maturity_threshold + 1, layer.n_units]]) for layer in self.layers
        ]
        self.accumulated = [0.0] * len(self.layers)
        self.host_random = random.Random(self.generator.initial_seed())  # probabilistic rounding
        self.factors: list[Any] = []
        # Small layers on the CPU: the per-step arithmetic in numpy on the tensors' memory, because
        # torch's per-op dispatch there costs more than the arithmetic (same formulas, same state).
        self._factors = WeightFactors(self.layers, c.utility, c.magnitude_every)
        self.host = self.device.type == "cpu" and c.utility != "random" and not self._factors.amortises and all(
            layer.producer.weight.numel() + layer.consumer.weight.numel() <= HOST_MAX_WEIGHTS
            for layer in self.layers
        )
        self._host_factors = HostWeightFactors(self.layers, c.utility) if self.host else None
        self.topology.start_capture()

    def _count_to_replace(self, index: int) -> int:
        """How many units of layer ``index`` to replace this step (the accumulator rule)."""
        queue = self.maturing[index]
        while queue and queue[0][0] <= self.step:
            self.eligible[index] += queue.popleft()[1]
        eligible = self.eligible[index]
        if eligible == 0:
            return 0
        expected = self.config.replacement_rate * eligible
        if self.config.accumulate == "exact":
            self.accumulated[index] += expected
            count = min(int(self.accumulated[index]), eligible)
            self.accumulated[index] -= count
            return count
        if expected < 1:  # the released code's probabilistic rounding
            return 1 if self.host_random.random() <= expected else 0
        return int(expected)

    def after_step(self) -> RefreshStats:
        super().after_step()
        if self.host:
            self.factors = self._host_factors()
        else:
            self.factors = self._factors(self.step % self.config.magnitude_every == 0)
        for layer, utility, factor in zip(self.layers, self.utilities, self.factors):
            h = layer.output
            if h is None:
                raise RuntimeError(
                    f"cbp saw no activation of {layer.name!r}: call after_step() after a forward and "
                    "optimizer step of the model it was built on"
                )
            if self.host:
                utility._update_host(h.numpy(), factor)
            else:
                utility.update(h, factor, self.generator)
        replaced = 0
        threshold = self.config.maturity_threshold
        # Deepest layer first: a unit replaced in layer l + 1 gets fresh incoming weights, and the zeroed
        # outgoing columns of a unit replaced in layer l are written after that, so they stay zero.
        for index in reversed(range(len(self.layers))):
            layer, utility = self.layers[index], self.utilities[index]
            count = self._count_to_replace(index)
            if count == 0:
                continue
            scores = torch.where(utility.age > threshold, utility.corrected_utility(), torch.inf)
            units = torch.topk(scores, count, largest=False).indices
            self.eligible[index] -= count
            self.maturing[index].append([self.step + threshold + 1, count])
            amortised = self._factors.neighbour_shares(index, units) if self._factors.amortises else None
            if self.config.refresh_fan_in == "redraw":
                redraw_fan_in(layer, units, self.generator)
            replace_units(
                layer,
                units,
                self.optimizer,
                init=self.config.init,
                gain=self.gains[index],
                generator=self.generator,
                mean_activation=utility.corrected_mean(units) if self.config.bias_correction else None,
            )
            utility.reset(units)
            if amortised is not None:
                self._factors.patch(index, units, amortised)
            replaced += count
        return RefreshStats(units_replaced=replaced) if replaced else NO_REFRESH

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            utilities=[u.state_dict() for u in self.utilities],
            eligible=list(self.eligible),
            maturing=[[list(item) for item in queue] for queue in self.maturing],
            accumulated=list(self.accumulated),
            host_random=self.host_random.getstate(),
            weight_sums=self._factors.state_dict(),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for utility, saved in zip(self.utilities, state["utilities"]):
            utility.load_state_dict(saved)
        self.eligible = list(state["eligible"])
        self.maturing = [deque([list(item) for item in queue]) for queue in state["maturing"]]
        self.accumulated = list(state["accumulated"])
        self.host_random.setstate(state["host_random"])
        if "weight_sums" in state:  # absent from earlier versions' state: the sums are taken afresh
            self._factors.load_state_dict(state["weight_sums"])


@dataclass(frozen=True)
class ReDoConfig(StrategyConfig):
    """ReDo (Sokar et al. 2023): recycle tau-dormant units every ``period`` steps."""

    period: int = setting(1000, low=1, search=(100, 10_000), log=True, help="steps between dormancy checks")
    tau: float = setting(0.1, low=0.0, search=(0.0, 0.5), help="a unit with score <= tau is reset")
    window: int = setting(
        1, low=1, help="steps whose activations are averaged for a check (1: the current batch)"
    )
    init: str = setting("kaiming", choices=INIT_SCHEMES, help="bound of re-initialised incoming weights")


@strategies.register("redo")
class ReDo(RefreshStrategy):
    """ReDo: every period steps reset units whose score E|h_i| / mean_k E|h_k| is at most tau."""

    Config = ReDoConfig

    def __init__(self, model, optimizer, config: ReDoConfig | None = None, *, seed: int | None = None) -> None:
        super().__init__(model, optimizer, config, seed=seed)
        self.layers = self.topology.hidden_layers
        if not self.layers:
            raise TopologyError("redo needs hidden layers, and the model has none")
        self.gains = [module_gain(layer.activation) for layer in self.layers]
        self.sums = [torch.zeros(layer.n_units, device=self.device) for layer in self.layers]
        self.seen = 0
        self.probe: torch.Tensor | None = None
        if self._captures(1):
            self.topology.start_capture()

    def set_probe(self, inputs: torch.Tensor | None) -> None:
        """Score units on this fixed batch at each check instead of the last ``window`` training batches."""
        self.probe = inputs
        if inputs is not None:
            self.topology.stop_capture()

    def _captures(self, step: int) -> bool:
        """Whether training step ``step`` (1-based) feeds the next check's activation averages."""
        if self.probe is not None:
            return False
        period, window = self.config.period, self.config.window
        return (-step) % period < window

    @staticmethod
    def scores(mean_abs_activation: torch.Tensor) -> torch.Tensor:
        """s_i = E|h_i| / mean_k E|h_k| (0 for a layer whose units are all silent)."""
        return mean_abs_activation / mean_abs_activation.mean().clamp_min(torch.finfo(mean_abs_activation.dtype).tiny)

    def after_step(self) -> RefreshStats:
        super().after_step()
        step = self.step
        if self.topology.capturing:
            for layer, total in zip(self.layers, self.sums):
                h = layer.output
                total.add_(h.abs().mean((0, *range(2, h.dim()))))
            self.seen += 1
        replaced = 0
        if step % self.config.period == 0:
            replaced = self._recycle()
        if self._captures(step + 1):
            self.topology.start_capture()
        else:
            self.topology.stop_capture()
        return RefreshStats(units_replaced=replaced) if replaced else NO_REFRESH

    @torch.no_grad()
    def _recycle(self) -> int:
        if self.probe is not None:
            with self.topology.capture():
                self.model(self.probe)
            activity = [layer.output.abs().mean((0, *range(2, layer.output.dim()))) for layer in self.layers]
        else:
            if self.seen == 0:
                return 0
            activity = [total / self.seen for total in self.sums]
        replaced = 0
        for index, (layer, mean_abs) in enumerate(zip(self.layers, activity)):
            units = torch.nonzero(self.scores(mean_abs) <= self.config.tau).flatten()
            if units.numel():
                replace_units(layer, units, self.optimizer, init=self.config.init,
                              gain=self.gains[index], generator=self.generator)
                replaced += units.numel()
        for total in self.sums:
            total.zero_()
        self.seen = 0
        return replaced

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(sums=[s.clone() for s in self.sums], seen=self.seen,
                     probe=None if self.probe is None else self.probe.clone())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for total, saved in zip(self.sums, state["sums"]):
            total.copy_(saved)
        self.seen = int(state["seen"])
        probe = state.get("probe")  # checkpoints written before the probe was saved have none
        self.set_probe(None if probe is None else probe.to(self.device))
        if self._captures(self.step + 1):
            self.topology.start_capture()
