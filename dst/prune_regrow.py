"""Connection-level refresh: SET and RigL over one shared prune-and-regrow update.

Every ``update_interval`` steps the schedule gives a drop fraction f. In each masked layer with n active
weights, k = round(f * n) active weights with the lowest drop score are removed and the k inactive
positions with the highest grow score are activated, so every layer's count of active weights is
exactly unchanged. Positions dropped in this update are candidates for regrowth (as in RigL); a
position dropped and regrown at once restarts like any grown weight: its value is the grow value, not
its old one, and its optimizer state is zeroed. Dropped weights are set to 0 and their optimizer state
is zeroed as well.

A strategy only says what differs (in the spirit of RigL's TF2 mask updaters):

- ``drop_scores``: lower is dropped first (magnitude |w| by default; asked for at the active positions);
- ``grow_scores``: higher is grown first (SET: uniform noise; RigL: |dense gradient|); ``grow_indices``
  may pick the positions without a score (SET samples uniform random inactive positions directly);
- ``drop_indices``: the count rule (SET's sign split overrides it);
- ``grown_values``: 0, or small random values (``grow_init``);
- the optimizer-state fix is shared (``dst.optim.reset_optimizer_state``).

Schedules (``schedule``): ``constant`` (alpha at every update), ``cosine`` (RigL: alpha/2 (1 + cos(pi t /
T_end)), no updates after T_end), ``cosine-per-task`` (the cosine restarted at every task boundary, t and
T_end counted within the task), ``stop`` (alpha until T_end, then none). ``end_step`` 0 means
0.75 x the run (or x the task, per task), taken from ``set_horizon``.
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import strategies
from .config import setting
from .errors import ConfigError, TopologyError
from .init import fans
from .optim import reset_optimizer_state
from .refresh import NO_REFRESH, RefreshStats, RefreshStrategy, StrategyConfig
from .topology import Topology

__all__ = [
    "top_k",
    "SCHEDULES",
    "DropSchedule",
    "PruneRegrowConfig",
    "PruneRegrow",
    "SETConfig",
    "SparseEvolutionaryTraining",
    "RigLConfig",
    "RigL",
]

SCHEDULES = ("constant", "cosine", "cosine-per-task", "stop")
END_FRACTION = 0.75  # RigL's T_end = 0.75 x training


_PREFILTER_ABOVE = 1 << 18  # top-k over more scores than this first narrows the candidates


def top_k(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Indices of the k largest (or smallest) entries of a 1-D tensor: exactly what ``torch.topk`` returns
    up to the order of ties, but fast for large k on the CPU.

    ``torch.topk`` with k in the hundred thousands over millions of entries is close to a full sort.
    For a small share, a strided sample gives a threshold that about 1.5 k entries pass; top-k over those
    is exact whenever at least k pass (checked; otherwise it falls back to ``torch.topk`` over everything).
    For a large share (k > n / 4), the k-th value comes from a selection (``kthvalue``) and the result is
    every entry beyond it plus the first ties.
    """
    n = scores.numel()
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    if n <= _PREFILTER_ABOVE:
        return torch.topk(scores, k, largest=largest).indices
    values = scores if largest else -scores
    if k * 4 > n:  # a large share: the k-th value by selection, then everything above it plus ties
        threshold = torch.kthvalue(values, n - k + 1).values
        above = torch.nonzero(values > threshold).flatten()
        ties = torch.nonzero(values == threshold).flatten()
        return torch.cat((above, ties[: k - above.numel()]))
    stride = max(1, n // 65536)
    sample = values[::stride]
    position = max(1, min(sample.numel(), sample.numel() - int(1.5 * k * sample.numel() / n)))
    threshold = torch.kthvalue(sample, position).values
    candidates = torch.nonzero(values >= threshold).flatten()
    if candidates.numel() < k:
        return torch.topk(scores, k, largest=largest).indices
    return candidates[torch.topk(values[candidates], k).indices]


@dataclass(frozen=True)
class DropSchedule:
    """Answers "which drop fraction at this step?" (``None``: no update at this step)."""

    kind: str
    alpha: float
    interval: int
    end_step: int = 0

    def end(self, total: int | None) -> int:
        if self.end_step:
            return self.end_step
        if total is None:
            raise ConfigError(
                f"schedule {self.kind!r} with end_step=0 ends at {END_FRACTION} x the run, but the run length "
                "is unknown: set end_step, or call strategy.set_horizon(total_steps, steps_per_task)"
            )
        return max(1, int(END_FRACTION * total))

    def __call__(
        self, step: int, task_step: int, total_steps: int | None = None, task_steps: int | None = None
    ) -> float | None:
        if step % self.interval:
            return None
        if self.kind == "constant":
            return self.alpha
        if self.kind == "stop":
            return self.alpha if step <= self.end(total_steps) else None
        t, end = (task_step, self.end(task_steps)) if self.kind == "cosine-per-task" else (step, self.end(total_steps))
        if t > end:
            return None
        fraction = self.alpha / 2 * (1 + math.cos(math.pi * t / end))
        return fraction if fraction > 0 else None


@dataclass(frozen=True)
class PruneRegrowConfig(StrategyConfig):
    drop_fraction: float = setting(
        0.3, low=0.0, high=1.0, search=(0.05, 0.5), help="alpha: fraction of active weights replaced per update"
    )
    update_interval: int = setting(100, low=1, search=(10, 1000), log=True, help="delta T: steps between updates")
    end_step: int = setting(0, low=0, help="T_end for cosine/stop schedules (0: 0.75 x the run or task)")
    schedule: str = setting("constant", choices=SCHEDULES, help="drop-fraction schedule")
    grow_init: str = setting("zero", choices=("zero", "random"), help="value of grown weights")
    grow_scale: float = setting(
        0.1, low=0.0, help="grow_init=random: U(-b, b) with b = grow_scale / sqrt(fan_in)"
    )


class PruneRegrow(RefreshStrategy, metaclass=ABCMeta):
    """The shared update; subclasses give the grow score (and may change drop score or count rule)."""

    Config = PruneRegrowConfig

    def __init__(
        self,
        model: nn.Module | Topology,
        optimizer: torch.optim.Optimizer,
        config: PruneRegrowConfig | None = None,
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__(model, optimizer, config, seed=seed)
        if not self.masked:
            raise TopologyError(
                f"{self.name!r} refreshes connections of masked layers, and the model has none: "
                "call dst.sparsify(model, density < 1) before building the strategy"
            )
        c = self.config
        self.schedule = DropSchedule(c.schedule, c.drop_fraction, c.update_interval, c.end_step)
        self.active = [int(layer.mask.sum()) for layer in self.masked]  # constant; known on the host
        self.task_start = 0

    def on_task_start(self, task: int) -> None:
        self.task_start = self.step

    def fraction(self, step: int) -> float | None:
        """The drop fraction at (1-based) step ``step``, or None."""
        return self.schedule(step, step - self.task_start, self.total_steps, self.steps_per_task)

    # -- what strategies differ in ------------------------------------------------------------
    def drop_scores(self, index: int, layer: nn.Module, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Lower is dropped first: |w|. With ``positions`` (flat indices of the active weights) only the
        scores there, so an update need not score every weight of a large sparse layer."""
        weight = layer.weight.detach()
        return weight.abs() if positions is None else weight.view(-1)[positions].abs()

    @abstractmethod
    def grow_scores(self, index: int, layer: nn.Module) -> torch.Tensor:
        """Higher is grown first."""

    def drop_indices(self, index: int, layer: nn.Module, fraction: float) -> torch.Tensor:
        """Flat indices of the active weights to drop: the round(f * n) lowest drop scores."""
        count = round(fraction * self.active[index])
        if count == 0:
            return torch.empty(0, dtype=torch.long, device=layer.weight.device)
        active = layer.mask.view(-1).nonzero().squeeze(1)
        scores = self.drop_scores(index, layer, active)
        return active[top_k(scores, count, largest=False)]

    def grow_indices(self, index: int, layer: nn.Module, count: int, mask: torch.Tensor) -> torch.Tensor:
        """Flat indices of ``count`` inactive positions (``mask`` is the flat mask after the drop): the
        highest grow scores. ``grow_scores`` returns a fresh tensor, overwritten here."""
        scores = self.grow_scores(index, layer).view(-1)
        return top_k(scores.masked_fill_(mask, -torch.inf), count)

    def grown_values(self, layer: nn.Module, count: int) -> torch.Tensor:
        weight = layer.weight
        values = torch.zeros(count, device=weight.device, dtype=weight.dtype)
        if self.config.grow_init == "random":
            bound = self.config.grow_scale / math.sqrt(fans(weight.shape)[0])
            values.uniform_(-bound, bound, generator=self.generator)
        return values

    # -- the shared update ----------------------------------------------------------------------
    @torch.no_grad()
    def update_layer(self, index: int, layer: nn.Module, fraction: float) -> int:
        drop = self.drop_indices(index, layer, fraction)
        count = drop.numel()
        if count == 0:
            return 0
        mask = layer.mask.view(-1)
        mask[drop] = False  # dropped first: a just-dropped position may be regrown at once
        grow = self.grow_indices(index, layer, count, mask)
        weight = layer.weight.view(-1)
        weight[drop] = 0
        weight[grow] = self.grown_values(layer, count)
        mask[grow] = True
        reset_optimizer_state(self.optimizer, layer.weight, torch.cat((drop, grow)), flat=True)
        return count

    def after_step(self) -> RefreshStats:
        super().after_step()
        fraction = self.fraction(self.step)
        if fraction is None:
            return NO_REFRESH
        regrown = sum(self.update_layer(i, layer, fraction) for i, layer in enumerate(self.masked))
        return RefreshStats(connections_regrown=regrown) if regrown else NO_REFRESH

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "task_start": self.task_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.task_start = int(state["task_start"])


@dataclass(frozen=True)
class SETConfig(PruneRegrowConfig):
    split_sign: bool = setting(
        False, help="drop the fraction separately among positive and negative weights (original SET)"
    )


@strategies.register("set")
class SparseEvolutionaryTraining(PruneRegrow):
    """SET (Mocanu et al. 2018): drop the smallest-magnitude weights, regrow at random positions."""

    Config = SETConfig

    def grow_scores(self, index: int, layer: nn.Module) -> torch.Tensor:
        return torch.rand(layer.weight.shape, device=layer.weight.device, generator=self.generator)

    def grow_indices(self, index: int, layer: nn.Module, count: int, mask: torch.Tensor) -> torch.Tensor:
        """``count`` inactive positions uniformly at random, without replacement.

        Where inactive positions are plentiful, draw random positions, skip active ones and repeats, and
        keep the first ``count``: each kept position is uniform over the inactive ones not yet taken, so
        the set is a uniform random subset, at the cost of O(count) draws instead of a score per weight.
        """
        n = mask.numel()
        inactive = n - (self.active[index] - count)
        if n <= _PREFILTER_ABOVE or inactive < 4 * count:
            return super().grow_indices(index, layer, count, mask)
        taken = torch.empty(0, dtype=torch.long, device=mask.device)
        missing = count
        while True:
            draws = int(1.2 * missing * n / inactive) + 64
            candidates = torch.randint(n, (draws,), device=mask.device, generator=self.generator)
            taken = torch.cat((taken, candidates[~mask[candidates]]))
            unique, inverse = torch.unique(taken, return_inverse=True)
            missing = count - unique.numel()
            if missing > 0:
                continue
            order = torch.arange(taken.numel(), device=mask.device)
            first = torch.full_like(unique, taken.numel()).scatter_reduce_(0, inverse, order, "amin")
            return taken[first.sort().values[:count]]

    def drop_indices(self, index: int, layer: nn.Module, fraction: float) -> torch.Tensor:
        if not self.config.split_sign:
            return super().drop_indices(index, layer, fraction)
        weight = layer.weight.detach().flatten()
        active = layer.mask.flatten()
        picks = []
        for sign in (1.0, -1.0):  # smallest positives, then negatives closest to zero
            group = active & (weight * sign > 0)
            count = round(fraction * int(group.sum()))
            if count:
                scores = torch.where(group, weight * sign, torch.inf)
                picks.append(top_k(scores, count, largest=False))
        if not picks:
            return torch.empty(0, dtype=torch.long, device=weight.device)
        return torch.cat(picks)


@dataclass(frozen=True)
class RigLConfig(PruneRegrowConfig):
    schedule: str = setting("cosine", choices=SCHEDULES, help="drop-fraction schedule")


@strategies.register("rigl")
class RigL(PruneRegrow):
    """RigL (Evci et al. 2020): drop the smallest magnitudes, regrow where |dense gradient| is largest."""

    Config = RigLConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dense_grads: list[torch.Tensor | None] = [None] * len(self.masked)

    def before_step(self) -> None:
        """On update steps keep the dense gradient (same backward pass) before it is masked."""
        if self.fraction(self.step + 1) is not None:
            for i, layer in enumerate(self.masked):
                grad = layer.weight.grad
                self.dense_grads[i] = None if grad is None else grad.detach().clone()
        super().before_step()

    def grow_scores(self, index: int, layer: nn.Module) -> torch.Tensor:
        grad = self.dense_grads[index]
        if grad is None:
            raise RuntimeError("rigl has no dense gradient for this update: call before_step() after backward")
        return grad.abs()

    def after_step(self) -> RefreshStats:
        stats = super().after_step()
        self.dense_grads = [None] * len(self.masked)
        return stats
