"""The weight factors of CBP's unit utilities: mean |w_out| (a unit's outgoing weights), 1 / mean |w_in|
(its incoming weights) and their ratio, for every hidden layer, from the weights the optimizer just wrote.

``WeightFactors`` computes them with torch (a large weight's |w| row and column sums in one pass, a
cache-sized block of rows at a time on the CPU; with ``every=N`` the sums of matrices of 65,536+ entries
are refreshed every N steps and patched exactly around each replacement). ``HostWeightFactors`` computes
the same formulas with numpy on the CPU tensors' memory, for small layers where torch's per-call cost
dominates. :mod:`cbp.utility` turns the factors and the activations into utilities.
"""

from __future__ import annotations

import numpy as np
import torch

from dst.topology import HiddenLayer

__all__ = [
    "HostWeightFactors",
    "WeightFactors",
    "incoming_magnitude",
    "numpy_view",
    "outgoing_magnitude",
    "weight_factors",
    "MIN_INCOMING",
]

#: mean |w_in| is clamped here: a unit with no incoming weight (an empty sparse row) gets a large finite
#: factor, so its utility is 0 x large = 0 (replaced first) instead of 0 x inf = NaN (never replaced).
MIN_INCOMING = 1e-12
_FUSED_BELOW = 1 << 16  # a weight this small: |w|-sums per use; a larger one: one blocked pass
_CHUNK = 1 << 18  # entries of |W| per block of rows on the CPU (1 MiB of float32: stays in cache)


def _abs_sums(weight: torch.Tensor, shape: tuple[int, ...], dims: tuple[int, ...]) -> torch.Tensor:
    """sum |w| over ``dims`` of ``weight`` viewed as ``shape`` (``abs().sum()``: torch's CPU
    ``vector_norm(ord=1)`` is several times slower)."""
    return weight.reshape(shape).abs().sum(dims)


def _outgoing_sums(layer: HiddenLayer) -> tuple[torch.Tensor, int]:
    weight = layer.consumer.weight
    shape = (weight.shape[0], layer.n_units, -1)  # (out, units, block * kernel)
    return _abs_sums(weight, shape, (0, 2)), weight.numel() // layer.n_units


