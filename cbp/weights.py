"""The weight factors of CBP's unit utilities: mean |w_out| (a unit's outgoing weights), 1 / mean |w_in| (its
incoming weights) and their ratio, for every hidden layer, from the weights the optimizer just wrote.

Member layout: weights are read through the hidden layer's member views (``HiddenLayer.incoming()``
(S, units, fan_in[, kh, kw]), ``outgoing()`` (S, consumer_out, consumer_in[, kh, kw])), and a layer's
factor is an (S, units) tensor: each member's units are measured on that member's weights only.

Means of |w| run over every entry of the row / column, masked zeros included, so on a sparse layer they
rank units like the paper's sums over connections. ``WeightFactors`` computes each weight matrix's |w|
once a step, and both sums a matrix serves (its rows are the units it produces, its columns the units it
consumes) from that; a matrix of 65,536+ entries per member that serves both is read a cache-sized block
of rows at a time on the CPU. With ``every=N`` the sums of matrices that large are refreshed every N steps
and patched exactly around each replacement. The per-step sums and factors are written once and run on
torch tensors or, for small CPU layers, on numpy views of the same weights (:mod:`dst.arrays`).
"""

from __future__ import annotations

import numpy as np
import torch

from dst.arrays import Arrays
from dst.population import member_view
from dst.surgery import UnitSelection
from dst.topology import HiddenLayer

__all__ = ["WeightFactors", "weight_factors", "MIN_INCOMING"]

#: added to mean |w_in|: a unit with no incoming weight (an empty sparse row) gets a large finite factor, so
#: its utility is 0 x large = 0 (replaced first) instead of 0 x inf = NaN (never replaced). (Below float32's
#: resolution for any mean |w_in| above about 1e-5, where it changes nothing.)
MIN_INCOMING = 1e-12
_FUSED_BELOW = 1 << 16  # entries per member from which a matrix giving both sums is read in one blocked pass
_CHUNK = 1 << 18  # entries of |W| per block of rows on the CPU (1 MiB of float32: stays in cache)
#: weight matrices with at least this many entries per member are "large": ``every`` spaces out their
#: |w| sums. Smaller ones (an output layer, a narrow net) cost little and are summed every step.
AMORTISE_FROM = 1 << 16


Array = torch.Tensor | np.ndarray


def _row_sums(magnitude: Array, ones: Array) -> Array:
    """(S, rows, ...) -> (S, rows): sum over each row (a producer's unit), as a product with ``ones`` (one
    per entry of a row): numpy reduces short rows several times slower than it multiplies them."""
    if magnitude.ndim != 3:
        magnitude = magnitude.reshape(*magnitude.shape[:2], -1)
    return magnitude @ ones


def _column_sums(magnitude: Array, units: int) -> Array:
    """(S, out, units * block[, kh, kw]) -> (S, units): sum over each unit's consumer columns."""
    if magnitude.ndim == 3 and magnitude.shape[2] == units:
        return magnitude.sum(1)
    return magnitude.reshape(*magnitude.shape[:2], units, -1).sum((1, 3))


def _per_member(weight: torch.Tensor) -> int:
    return weight[0].numel()


