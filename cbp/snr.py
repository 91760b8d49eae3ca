"""Self-normalized resets (Farias & Jozefiak, ICLR 2025), as the ``snr`` dst refresh strategy, following the
released implementation (ajozefiak/SelfNormalizedResets, ``src/algorithms/snr.py``, ``neuron_ages.py``).

Each hidden unit has an *age*, the number of examples since it last fired (a batch in which it fires on no
example adds the batch size; one in which it fires sets the age to 0), and a reset threshold tau_i:

1. After every step, a unit that fired records its age just before firing, its latest inter-firing time,
   in a histogram of ages 0..tau_max (older ones are not recorded).
2. A unit whose age reaches its threshold (age >= tau_i) records that age too and is reset with CBP's
   surgery (fresh incoming weights, zero bias and outgoing weights, optimizer state zeroed); its age is 0.
3. After every ``update_every`` tasks, each unit's threshold moves to its own firing statistics: with q the
   ``percentile``, i the first age >= 1 at which the recorded inter-firing times reach a fraction q,
   tau_i <- i if i < tau_i, else ``expansion`` x tau_i; then clipped to [``min_threshold``, tau_max], and
   the histograms start again. A unit with nothing recorded gets i = 1, so the minimum.

So a unit is reset when its current silence is longer than the q-quantile of its own past silences: the
"rejection percentile" of the paper, its one hyperparameter. Defaults are the code's (percentile 0.99,
thresholds updated every 16 tasks, expansion 2, tau_max 20,000, a floor of 100: the code's hard-coded
batch size); the code takes the first threshold as an argument without a default, here 1,000 examples.
A unit *fires* on an example when its activation is positive, which for ReLU, leaky ReLU, ELU, GELU, SiLU
and tanh is the code's positive pre-activation; sigmoid and softplus units always fire, so are refused.

Member layout: ages, thresholds and histograms are (S, units[, tau_max + 1]) tensors; every member has its
own numeric settings except tau_max (the histograms' length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dst import strategies
from dst.config import setting
from dst.errors import ConfigError, TopologyError
from dst.init import INIT_SCHEMES, module_gain
from dst.refresh import NO_REFRESH, RefreshStats, RefreshStrategy, StrategyConfig
from dst.surgery import UnitSelection, replace_units

__all__ = ["SNRConfig", "SNR"]

_MAX_HISTOGRAM_BYTES = 1 << 30


@dataclass(frozen=True)
class SNRConfig(StrategyConfig):
    percentile: float = setting(0.99, low=0.0, high=1.0, low_open=True, search=(0.9, 0.999),
                                help="q: reset a unit silent longer than the q-quantile of its past silences")
    threshold: float = setting(1000.0, low=1.0, search=(100.0, 20_000.0), log=True,
                               help="first reset threshold tau (examples of silence), before any update")
    update_every: int = setting(16, low=1, help="tasks between threshold updates")
    expansion: float = setting(2.0, low=1.0, help="a threshold below the quantile grows by this factor")
    min_threshold: float = setting(100.0, low=1.0, help="thresholds never fall below this")
    tau_max: int = setting(20_000, low=1, help="longest silence recorded, and the thresholds' ceiling")
    init: str = setting("kaiming", choices=INIT_SCHEMES, help="bound of re-initialised incoming weights")


@strategies.register("snr")
class SNR(RefreshStrategy):
    """SNR: reset a unit whose silence outlasts the percentile of its own inter-firing times."""

    Config = SNRConfig

    def __init__(self, model, optimizer, config=None, *, seed=None) -> None:
        super().__init__(model, optimizer, config, seed=seed)
        self.layers = self.topology.hidden_layers
        if not self.layers:
            raise TopologyError("snr needs hidden layers, and the model has none")
        for layer in self.layers:
            if isinstance(layer.activation, (nn.Sigmoid, nn.Softplus)):
                raise TopologyError(
                    f"snr: the units of {layer.name!r} ({type(layer.activation).__name__}) are positive on every "
                    "input, so they never fall silent; use a ReLU-like or tanh activation"
                )
        if not self.shared("tau_max"):
            raise ConfigError("snr: members differ in tau_max, the histograms' length; give every member one value")
        tau_max = self.config.tau_max
        size = sum(self.members * layer.n_units * (tau_max + 1) * 4 for layer in self.layers)
        if size > _MAX_HISTOGRAM_BYTES:
            raise ConfigError(
                f"snr: the inter-firing histograms would take {size / 2**30:.1f} GiB ({self.members} members, "
                f"{sum(layer.n_units for layer in self.layers)} units, tau_max={tau_max}); lower --set tau_max"
            )
        self.gains = [module_gain(layer.activation) for layer in self.layers]
        column = lambda key: torch.as_tensor(self.per_member(key), dtype=torch.float64, device=self.device)[:, None]  # noqa: E731
        self.percentile, self.expansion, self.min_threshold = column("percentile"), column("expansion"), column("min_threshold")
        self.update_every = self.per_member("update_every")
        self.ages = [torch.zeros(self.members, layer.n_units, dtype=torch.int64, device=self.device) for layer in self.layers]
        self.thresholds = [column("threshold").expand(-1, layer.n_units).clone() for layer in self.layers]
        self.histograms = [torch.zeros(self.members, layer.n_units, tau_max + 1, dtype=torch.int32, device=self.device)
                           for layer in self.layers]
        self.topology.start_capture()

    def after_step(self) -> RefreshStats:
        super().after_step()
        replaced = np.zeros(self.members, np.int64)
        for index, layer in enumerate(self.layers):
            h = layer.member_output  # (S, batch, units[, H, W])
            if h is None:
                raise RuntimeError("snr: no activation was captured; call after_step() after a forward pass")
            silent = (h <= 0).all(1)
            if silent.dim() > 2:
                silent = silent.flatten(2).all(-1)  # a channel fires if it fires anywhere
            age = self.ages[index]
            self._record(index, ~silent)  # the age just before firing
            age.mul_(silent).add_(silent * h.shape[1])  # silent: + batch size; fired: 0
            reset = age >= self.thresholds[index]
            if bool(reset.any()):
                self._record(index, reset)
                age.masked_fill_(reset, 0)
                members, units = reset.nonzero(as_tuple=True)
                slots = (reset.cumsum(1) - 1)[members, units]
                with torch.no_grad():
                    replace_units(layer, UnitSelection(members, units, slots), self.optimizer, self.random,
                                  step=self.step, draw=index, init=self.config.init, gain=self.gains[index])
                replaced += reset.sum(1).cpu().numpy()
        return RefreshStats(units_replaced=replaced) if replaced.any() else NO_REFRESH

    def _record(self, index: int, which: torch.Tensor) -> None:
        """Add the current age of the ``which`` units (S, units) to their histograms (if <= tau_max)."""
        age, histogram = self.ages[index], self.histograms[index]
        recorded = which & (age < histogram.shape[-1])
        histogram.scatter_add_(-1, age.clamp(max=histogram.shape[-1] - 1)[..., None], recorded[..., None].int())

    def on_task_start(self, task: int) -> None:
        """After every ``update_every`` finished tasks, move each unit's threshold to its statistics."""
        updating = torch.as_tensor((task > 0) & (task % self.update_every == 0), device=self.device)[:, None]
        if not bool(updating.any()):
            return
        for index, histogram in enumerate(self.histograms):
            tau_max = histogram.shape[-1] - 1
            counts = histogram[..., 1:].double()
            cdf = counts.cumsum(-1) / counts.sum(-1, keepdim=True)  # NaN where nothing was recorded
            quantile = (cdf >= self.percentile[..., None]).int().argmax(-1) + 1  # first age reaching q (1: none)
            threshold = self.thresholds[index]
            moved = torch.where(quantile < threshold, quantile.double(), self.expansion * threshold)
            moved = torch.maximum(self.min_threshold, moved.clamp(max=tau_max))
            threshold.copy_(torch.where(updating, moved, threshold))
            histogram.masked_fill_(updating[..., None], 0)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "ages": [a.clone() for a in self.ages],
                "thresholds": [t.clone() for t in self.thresholds], "histograms": [h.clone() for h in self.histograms]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for mine, saved in zip(self.ages + self.thresholds + self.histograms,
                               state["ages"] + state["thresholds"] + state["histograms"]):
            mine.copy_(saved)