def _incoming_sums(layer: HiddenLayer) -> tuple[torch.Tensor, int]:
    weight = layer.producer.weight
    return _abs_sums(weight, (layer.n_units, -1), (1,)), weight.numel() // layer.n_units


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
    """numpy views of one hidden layer's producer and consumer weights (and scratch for their |w|),
    re-made only when a weight's memory moves (a ``.data`` assignment, a new Parameter, ``.to()``)."""

    def __init__(self, layer: HiddenLayer) -> None:
        self.layer = layer
        self.key: tuple[int, int] | None = None
        units = layer.n_units
        self.in_count = layer.producer.weight.numel() // units
        self.ratio = self.in_count / (layer.consumer.weight.numel() // units)  # fan_in / out count
        self.floor = MIN_INCOMING * self.in_count
        # the outgoing view is (out, units) for an MLP, (out, units, block * kernel) otherwise
        self.out_axes: int | tuple[int, int] = 0 if layer.consumer.weight.numel() == (
            layer.consumer.weight.shape[0] * units) else (0, 2)

    @staticmethod
    def _weight(module: torch.nn.Module) -> torch.Tensor:
        # the module's own parameter dict: cheaper than nn.Module.__getattr__ on every step
        weight = module._parameters.get("weight")
        return module.weight if weight is None else weight

    def get(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """incoming (units, fan_in), outgoing (out, units[, block]) and scratch arrays of their shapes."""
        producer, consumer = self._weight(self.layer.producer), self._weight(self.layer.consumer)
        key = (producer.data_ptr(), consumer.data_ptr())
        if key != self.key:
            units = self.layer.n_units
            self.incoming = numpy_view(producer).reshape(units, -1)
            shape = (consumer.shape[0], units) + (() if self.out_axes == 0 else (-1,))
            self.outgoing = numpy_view(consumer).reshape(shape)
            self.scratch = (np.empty_like(self.incoming), np.empty_like(self.outgoing))
            self.key = key
        return self.incoming, self.outgoing, *self.scratch


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
        add, absolute = np.add.reduce, np.abs
        for views in self.views:
            incoming, outgoing, abs_in, abs_out = views.get()
            in_sums = None
            if kind in ("adaptation", "adaptable_contribution"):
                in_sums = add(absolute(incoming, out=abs_in), 1)
                np.maximum(in_sums, views.floor, out=in_sums)
            if kind == "adaptation":
                factors.append(np.divide(views.in_count, in_sums, out=in_sums))
                continue
            factor = add(absolute(outgoing, out=abs_out), views.out_axes)
            if kind == "adaptable_contribution":
                factor /= in_sums
                factor *= views.ratio
            else:
                factor *= views.ratio / views.in_count
            factors.append(factor)
        return factors


#: weight matrices with at least this many entries are "large": ``magnitude_every`` spaces out their
#: |w| sums. Smaller ones (an output layer, a narrow net) cost little and are summed every step.
AMORTISE_FROM = 1 << 16


class WeightFactors:
    """The weight part of each layer's utility: mean|w_out|, 1/mean|w_in|, or their ratio.

    ``factors = WeightFactors(layers, kind, every=N)``, then ``factors(refresh)`` once per step: the
    |w| sums of every weight matrix below :data:`AMORTISE_FROM` entries are recomputed at each call, and
    those of larger matrices only when ``refresh`` is true (the caller's every-N-steps schedule) or
    ``every`` is 1. A large weight's row sums (it produces a layer) and column sums (it feeds one) come
    from one pass over it. Around a replacement, :meth:`neighbour_shares` (before) and :meth:`patch`
    (after) update the cached sums by exactly what the replacement changed, so a fresh unit never
    inherits the old unit's factor.
    """

    def __init__(self, layers: list[HiddenLayer], kind: str, every: int = 1) -> None:
        self.layers, self.kind = list(layers), kind
        self.amortise_from = AMORTISE_FROM if every > 1 else None
        self.need_in = kind in ("adaptation", "adaptable_contribution")
        self.need_out = kind not in ("adaptation", "random")
        self.in_sums: list[torch.Tensor | None] = [None] * len(self.layers)
        self.out_sums: list[torch.Tensor | None] = [None] * len(self.layers)
        self._scratch: torch.Tensor | None = None  # |W| of one block of rows (see _row_column_sums)
        #: whether some weight matrix's sums are reused across steps (``every`` > 1 and a large one)
        self.amortises = self.amortise_from is not None and any(
            module.weight.numel() >= self.amortise_from
            for layer in self.layers for module in (layer.producer, layer.consumer))

    def _row_column_sums(self, weight: torch.Tensor, rows: bool, consumer_of: HiddenLayer | None):
        """(sum |w| over each row, sum |w| over each of ``consumer_of``'s unit columns) of a large weight.

        On the CPU the rows go through |.| a cache-sized block at a time, into a scratch block that the
        sums then read from cache: one pass over W in memory instead of three (|W|, rows, columns)."""
        flat = weight.reshape(weight.shape[0], -1)
        count, width = flat.shape
        block = count if weight.device.type != "cpu" else max(1, _CHUNK // width)
        scratch = self._scratch
        if scratch is None or scratch.numel() < block * width or scratch.device != weight.device or (
                scratch.dtype != weight.dtype):
            scratch = self._scratch = weight.new_empty(min(count, block) * width)
        row_sums = weight.new_empty(count) if rows else None
        units = consumer_of.n_units if consumer_of is not None else 0
        column_sums = weight.new_zeros(units) if consumer_of is not None else None
        for start in range(0, count, block):
            part = flat[start:start + block]
            magnitude = scratch[: part.numel()].view(part.shape)
            torch.abs(part, out=magnitude)
            if row_sums is not None:
                torch.sum(magnitude, 1, out=row_sums[start:start + block])
            if column_sums is not None:
                column_sums.add_(magnitude.view(part.shape[0], units, -1).sum((0, 2)))
        return row_sums, column_sums

    def _stale_ok(self, weight: torch.Tensor, cached: torch.Tensor | None, refresh: bool) -> bool:
        return (cached is not None and not refresh and self.amortise_from is not None
                and weight.numel() >= self.amortise_from)

    @torch.no_grad()
    def __call__(self, refresh: bool = True) -> list[torch.Tensor | None]:
        if self.kind == "random":
            return [None] * len(self.layers)
        layers = self.layers
        memo: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

        def sums(weight: torch.Tensor, index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            """Row sums of |W| (W as layer ``index``'s producer or the next layer's) and column sums
            per unit (W as a consumer), both from one pass over a large W."""
            if id(weight) not in memo:
                producer = self.need_in and any(layer.producer.weight is weight for layer in layers[index:index + 2])
                consumer_of = next((layer for layer in layers[max(index - 1, 0):index + 1]
                                    if layer.consumer.weight is weight), None) if self.need_out else None
                memo[id(weight)] = self._row_column_sums(weight, producer, consumer_of)
            return memo[id(weight)]

        factors = []
        for index, layer in enumerate(layers):
            in_count = layer.producer.weight.numel() // layer.n_units
            out_count = layer.consumer.weight.numel() // layer.n_units
            if self.need_in and not self._stale_ok(layer.producer.weight, self.in_sums[index], refresh):
                if layer.producer.weight.numel() < _FUSED_BELOW:
                    in_sums = _incoming_sums(layer)[0]
                else:
                    in_sums = sums(layer.producer.weight, index)[0]
                self.in_sums[index] = in_sums.clamp_min_(MIN_INCOMING * in_count)
            if self.need_out and not self._stale_ok(layer.consumer.weight, self.out_sums[index], refresh):
                if layer.consumer.weight.numel() < _FUSED_BELOW:
                    self.out_sums[index] = _outgoing_sums(layer)[0]
                else:
                    self.out_sums[index] = sums(layer.consumer.weight, index)[1]
            if self.kind == "adaptation":
                factors.append(in_count / self.in_sums[index])
            elif self.kind == "adaptable_contribution":
                factors.append(self.out_sums[index] / self.in_sums[index] * (in_count / out_count))
            else:
                factors.append(self.out_sums[index] / out_count)
        return factors

    @torch.no_grad()
    def neighbour_shares(self, index: int, units: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What ``units``' incoming rows add to the previous layer's outgoing sums, and what their
        outgoing columns add to the next layer's incoming sums (None where nothing is cached). Take it
        before replacing ``units`` and hand it to :meth:`patch`."""
        layer = self.layers[index]
        to_previous = to_next = None
        previous = self.layers[index - 1] if index > 0 else None
        following = self.layers[index + 1] if index + 1 < len(self.layers) else None
        if previous is not None and previous.consumer is layer.producer and self.out_sums[index - 1] is not None:
            weight = layer.producer.weight  # the previous layer's consumer: (units, previous units, ...)
            rows = weight.reshape(layer.n_units, self.layers[index - 1].n_units, -1)[units]
            to_previous = rows.abs().sum((0, 2))
        if following is not None and following.producer is layer.consumer and self.in_sums[index + 1] is not None:
            weight = layer.consumer.weight  # the next layer's producer: (next units, units, ...)
            columns = weight.reshape(weight.shape[0], layer.n_units, -1)[:, units]
            to_next = columns.abs().sum((1, 2))
        return to_previous, to_next

    @torch.no_grad()
    def patch(self, index: int, units: torch.Tensor, before) -> None:
        """Bring the cached sums up to date with a replacement of layer ``index``'s ``units``: their
        own sums from their new rows and columns, and the neighbouring layers' sums by what the
        replaced rows and columns changed. Only the optimizer's changes wait for the next refresh."""
        layer = self.layers[index]
        if self.in_sums[index] is not None:
            rows = layer.producer.weight.reshape(layer.n_units, -1)[units]
            self.in_sums[index][units] = rows.abs().sum(1).clamp_min_(MIN_INCOMING * rows.shape[1])
        if self.out_sums[index] is not None:
            weight = layer.consumer.weight
            columns = weight.reshape(weight.shape[0], layer.n_units, -1)[:, units]
            self.out_sums[index][units] = columns.abs().sum((0, 2))
        after = self.neighbour_shares(index, units)
        if after[0] is not None:
            self.out_sums[index - 1].add_(after[0] - before[0]).clamp_min_(0)
        if after[1] is not None:
            count = self.layers[index + 1].producer.weight.numel() // self.layers[index + 1].n_units
            self.in_sums[index + 1].add_(after[1] - before[1]).clamp_min_(MIN_INCOMING * count)

    def state_dict(self) -> dict[str, list[torch.Tensor | None]]:
        return {"in_sums": list(self.in_sums), "out_sums": list(self.out_sums)}

    def load_state_dict(self, state: dict[str, list[torch.Tensor | None]]) -> None:
        self.in_sums = [None if t is None else t.clone() for t in state["in_sums"]]
        self.out_sums = [None if t is None else t.clone() for t in state["out_sums"]]


def weight_factors(layers: list[HiddenLayer], kind: str) -> list[torch.Tensor | None]:
    """Each layer's weight factor from the current weights (see :class:`WeightFactors`)."""
    return WeightFactors(layers, kind)()