class _Matrix:
    """One weight matrix of the unit graph, with the sums it gives: its rows are the units of layer
    ``rows_of`` (it produces them), its columns those of layer ``columns_of`` (it consumes them)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.rows_of: int | None = None
        self.columns_of: int | None = None
        self.units: int | None = None  # units of layer ``columns_of``
        weight = member_view(module, module.weight)
        self.size = _per_member(weight)
        self.ones = torch.ones(weight[0, 0].numel(), dtype=weight.dtype, device=weight.device)  # see _row_sums


class WeightFactors:
    """The weight part of each layer's utility: mean|w_out|, 1/mean|w_in|, or their ratio, (S, units).

    ``factors = WeightFactors(layers, kind, every=N)``, then ``factors(refresh)`` once per step: the |w|
    sums of every weight matrix below :data:`AMORTISE_FROM` entries per member are recomputed at each
    call, and those of larger matrices only when ``refresh`` is true (the caller's every-N-steps
    schedule) or ``every`` is 1. Around a replacement, :meth:`neighbour_shares` (before) and :meth:`patch`
    (after) update the cached sums by exactly what the replacement changed, so a fresh unit never
    inherits the old unit's factor. ``arrays`` (:class:`dst.arrays.Arrays`) says whether the per-step
    sums run in torch or numpy.
    """

    def __init__(self, layers: list[HiddenLayer], kind: str, every: int = 1, *, arrays: Arrays | None = None) -> None:
        self.layers, self.kind = list(layers), kind
        self.arrays = arrays or Arrays(host=False)
        need_in = kind in ("adaptation", "adaptable_contribution")
        need_out = kind not in ("adaptation", "random")
        matrices: dict[int, _Matrix] = {}
        for index, layer in enumerate(self.layers):
            if need_in:
                matrices.setdefault(id(layer.producer), _Matrix(layer.producer)).rows_of = index
            if need_out:
                matrix = matrices.setdefault(id(layer.consumer), _Matrix(layer.consumer))
                matrix.columns_of, matrix.units = index, layer.n_units
        self.matrices = list(matrices.values())
        for matrix in self.matrices:
            matrix.ones = self.arrays.state(matrix.ones)
        self.in_counts = [self._constant(layer, layer.incoming()[0, 0].numel()) for layer in self.layers]
        self.out_counts = [self._constant(layer, _per_member(layer.outgoing()) // layer.n_units) for layer in self.layers]
        self.min_incoming = [self._constant(layer, MIN_INCOMING) for layer in self.layers]
        self.in_sums: list[Array | None] = [None] * len(self.layers)
        self.out_sums: list[Array | None] = [None] * len(self.layers)
        self._scratch: torch.Tensor | None = None  # |W| of one block of rows (see _blocked_sums)
        #: whether some weight matrix's sums are reused across steps (``every`` > 1 and a large one)
        self.amortises = every > 1 and any(matrix.size >= AMORTISE_FROM for matrix in self.matrices)
        if self.arrays.host and (self.amortises or any(m.size >= _FUSED_BELOW for m in self.matrices)):
            raise ValueError("host (numpy) weight factors are for small layers summed every step")

    def _constant(self, layer: HiddenLayer, value: float) -> float | np.ndarray:
        """``value`` as an operand of the per-step factors: itself, or on the host an (S, units) array of it
        (numpy combines arrays of one shape about twice as fast as an array and a Python number)."""
        if not self.arrays.host:
            return value
        weight = layer.incoming()
        return np.full(weight.shape[:2], value, dtype=self.arrays.state(weight.detach()).dtype)

    def _blocked_sums(self, weight: torch.Tensor, units: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row sums, column sums per unit of the consumed layer) of a large weight, from one pass.

        On the CPU the rows go through |.| a cache-sized block at a time, into a scratch block that the
        sums then read from cache: one pass over W in memory instead of three (|W|, rows, columns)."""
        members, count = weight.shape[:2]
        flat = weight.reshape(members, count, -1)
        width = flat.shape[2]
        block = count if weight.device.type != "cpu" else max(1, _CHUNK // (members * width))
        size = members * min(count, block) * width
        scratch = self._scratch
        if scratch is None or scratch.numel() < size or (scratch.device, scratch.dtype) != (weight.device, weight.dtype):
            scratch = self._scratch = weight.new_empty(size)
        row_sums = weight.new_empty(members, count)
        column_sums = weight.new_zeros(members, units)
        for start in range(0, count, block):
            part = flat[:, start:start + block]
            magnitude = scratch[: part.numel()].view(part.shape)
            torch.abs(part, out=magnitude)
            row_sums[:, start:start + block] = magnitude.sum(2)
            column_sums.add_(magnitude.view(members, part.shape[1], units, -1).sum((1, 3)))
        return row_sums, column_sums

    def __call__(self, refresh: bool = True) -> list[Array | None]:
        """Each layer's weight factor (S, units) from the current weights (None for ``random``); numpy
        arrays on the host."""
        if self.kind == "random":
            return [None] * len(self.layers)
        in_sums, out_sums = self.in_sums, self.out_sums
        for matrix in self.matrices:
            rows_of, columns_of = matrix.rows_of, matrix.columns_of
            if self.amortises and not refresh and matrix.size >= AMORTISE_FROM:  # keep what is cached
                rows_of = None if rows_of is None or in_sums[rows_of] is not None else rows_of
                columns_of = None if columns_of is None or out_sums[columns_of] is not None else columns_of
                if rows_of is None and columns_of is None:
                    continue
            weight = self.arrays.parameter(matrix.module)
            if matrix.size >= _FUSED_BELOW and rows_of is not None and columns_of is not None:
                row_sums, column_sums = self._blocked_sums(weight, matrix.units)
            else:
                magnitude = abs(weight)
                row_sums = None if rows_of is None else _row_sums(magnitude, matrix.ones)
                column_sums = None if columns_of is None else _column_sums(magnitude, matrix.units)
            if rows_of is not None:
                in_sums[rows_of] = row_sums
            if columns_of is not None:
                out_sums[columns_of] = column_sums
        factors = []
        for index, (in_count, out_count, floor) in enumerate(zip(self.in_counts, self.out_counts, self.min_incoming)):
            mean_in = None if in_sums[index] is None else in_sums[index] / in_count + floor  # mean|w_in|
            mean_out = None if out_sums[index] is None else out_sums[index] / out_count  # mean|w_out|
            if self.kind == "adaptation":
                factors.append(1 / mean_in)
            elif self.kind == "adaptable_contribution":
                factors.append(mean_out / mean_in)
            else:
                factors.append(mean_out)
        return factors

    @torch.no_grad()
    def neighbour_shares(self, index: int, selection: UnitSelection) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What the selected units' incoming rows add to the previous layer's outgoing sums, and what
        their outgoing columns add to the next layer's incoming sums, one row per selected unit (None
        where nothing is cached). Take it before replacing the units and hand it to :meth:`patch`."""
        layer = self.layers[index]
        index_pair = (selection.members, selection.units)
        to_previous = to_next = None
        if index > 0 and self.layers[index - 1].consumer is layer.producer and self.out_sums[index - 1] is not None:
            rows = layer.incoming()[index_pair]  # (P, previous units, ...): the previous layer's columns
            to_previous = rows.reshape(rows.shape[0], self.layers[index - 1].n_units, -1).abs().sum(2)
        following = self.layers[index + 1] if index + 1 < len(self.layers) else None
        if following is not None and following.producer is layer.consumer and self.in_sums[index + 1] is not None:
            columns = layer.outgoing_weights()[selection.members, :, selection.units]  # (P, next units, ...)
            to_next = columns.abs().sum(2)
        return to_previous, to_next

    @torch.no_grad()
    def patch(self, index: int, selection: UnitSelection, before) -> None:
        """Bring the cached sums up to date with a replacement of layer ``index``'s selected units: their
        own sums from their new rows and columns, and the neighbouring layers' sums by what the
        replaced rows and columns changed. Only the optimizer's changes wait for the next refresh."""
        layer = self.layers[index]
        members, units = selection.members, selection.units
        if self.in_sums[index] is not None:
            rows = layer.incoming()[members, units].reshape(len(selection), -1)
            self.in_sums[index][members, units] = rows.abs().sum(1)
        if self.out_sums[index] is not None:
            columns = layer.outgoing_weights()[members, :, units]
            self.out_sums[index][members, units] = columns.abs().sum((1, 2))
        after = self.neighbour_shares(index, selection)
        if after[0] is not None:
            self.out_sums[index - 1].index_add_(0, members, after[0] - before[0]).clamp_min_(0)
        if after[1] is not None:
            self.in_sums[index + 1].index_add_(0, members, after[1] - before[1]).clamp_min_(0)

    def state_dict(self) -> dict[str, list[torch.Tensor | None]]:
        """The cached sums when they are reused across steps (otherwise every call takes them afresh)."""
        if not self.amortises:
            return {}
        return {"in_sums": [None if t is None else t.clone() for t in self.in_sums],
                "out_sums": [None if t is None else t.clone() for t in self.out_sums]}

    def load_state_dict(self, state: dict[str, list[torch.Tensor | None]]) -> None:
        if self.amortises:
            self.in_sums = [None if t is None else t.clone() for t in state["in_sums"]]
            self.out_sums = [None if t is None else t.clone() for t in state["out_sums"]]


def weight_factors(layers: list[HiddenLayer], kind: str) -> list[torch.Tensor | None]:
    """Each layer's weight factor (S, units) from the current weights (see :class:`WeightFactors`)."""
    return WeightFactors(layers, kind)()
