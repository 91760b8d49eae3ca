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

__all__ = [
    "UTILITIES",
    "UnitUtility",
    "HostWeightFactors",
    "incoming_magnitude",
    "numpy_view",
    "outgoing_magnitude",
    "weight_factors",
]

UTILITIES = (
    "contribution",
    "adaptation",
    "adaptable_contribution",
    "zero_contribution",
    "weight",
    "random",
)

_STATE = ("born", "utility", "mean", "decay_power")


#: mean |w_in| is clamped here: a unit with no incoming weight (an empty sparse row) gets a large finite
#: factor, so its utility is 0 x large = 0 (replaced first) instead of 0 x inf = NaN (never replaced).
MIN_INCOMING = 1e-12
_FUSED_BELOW = 1 << 16  # a weight this small: one fused |w|-sum per use beats sharing |W| between layers


def _abs_sums(weight: torch.Tensor, shape: tuple[int, ...], dims: tuple[int, ...], shared=None) -> torch.Tensor:
    """sum |w| over ``dims`` of ``weight`` viewed as ``shape`` (``shared(weight)`` gives a cached |W|)."""
    if shared is None or weight.numel() < _FUSED_BELOW:
        return torch.linalg.vector_norm(weight.reshape(shape), ord=1, dim=dims)
    return shared(weight).reshape(shape).sum(dims)


def _outgoing_sums(layer: HiddenLayer, shared=None) -> tuple[torch.Tensor, int]:
    weight = layer.consumer.weight
    shape = (weight.shape[0], layer.n_units, -1)  # (out, units, block * kernel)
    return _abs_sums(weight, shape, (0, 2), shared), weight.numel() // layer.n_units


def _incoming_sums(layer: HiddenLayer, shared=None) -> tuple[torch.Tensor, int]:
    weight = layer.producer.weight
    return _abs_sums(weight, (layer.n_units, -1), (1,), shared), weight.numel() // layer.n_units


@torch.no_grad()
def outgoing_magnitude(layer: HiddenLayer) -> torch.Tensor:
    """mean |w_out| per unit over consumer rows (and the unit's block columns / kernel taps)."""
    sums, count = _outgoing_sums(layer)
    return sums / count


@torch.no_grad()
def incoming_magnitude(layer: HiddenLayer) -> torch.Tensor:
    """mean |w_in| per unit over its incoming row (a conv filter: in_channels * kernel)."""
    sums, count = _incoming_sums(layer)
    return sums / count


def numpy_view(tensor: torch.Tensor) -> np.ndarray:
    """A numpy array sharing ``tensor``'s memory (CPU only): no copy, no torch dispatch."""
    return tensor.detach().numpy()


