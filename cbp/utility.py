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

__all__ = ["UTILITIES", "UnitUtility", "incoming_magnitude", "outgoing_magnitude"]

UTILITIES = (
    "contribution",
    "adaptation",
    "adaptable_contribution",
    "zero_contribution",
    "weight",
    "random",
)

_STATE = ("age", "utility", "mean", "decay_power")


def outgoing_magnitude(layer: HiddenLayer) -> torch.Tensor:
    """mean |w_out| per unit over consumer rows (and the unit's block columns / kernel taps)."""
    weight = layer.outgoing_weights()  # (out, units, block * kernel)
    count = weight.shape[0] * weight.shape[2]
    return torch.linalg.vector_norm(weight, ord=1, dim=(0, 2)) / count


def incoming_magnitude(layer: HiddenLayer) -> torch.Tensor:
    """mean |w_in| per unit over its incoming row (a conv filter: in_channels * kernel)."""
    weight = layer.producer.weight.reshape(layer.n_units, -1)
    return torch.linalg.vector_norm(weight, ord=1, dim=1) / weight.shape[1]


class UnitUtility:
    """Age, running utility and running mean activation of one hidden layer's units."""

    def __init__(self, layer: HiddenLayer, kind: str, decay_rate: float, device: torch.device) -> None:
        if kind not in UTILITIES:
            raise ValueError(f"unknown utility {kind!r}; use one of {', '.join(UTILITIES)}")
        self.layer, self.kind, self.decay_rate = layer, kind, decay_rate
        units = layer.n_units
        self.age = torch.zeros(units, device=device)
        self.utility = torch.zeros(units, device=device)
        self.mean = torch.zeros(units, device=device)
        # eta^age, kept by one multiply per step instead of a pow; 1 - decay_power is the correction
        self.decay_power = torch.ones(units, device=device)
        self._random: torch.Tensor | None = None

    def _bias_correction(self) -> torch.Tensor:
        return 1 - self.decay_power

    @torch.no_grad()
    def update(self, h: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """One step of the running statistics, from this step's activation ``h`` (batch, units, ...)."""
        eta = self.decay_rate
        reduce = (0, *range(2, h.dim()))
        self.age.add_(1)
        self.decay_power.mul_(eta)
        correction = self._bias_correction()
        self.mean.lerp_(h.mean(reduce), 1 - eta)  # f <- eta f + (1 - eta) mean(h)
        kind = self.kind
        if kind == "random":
            self._random = torch.rand(self.age.shape, device=self.age.device, generator=generator)
            return
        if kind == "adaptation":
            instant = 1 / incoming_magnitude(self.layer)
        else:
            instant = outgoing_magnitude(self.layer)
            if kind == "contribution":
                instant = instant * h.abs().mean(reduce)
            elif kind in ("zero_contribution", "adaptable_contribution"):
                shape = (1, -1) + (1,) * (h.dim() - 2)
                deviation = (h - (self.mean / correction).view(shape)).abs().mean(reduce)
                instant = instant * deviation
                if kind == "adaptable_contribution":
                    instant = instant / incoming_magnitude(self.layer)
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
        self.age[units] = 0
        self.utility[units] = 0
        self.mean[units] = 0
        self.decay_power[units] = 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key) for key in _STATE}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key in _STATE:
            getattr(self, key).copy_(state[key])
