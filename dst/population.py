"""Populations: S independent learners of one architecture and one strategy, trained in one batched pass.

Every per-unit and per-connection tensor carries a leading member dimension. A population layer
(``MaskedLinear(..., members=S)``) holds its weight as (S, out, in) and takes inputs (S, batch, in); a
plain torch model (``nn.Linear`` weights (out, in)) is a population of one, seen through
:func:`member_view` as (1, out, in). Strategies, surgery and metrics are written once, on the member
layout, and serve both.

Members differ in seed and may differ in any numeric setting. Their randomness on the training step
comes from :class:`MemberRandom`: counter-based draws that are a pure function of (member seed, purpose,
step, index), so member s of a population draws exactly what a population of one with seed s draws,
whatever the other members do, and a resumed run draws what an uninterrupted one does without any
generator state to save.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

import numpy as np
import torch
from torch import nn

from .errors import ConfigError

__all__ = [
    "members",
    "member_view",
    "is_population",
    "is_population_module",
    "forward",
    "mse_per_member",
    "cross_entropy_per_member",
    "MemberRandom",
    "check_seeds",
    "zero_members",
    "MemberLayerNorm",
    "parameter_owners",
]


def is_population_module(module: nn.Module) -> bool:
    """Whether ``module`` keeps its parameters with a leading member dimension."""
    return getattr(module, "members", None) is not None


class MemberLayerNorm(nn.Module):
    """LayerNorm over the last dimension for every member of a population, each member with its own scale
    and shift: (S, batch, units) -> (x - mean) / sqrt(var + eps) * weight_s + bias_s, weight and bias
    (S, units) (torch's ``nn.LayerNorm`` per member: biased variance, eps inside the square root)."""

    def __init__(self, units: int, members: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.members, self.units, self.eps = members, units, eps
        self.normalized_shape = (units,)
        self.weight = nn.Parameter(torch.ones(members, units, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(members, units, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalised = torch.nn.functional.layer_norm(x, self.normalized_shape, eps=self.eps)
        return torch.addcmul(self.bias[:, None, :], normalised, self.weight[:, None, :])

    def extra_repr(self) -> str:
        return f"{self.units}, members={self.members}, eps={self.eps}"


def parameter_owners(model: nn.Module) -> dict[int, nn.Module]:
    """The module that holds each parameter of ``model``, by the parameter's id (what :func:`member_view`
    needs to see a parameter member-first)."""
    return {id(param): module for module in model.modules() for param in module.parameters(recurse=False)}


def members(model: nn.Module) -> int:
    """The population size of ``model``: S of its population layers, or 1 for a plain torch model.

    A model that mixes population layers of different sizes is refused.
    """
    sizes = {module.members for module in model.modules() if is_population_module(module)}
    if len(sizes) > 1:
        raise ConfigError(f"the model mixes population layers of sizes {sorted(sizes)}; use one size")
    return sizes.pop() if sizes else 1


def is_population(model: nn.Module) -> bool:
    """Whether ``model`` has population layers (False for a plain torch model, a population of one)."""
    return any(is_population_module(module) for module in model.modules())


def forward(model: nn.Module, x: torch.Tensor, population: bool | None = None) -> torch.Tensor:
    """``model`` on member-first inputs (S, batch, ...) -> member-first outputs (S, batch, ...).

    A plain model (a population of one) takes its only member's batch. Pass ``population``
    (:func:`is_population`) to skip looking it up on every call.
    """
    if population is None:
        population = is_population(model)
    if population:
        return model(x)
    if x.shape[0] != 1:
        raise ConfigError(
            f"a plain torch model is a population of one, but the inputs hold {x.shape[0]} members; "
            "build the model with population layers (dst.nets.mlp(..., generators=[...]))"
        )
    return model(x[0]).unsqueeze(0)


def mse_per_member(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each member over its batch: (S, batch, ...) -> (S,)."""
    return torch.nn.functional.mse_loss(output, target, reduction="none").mean(tuple(range(1, output.dim())))


def cross_entropy_per_member(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each member over its batch: logits (S, batch, classes), labels (S, batch) -> (S,)."""
    members, batch = target.shape[:2]
    flat = output.reshape(members * batch, -1)
    losses = torch.nn.functional.cross_entropy(flat, target.reshape(-1), reduction="none")
    return losses.view(members, batch).mean(1)


def member_view(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (a parameter, gradient, mask, state or activation of ``module``) with its member
    dimension: as it is for a population layer, a (1, ...) view for a plain layer. Writes through."""
    return tensor if is_population_module(module) else tensor.unsqueeze(0)


@torch.no_grad()
def zero_members(model: nn.Module, optimizer: torch.optim.Optimizer, members: Sequence[int]) -> None:
    """Zero ``members``' slices of every parameter of ``model`` and of every optimizer state tensor shaped
    like its parameter."""
    if not members:
        return
    for module in model.modules():
        for param in module.parameters(recurse=False):
            member_view(module, param)[list(members)] = 0
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    member_view(module, value)[list(members)] = 0


def check_seeds(seeds: int | Sequence[int], *, distinct: bool = False) -> tuple[int, ...]:
    """Normalise an int or a sequence of ints to a non-empty tuple of seeds; with ``distinct``, refuse a seed
    given twice. (A population may hold one seed twice, e.g. two study trials' members with other settings:
    each is the run of that seed with its own settings. Where run directories are named by seed, it may not.)"""
    if isinstance(seeds, bool):
        raise ConfigError(f"a seed must be an integer, got {seeds!r}")
    if isinstance(seeds, Integral):
        return (int(seeds),)
    try:
        values = tuple(seeds)
    except TypeError:
        raise ConfigError(f"seeds must be an integer or a sequence of integers, got {seeds!r}") from None
    if not values:
        raise ConfigError("a population needs at least one seed (got none); give --seed N or --seeds A:B")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise ConfigError(f"seeds must be integers, got {value!r}")
    values = tuple(int(value) for value in values)
    if distinct and len(set(values)) != len(values):
        repeated = sorted({v for v in values if values.count(v) > 1})
        raise ConfigError(f"seeds {repeated} appear twice: members with one seed and the same settings would be "
                          "the same run, and their folders seed-<s> one; give each seed once")
    return values


# -- counter-based random numbers ---------------------------------------------------------------
# splitmix64 (Steele, Lea and Flood 2014) on int64 tensors: the multiplications wrap like uint64, and a
# logical right shift is an arithmetic one with the sign bits masked off.


def _int64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _int64(0x9E3779B97F4A7C15)
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)
_STEP = _int64(0xD1B54A32D192ED03)
_DRAW = _int64(0xABC98388FB8FAC03)


def _shift(z: torch.Tensor, bits: int) -> torch.Tensor:
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """The splitmix64 finaliser. A numpy array (always a fresh one here) is mixed in place through a uint64
    view, whose shifts are logical: the same bits at about half the passes over memory."""
    if isinstance(z, np.ndarray):
        u = z.view(np.uint64)
        u ^= u >> np.uint64(30)
        u *= np.uint64(0xBF58476D1CE4E5B9)
        u ^= u >> np.uint64(27)
        u *= np.uint64(0x94D049BB133111EB)
        u ^= u >> np.uint64(31)
        return z
    z = (z ^ _shift(z, 30)) * _MIX1
    z = (z ^ _shift(z, 27)) * _MIX2
    return z ^ _shift(z, 31)


def _to_float(z: torch.Tensor | np.ndarray, wide: bool) -> torch.Tensor | np.ndarray:
    """Integers as float32 (float64 when ``wide``), numpy or torch as given."""
    if isinstance(z, np.ndarray):
        return z.astype(np.float64 if wide else np.float32)
    return z.to(torch.float64 if wide else torch.float32)


def _mix_int(z: int) -> int:
    """The same finaliser on a Python int (host-side keys)."""
    mask = (1 << 64) - 1
    z &= mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return _int64(z ^ (z >> 31))


class MemberRandom:
    """Random numbers per member, a pure function of (key, step, draw, index).

    ``keys`` holds one 63-bit key per member (from ``derive_seed(seed, purpose...)``). A draw of
    ``shape`` at ``step`` gives member s the values hash(key_s, step, draw, i) for flat positions i of
    ``shape``: the same numbers in any population, for any subset of members asked for, so a member's
    run does not depend on the population it is in. ``draw`` tells apart several draws of one step.
    """

    def __init__(self, keys: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.keys = tuple(int(k) for k in keys)
        self.device = torch.device(device)
        self._keys = torch.tensor([_int64(k) for k in self.keys], dtype=torch.int64, device=self.device)

    @classmethod
    def derived(cls, seeds: Sequence[int], *purpose: int, device: torch.device | str = "cpu") -> "MemberRandom":
        """One key per seed, derived with ``derive_seed(seed, *purpose)``."""
        from .streams.base import derive_seed

        return cls([derive_seed(seed, *purpose) for seed in seeds], device)

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str) -> "MemberRandom":
        return MemberRandom(self.keys, device)

    def bits(
        self,
        shape: Sequence[int],
        *,
        step: int,
        draw: int = 0,
        members: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """64 random bits (int64) per position: (M, *shape) for the M members asked for (all by default).

        With ``rows`` (one per entry of ``members``) entry p gets row ``rows[p]`` of a draw shaped
        (rows, *shape) of member ``members[p]``: the values that draw has there, without making the rest.
        """
        z = self._bits(shape, step, draw, members, rows)
        return torch.from_numpy(z) if isinstance(z, np.ndarray) else z

    def _bits(self, shape, step, draw, members, rows, span=None) -> torch.Tensor | np.ndarray:
        """:meth:`bits` as the arithmetic leaves them: a numpy array on the CPU, else a torch tensor.
        With ``span=(first, last)`` only flat positions first..last-1, shaped (M, last - first)."""
        keys = self._keys if members is None else self._keys[torch.as_tensor(members, device=self.device)]
        count = 1
        for size in shape:
            count *= int(size)
        base = _mix_int(int(step) * _STEP + int(draw) * _DRAW)
        # On the CPU the same operators run on numpy views of the same values: numpy's per-call cost is a
        # fraction of torch's, and int64 arithmetic wraps identically, so the bits are the same.
        host = self.device.type == "cpu"
        if host:
            keys = keys.numpy()
        start = _mix(keys ^ base)  # one start per member
        if rows is not None:
            rows = torch.as_tensor(rows, device=self.device).to(torch.int64)
            rows = rows.numpy() if host else rows
            start = start + rows * _int64(count * _GOLDEN)
        first, last = span if span is not None else (0, count)
        if host:
            offsets = np.arange(first + 1, last + 1, dtype=np.int64)
        else:
            offsets = torch.arange(first + 1, last + 1, dtype=torch.int64, device=self.device)
        z = _mix(start[:, None] + offsets * _GOLDEN)
        return z if span is not None else z.reshape(keys.shape[0], *shape)

    def uniform(
        self,
        shape: Sequence[int],
        *,
        step: int,
        draw: int = 0,
        members: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """U[0, 1) with 24 random bits (float32) or 53 (float64), shaped (M, *shape)."""
        z = self.bits(shape, step=step, draw=draw, members=members, rows=rows)
        if dtype == torch.float64:
            return _shift(z, 11).to(dtype) * 2.0**-53
        return _shift(z, 40).to(dtype) * 2.0**-24

    def normal(
        self,
        shape: Sequence[int],
        *,
        step: int,
        draw: int = 0,
        members: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Standard normal draws (Box-Muller from two 24-bit uniforms of one 64-bit word), computed in
        float32 (float64 when asked for), on the CPU with numpy in blocks of positions whose temporaries
        stay in cache (the same values as one pass, at about half the time for a million)."""
        wide = dtype == torch.float64
        if self.device.type != "cpu":
            return _box_muller(self._bits(shape, step, draw, members, rows), wide).to(dtype)
        count = math.prod(int(size) for size in shape)
        rows_ = len(self.keys) if members is None else int(torch.as_tensor(members).numel())
        width = max(1, _BLOCK // max(rows_, 1))
        value = np.empty((rows_, count), dtype=np.float64 if wide else np.float32)
        for first in range(0, count, width):
            last = min(first + width, count)
            value[:, first:last] = _box_muller(self._bits(shape, step, draw, members, rows, (first, last)), wide)
        return torch.from_numpy(value.reshape(rows_, *shape)).to(dtype)


_BLOCK = 1 << 17  # values per numpy pass in MemberRandom.normal: about 1 MiB of int64 temporaries


def _box_muller(z: torch.Tensor | np.ndarray, wide: bool) -> torch.Tensor | np.ndarray:
    """N(0, 1) from 64 random bits each: sqrt(-2 ln u1) cos(2 pi u2), u1 in (0, 1] and u2 in [0, 1)."""
    high = (_to_float(_shift(z, 40), wide) + 1.0) * 2.0**-24  # (0, 1]: the log is finite
    low = _to_float(z & ((1 << 24) - 1), wide) * 2.0**-24
    xp = np if isinstance(z, np.ndarray) else torch
    return xp.sqrt(-2.0 * xp.log(high)) * xp.cos(2.0 * math.pi * low)