class _WeightViews:
    """numpy views of one hidden layer's producer and consumer weights, re-made only when a weight's
    memory moves (a ``.data`` assignment, ``load_state_dict`` into new tensors, ``.to()``)."""

    def __init__(self, layer: HiddenLayer) -> None:
        self.layer = layer
        self.key: tuple[int, int] | None = None
        self.incoming = self.outgoing = None
        units = layer.n_units
        self.in_count = layer.producer.weight.numel() // units
        self.ratio = self.in_count / (layer.consumer.weight.numel() // units)  # fan_in / out count

    def get(self) -> tuple[np.ndarray, np.ndarray]:
        producer, consumer = self.layer.producer.weight, self.layer.consumer.weight
        key = (producer.data_ptr(), consumer.data_ptr())
        if key != self.key:
            units = self.layer.n_units
            self.incoming = numpy_view(producer).reshape(units, -1)
            self.outgoing = numpy_view(consumer).reshape(consumer.shape[0], units, -1)
            self.key = key
        return self.incoming, self.outgoing


class HostWeightFactors:
    """:func:`weight_factors` computed with numpy on CPU tensors' memory, for small layers where
    torch's per-op dispatch costs more than the arithmetic. Same formulas; call it for the factors."""

    def __init__(self, layers: list[HiddenLayer], kind: str) -> None:
        self.kind = kind
        self.views = [_WeightViews(layer) for layer in layers]

    def __call__(self) -> list[np.ndarray | None]:
        kind = self.kind
        if kind == "random":
            return [None] * len(self.views)
        factors = []
        add = np.add.reduce
        for views in self.views:
            incoming, outgoing = views.get()
            in_sums = None
            if kind in ("adaptation", "adaptable_contribution"):
                in_sums = np.maximum(add(np.abs(incoming), 1), MIN_INCOMING * views.in_count)
            if kind == "adaptation":
                factors.append(views.in_count / in_sums)
                continue
            out_sums = add(np.abs(outgoing), (0, 2))
            if kind == "adaptable_contribution":
                factor = out_sums / in_sums
                factor *= views.ratio
            else:
                factor = out_sums * (views.ratio / views.in_count)
            factors.append(factor)
        return factors


@torch.no_grad()
def weight_factors(layers: list[HiddenLayer], kind: str) -> list[torch.Tensor | None]:
    """The weight part of each layer's utility: mean|w_out|, 1/mean|w_in|, or their ratio.

    Large weights have their absolute value taken once and shared by the layer that produces with them
    and the layer that consumes with them; small ones use one fused |w|-sum per use.
    """
    if kind == "random":
        return [None] * len(layers)
    cache: dict[int, torch.Tensor] = {}

    def shared(weight: torch.Tensor) -> torch.Tensor:
        if id(weight) not in cache:
            cache[id(weight)] = weight.abs()
        return cache[id(weight)]

    factors = []
    for layer in layers:
        if kind == "adaptation":
            in_sums, in_count = _incoming_sums(layer, shared)
            factors.append(in_count / in_sums.clamp_min_(MIN_INCOMING * in_count))
            continue
        out_sums, out_count = _outgoing_sums(layer, shared)
        if kind == "adaptable_contribution":
            in_sums, in_count = _incoming_sums(layer, shared)
            factors.append(out_sums.div_(in_sums.clamp_min_(MIN_INCOMING * in_count)).mul_(in_count / out_count))
        else:
            factors.append(out_sums.div_(out_count))
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
        # eta^age, the running mean f and the running utility u, as rows of one block: all three decay
        # by eta each step, so the host path scales them with one call. 1 - decay_power is the correction.
        self._block = torch.zeros(3, units, device=device)
        self.decay_power, self.mean, self.utility = self._block.unbind(0)
        self.decay_power.fill_(1)
        self._random: torch.Tensor | None = None
        # On the CPU, numpy views of the same memory for the per-step update (see HostWeightFactors)
        self._host = None
        if torch.device(device).type == "cpu":
            block = numpy_view(self._block)
            self._host = (block, block[1], block[2], block[0])

    @property
    def age(self) -> torch.Tensor:
        """Steps since each unit was (re)initialised."""
        return self.steps - self.born

    def _bias_correction(self) -> torch.Tensor:
        return 1 - self.decay_power

    def update(
        self, h: torch.Tensor, weight_factor: torch.Tensor | None, generator: torch.Generator | None = None
    ) -> None:
        """One step of the running statistics from this step's activation ``h`` (batch, units, ...)
        and the layer's ``weight_factor`` (from :func:`weight_factors`). Neither may require grad: ``h``
        is a captured (detached) activation, so no autograd graph is built."""
        if isinstance(weight_factor, np.ndarray):
            self._update_host(numpy_view(h), weight_factor, generator)
            return
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

    def _update_host(self, h: np.ndarray, weight_factor: np.ndarray, generator) -> None:
        """The same update as :meth:`update`, in numpy on the state tensors' memory."""
        if self._host is None:
            raise ValueError("host (numpy) weight factors given for state that is not on the CPU")
        block, mean, utility, decay_power = self._host
        eta = self.decay_rate
        rate = 1 - eta
        if h.ndim == 2 and h.shape[0] == 1:  # batch 1, MLP: no reductions needed
            batch_mean = h[0]
            reduce, scale = None, 1.0
        else:
            reduce = (0, *range(2, h.ndim))
            scale = h.shape[0] * (h[0, 0].size if h.ndim > 2 else 1)
            batch_mean = np.add.reduce(h, reduce) / scale
        self.steps += 1
        block *= eta  # eta^age, f and u each decay by eta
        mean += rate * batch_mean
        kind = self.kind
        if kind in ("adaptation", "weight"):
            instant = weight_factor
        else:
            if kind == "contribution":
                deviation = np.abs(h)
            else:
                corrected = mean / (1 - decay_power)
                deviation = np.abs(h - (corrected if reduce is None or h.ndim == 2
                                        else corrected.reshape((1, -1) + (1,) * (h.ndim - 2))))
            if reduce is None:
                deviation = deviation[0]
            else:
                deviation = np.add.reduce(deviation, reduce) / scale
            instant = weight_factor * deviation
        utility += rate * instant

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
