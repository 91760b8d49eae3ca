"""Unit utilities of continual backpropagation (Dohare et al. 2024), as per-layer tensors.

For hidden unit i with activation h_i (averaged over the batch, and over positions for a conv
channel), running mean f_i, outgoing weights w_out[:, i] and incoming weights w_in[i, :]:

    contribution            y_i = mean|w_out| * |h_i|
    adaptation              y_i = 1 / mean|w_in|
    zero_contribution       y_i = mean|w_out| * |h_i - f_hat_i|
    adaptable_contribution  y_i = mean|w_out| * |h_i - f_hat_i| / mean|w_in|     (the paper's overall utility)
    weight                  y_i = mean|w_out|
    random                  a fresh uniform draw at every step

Every step: age_i += 1; f_i <- eta f_i + (1 - eta) mean(h_i); u_i <- eta u_i + (1 - eta) y_i. Units are
ranked by the bias-corrected u_hat_i = u_i / (1 - eta^age_i) (and f_hat_i = f_i / (1 - eta^age_i)).
Means of |w| run over every entry of the row / column, masked zeros included, so on a sparse layer
they rank units like the paper's sums over connections.
"""

from __future__ import annotations

import torch

from dst.topology import HiddenLayer

__all__ = ["UTILITIES", "UnitUtility", "incoming_magnitude", "outgoing_magnitude", "weight_factors"]

UTILITIES = (
    "contribution",
    "adaptation",
    "adaptable_contribution",
    "zero_contribution",
    "weight",
    "random",
)

_STATE = ("born", "utility", "mean", "decay_power")


def outgoing_magnitude(layer: HiddenLayer, abs_weight: torch.Tensor | None = None) -> torch.Tensor:
    """mean |w_out| per unit over consumer rows (and the unit's block columns / kernel taps).

    ``abs_weight`` is ``consumer.weight.abs()`` when the caller already has it.
    """
    weight = layer.consumer.weight.abs() if abs_weight is None else abs_weight
    per_unit = weight.reshape(weight.shape[0], layer.n_units, -1)  # (out, units, block * kernel)
    return per_unit.sum((0, 2)).div_(per_unit.shape[0] * per_unit.shape[2])


def incoming_magnitude(layer: HiddenLayer, abs_weight: torch.Tensor | None = None) -> torch.Tensor:
    """mean |w_in| per unit over its incoming row (a conv filter: in_channels * kernel)."""
    weight = layer.producer.weight.abs() if abs_weight is None else abs_weight
    weight = weight.reshape(layer.n_units, -1)
    return weight.sum(1).div_(weight.shape[1])


def weight_factors(layers: list[HiddenLayer], kind: str) -> list[torch.Tensor | None]:
    """The weight part of each layer's utility: mean|w_out|, 1/mean|w_in|, or their ratio.

    Each weight tensor's absolute value is taken once and shared by the layer that produces with it
    and the layer that consumes with it.
    """
    if kind == "random":
        return [None] * len(layers)
    cache: dict[int, torch.Tensor] = {}

    def absolute(weight: torch.Tensor) -> torch.Tensor:
        if id(weight) not in cache:
            cache[id(weight)] = weight.detach().abs()
        return cache[id(weight)]

    factors = []
    for layer in layers:
        if kind == "adaptation":
            factors.append(1 / incoming_magnitude(layer, absolute(layer.producer.weight)))
            continue
        factor = outgoing_magnitude(layer, absolute(layer.consumer.weight))
        if kind == "adaptable_contribution":
            factor.div_(incoming_magnitude(layer, absolute(layer.producer.weight)))
        factors.append(factor)
    return factors


class UnitUtility:
    """Age, running utility and running mean activation of one hidden layer's units."""

    def __init__(self, layer: HiddenLayer, kind: str, decay_rate: float, device: torch.device) -> None:
        if kind not in UTILITIES:
            raise ValueError(f"unknown utility {kind!r}; use one of {', '.join(UTILITIES)}")
        self.layer, self.kind, self.decay_rate = layer, kind, decay_rate
        units = layer.n_units
        # age = steps - born: one host counter instead of a per-step increment of a device tensor
        self.steps = 0
        self.born = torch.zeros(units, device=device)
        self.utility = torch.zeros(units, device=device)
        self.mean = torch.zeros(units, device=device)
        # eta^age, kept by one multiply per step instead of a pow; 1 - decay_power is the correction
        self.decay_power = torch.ones(units, device=device)
        self._random: torch.Tensor | None = None

    @property
    def age(self) -> torch.Tensor:
        """Steps since each unit was (re)initialised."""
        return self.steps - self.born

    def _bias_correction(self) -> torch.Tensor:
        return 1 - self.decay_power

    @torch.no_grad()
    def update(
        self, h: torch.Tensor, weight_factor: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> None:
        """One step of the running statistics from this step's activation ``h`` (batch, units, ...)
        and the layer's ``weight_factor`` (from :func:`weight_factors`)."""
        eta = self.decay_rate
        single = h.dim() == 2 and h.shape[0] == 1  # batch 1, MLP: no reductions needed
        reduce = (0, *range(2, h.dim()))
        self.steps += 1
        self.decay_power.mul_(eta)
        self.mean.lerp_(h[0] if single else h.mean(reduce), 1 - eta)  # f <- eta f + (1 - eta) mean(h)
        kind = self.kind
        if kind == "random":
            self._random = torch.rand(self.mean.shape, device=self.mean.device, generator=generator)
            return
        if kind in ("adaptation", "weight"):
            instant = weight_factor
        elif kind == "contribution":
            instant = weight_factor * (h[0].abs() if single else h.abs().mean(reduce))
        else:  # zero_contribution, adaptable_contribution: |h - f_hat|
            mean = self.mean / self._bias_correction()
            if single:
                deviation = (h[0] - mean).abs_()
            else:
                deviation = (h - mean.view((1, -1) + (1,) * (h.dim() - 2))).abs_().mean(reduce)
            instant = weight_factor * deviation
        self.utility.lerp_(instant, 1 - eta)  # u <- eta u + (1 - eta) y

    def corrected_utility(self) -> torch.Tensor:
        """u_hat = u / (1 - eta^age): what units are ranked by (a fresh draw for ``random``)."""
        if self.kind == "random":
            return self._random if self._random is not None else torch.zeros_like(self.utility)
        return self.utility / self._bias_correction()

    def corrected_mean(self, units: torch.Tensor | None = None) -> torch.Tensor:
        """f_hat = f / (1 - eta^age), the bias-corrected mean activation."""
        mean = self.mean / self._bias_correction()
        return mean if units is None else mean[units]

    def reset(self, units: torch.Tensor) -> None:
        self.born[units] = float(self.steps)
        self.utility[units] = 0
        self.mean[units] = 0
        self.decay_power[units] = 1

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        return {"steps": self.steps, **{key: getattr(self, key) for key in _STATE}}

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        self.steps = int(state["steps"])
        for key in _STATE:
            getattr(self, key).copy_(state[key])
