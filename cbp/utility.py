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

import numpy as np
import torch

from dst.topology import HiddenLayer

from .weights import numpy_view

__all__ = ["UTILITIES", "UnitUtility"]

UTILITIES = (
    "contribution",
    "adaptation",
    "adaptable_contribution",
    "zero_contribution",
    "weight",
    "random",
)

_STATE = ("born", "norm", "mean_sum", "utility_sum")


class UnitUtility:
    """Age, running utility and running mean activation of one hidden layer's units.

    The bias-corrected running averages are kept as decayed sums over the unit's life (age a):

        norm         n = sum_{s=1..a} eta^(a-s)      = (1 - eta^a) / (1 - eta)
        mean_sum     m = sum_{s=1..a} eta^(a-s) h_s  so  f = (1 - eta) m,  f_hat = m / n
        utility_sum  v = sum_{s=1..a} eta^(a-s) y_s  so  u = (1 - eta) v,  u_hat = v / n

    which is the paper's f <- eta f + (1 - eta) h with f_hat = f / (1 - eta^a), rearranged so that one
    step is: scale the three sums by eta (one (3, units) block), add 1, mean(h) and y.
    """

    def __init__(self, layer: HiddenLayer, kind: str, decay_rate: float, device: torch.device) -> None:
        if kind not in UTILITIES:
            raise ValueError(f"unknown utility {kind!r}; use one of {', '.join(UTILITIES)}")
        self.layer, self.kind, self.decay_rate = layer, kind, decay_rate
        units = layer.n_units
        # age = steps - born: one host counter instead of a per-step increment of a device tensor
        self.steps = 0
        self.born = torch.zeros(units, device=device)
        self._block = torch.zeros(3, units, device=device)
        self.norm, self.mean_sum, self.utility_sum = self._block.unbind(0)
        self._random: torch.Tensor | None = None
        # On the CPU, numpy views of the same memory for the per-step update (see HostWeightFactors)
        self._host = None
        if torch.device(device).type == "cpu":
            block = numpy_view(self._block)
            self._host = (block, block[0], block[1], block[2], np.empty(units, dtype=block.dtype))

    @property
    def age(self) -> torch.Tensor:
        """Steps since each unit was (re)initialised."""
        return self.steps - self.born

    @property
    def mean(self) -> torch.Tensor:
        """The running mean activation f (not bias-corrected)."""
        return self.mean_sum * (1 - self.decay_rate)

    @property
    def utility(self) -> torch.Tensor:
        """The running utility u (not bias-corrected)."""
        return self.utility_sum * (1 - self.decay_rate)

    @property
    def decay_power(self) -> torch.Tensor:
        """eta^age; 1 - eta^age is the bias correction."""
        return 1 - self.norm * (1 - self.decay_rate)

    def update(
        self, h: torch.Tensor, weight_factor: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> None:
        """One step of the running statistics from this step's activation ``h`` (batch, units, ...)
        and the layer's ``weight_factor`` (from :func:`weight_factors`). Neither may require grad: ``h``
        is a captured (detached) activation, so no autograd graph is built."""
        if isinstance(weight_factor, np.ndarray):
            self._update_host(h.numpy(), weight_factor)
            return
        single = h.dim() == 2 and h.shape[0] == 1  # batch 1, MLP: no reductions needed
        reduce = (0, *range(2, h.dim()))
        self.steps += 1
        self._block.mul_(self.decay_rate)
        self.norm.add_(1)
        self.mean_sum.add_(h[0] if single else h.mean(reduce))
        kind = self.kind
        if kind == "random":
            self._random = torch.rand(self.norm.shape, device=self.norm.device, generator=generator)
            return
        if kind in ("adaptation", "weight"):
            instant = weight_factor
        elif kind == "contribution":
            instant = weight_factor * (h[0].abs() if single else h.abs().mean(reduce))
        else:  # zero_contribution, adaptable_contribution: |h - f_hat|
            mean = self.mean_sum / self.norm
            if single:
                deviation = (h[0] - mean).abs_()
            else:
                deviation = (h - mean.view((1, -1) + (1,) * (h.dim() - 2))).abs_().mean(reduce)
            instant = weight_factor * deviation
        self.utility_sum.add_(instant)

    def _update_host(self, h: np.ndarray, weight_factor: np.ndarray) -> None:
        """The same update as :meth:`update`, in numpy on the state tensors' memory."""
        if self._host is None:
            raise ValueError("host (numpy) weight factors given for state that is not on the CPU")
        block, norm, mean_sum, utility_sum, scratch = self._host
        self.steps += 1
        block *= self.decay_rate
        norm += 1
        kind = self.kind
        if h.ndim == 2 and h.shape[0] == 1:  # batch 1, MLP: no reductions needed
            h = h[0]
            mean_sum += h
            if kind in ("adaptation", "weight"):
                utility_sum += weight_factor
                return
            if kind == "contribution":
                np.abs(h, out=scratch)
            else:  # |h - f_hat|
                np.divide(mean_sum, norm, out=scratch)
                np.subtract(h, scratch, out=scratch)
                np.abs(scratch, out=scratch)
            scratch *= weight_factor
            utility_sum += scratch
            return
        reduce = (0, *range(2, h.ndim))
        scale = h.shape[0] * (h[0, 0].size if h.ndim > 2 else 1)
        mean_sum += np.add.reduce(h, reduce) / scale
        if kind in ("adaptation", "weight"):
            utility_sum += weight_factor
            return
        if kind == "contribution":
            deviation = np.abs(h)
        else:
            corrected = (mean_sum / norm).reshape((1, -1) + (1,) * (h.ndim - 2))
            deviation = np.abs(h - corrected)
        utility_sum += weight_factor * (np.add.reduce(deviation, reduce) / scale)

    def corrected_utility(self) -> torch.Tensor:
        """u_hat = u / (1 - eta^age): what units are ranked by (a fresh draw for ``random``)."""
        if self.kind == "random":
            return self._random if self._random is not None else torch.zeros_like(self.utility)
        return self.utility_sum / self.norm

    def corrected_mean(self, units: torch.Tensor | None = None) -> torch.Tensor:
        """f_hat = f / (1 - eta^age), the bias-corrected mean activation."""
        if units is None:
            return self.mean_sum / self.norm
        return self.mean_sum[units] / self.norm[units]

    def reset(self, units: torch.Tensor) -> None:
        self.born[units] = float(self.steps)
        self._block[:, units] = 0

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        return {"steps": self.steps, **{key: getattr(self, key) for key in _STATE}}

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        self.steps = int(state["steps"])
        if "decay_power" in state:  # saved by an earlier version: f, u and eta^age instead of the sums
            rate = 1 - self.decay_rate
            state = {"born": state["born"], "norm": (1 - state["decay_power"]) / rate,
                     "mean_sum": state["mean"] / rate, "utility_sum": state["utility"] / rate}
        for key in _STATE:
            getattr(self, key).copy_(state[key])
