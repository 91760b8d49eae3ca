"""Connection-level refresh: SET and RigL over one shared prune-and-regrow update.

Every ``update_interval`` steps the schedule gives a drop fraction f. In each masked layer with n active
weights, k = round(f * n) active weights with the lowest drop score are removed and the k inactive
positions with the highest grow score are activated, so every layer's count of active weights is
exactly unchanged. Positions dropped in this update are candidates for regrowth (as in RigL); a
position dropped and regrown at once restarts like any grown weight: its value is the grow value, not
its old one, and its optimizer state is zeroed. Dropped weights are set to 0 and their optimizer state
is zeroed as well.

A strategy only says what differs (in the spirit of RigL's TF2 mask updaters):

- ``drop_scores``: lower is dropped first (magnitude |w| by default), member-first like the weight
  (members, *weight shape), read at the active positions;
- ``grow_indices`` (each strategy's own): which inactive positions grow; RigL takes the highest
  ``grow_scores`` (|dense gradient|, shaped like the drop scores), SET samples uniform random inactive
  positions without a score;
- ``drop_indices``: the count rule (SET's sign split overrides it);
- ``grown_values``: 0, or small random values (``grow_init``);
- the optimizer-state fix is shared (``dst.optim_state.reset_optimizer_state``).

Schedules (``schedule``): ``constant`` (alpha at every update), ``cosine`` (RigL: alpha/2 (1 + cos(pi t /
T_end)), no updates after T_end), ``cosine-per-task`` (the cosine restarted at every task boundary, t and
T_end counted within the task), ``stop`` (alpha until T_end, then none). ``end_step`` 0 means
0.75 x the run (or x the task, per task), taken from ``set_horizon``.

In a population every member has its own masks, and may have its own ``drop_fraction``,
``update_interval``, ``end_step`` and ``grow_scale``: the schedule gives each member its own fraction
f_s (0 when it does not update), and member s drops and regrows k_s = round(f_s * n_s) weights per layer.
One batched selection serves all members: each member's candidates are ranked with ties going to the
lower position, so its first k_s picks are the same whatever the other members pick, and member s of a
population does exactly what a population of one with its seed and settings does.
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from . import strategies
from .config import setting
from .errors import ConfigError, TopologyError
from .init import fans
from .optim_state import reset_optimizer_state
from .population import member_view
from .ranking import picked, ranked
from .refresh import NO_REFRESH, RefreshStats, RefreshStrategy, StrategyConfig
from .topology import Topology

__all__ = [
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
_POSITIONS, _VALUES = 0, 1  # purposes of a layer's random draws: draw id = 2 * layer index + purpose


class DropSchedule:
    """Answers "which drop fraction at this step?" for every member.

    ``alpha``, ``interval`` and ``end_step`` are one value or one per member. A call returns ``None`` when
    no member updates at the step, else the (S,) fractions, 0 for the members that do not update.
    """

    def __init__(self, kind: str, alpha, interval, end_step=0) -> None:
        self.kind = kind
        self.alpha, self.interval, self.end_step = np.broadcast_arrays(
            np.atleast_1d(np.asarray(alpha, dtype=np.float64)),
            np.atleast_1d(np.asarray(interval, dtype=np.int64)),
            np.atleast_1d(np.asarray(end_step, dtype=np.int64)),
        )

    def end(self, total: int | None) -> np.ndarray:
        """T_end of every member: its ``end_step``, or 0.75 x ``total`` where that is 0."""
        if (self.end_step > 0).all():
            return self.end_step
        if total is None:
            raise ConfigError(
                f"schedule {self.kind!r} with end_step=0 ends at {END_FRACTION} x the run, but the run length "
                "is unknown: set end_step, or call strategy.set_horizon(total_steps, steps_per_task)"
            )
        return np.where(self.end_step > 0, self.end_step, max(1, int(END_FRACTION * total)))

    def __call__(
        self, step: int, task_step: int, total_steps: int | None = None, task_steps: int | None = None
    ) -> np.ndarray | None:
        fires = step % self.interval == 0
        if not fires.any():
            return None
        if self.kind == "constant":
            fraction = self.alpha
        elif self.kind == "stop":
            fraction = np.where(step <= self.end(total_steps), self.alpha, 0.0)
        else:
            per_task = self.kind == "cosine-per-task"
            t, end = (task_step, self.end(task_steps)) if per_task else (step, self.end(total_steps))
            fraction = np.where(t <= end, self.alpha / 2 * (1 + np.cos(np.pi * t / end)), 0.0)
        fraction = np.where(fires, fraction, 0.0)
        return fraction if (fraction > 0).any() else None


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
    """The shared update; subclasses give the grow score or positions (and may change drop score or count
    rule). ``members`` in the hooks is the host array (M,) of the population indices that update."""

    Config = PruneRegrowConfig

    def __init__(
        self,
        model: nn.Module | Topology,
        optimizer: torch.optim.Optimizer | None,
        config: PruneRegrowConfig | Sequence[PruneRegrowConfig] | None = None,
        *,
        seed: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__(model, optimizer, config, seed=seed)
        if not self.masked:
            raise TopologyError(
                f"{self.name!r} refreshes connections of masked layers, and the model has none: "
                "call dst.sparsify(model, density < 1) before building the strategy"
            )
        c = self.config
        per_member = self.per_member
        self.schedule = DropSchedule(
            c.schedule, per_member("drop_fraction"), per_member("update_interval"), per_member("end_step")
        )
        self.grow_scale = torch.as_tensor(self.per_member("grow_scale"), device=self.device)
        # active weights per member and layer: constant, known on the host
        self.active = [self.member_masks(layer).sum(1).cpu().numpy() for layer in self.masked]
        self.task_start = 0

    def on_task_start(self, task: int) -> None:
        self.task_start = self.step

    knows_refresh_steps = True

    def refreshes_at(self, step: int) -> bool:
        return self.fractions(step) is not None

    def fractions(self, step: int) -> np.ndarray | None:
        """Every member's drop fraction at (1-based) step ``step`` (0: no update), or None if none updates."""
        return self.schedule(step, step - self.task_start, self.total_steps, self.steps_per_task)

    def member_masks(self, layer: nn.Module) -> torch.Tensor:
        """The layer's masks as (S, positions), a view."""
        return member_view(layer, layer.mask).reshape(self.members, -1)

    def rows(self, tensor: torch.Tensor, members: np.ndarray) -> torch.Tensor:
        """``tensor`` (member-first) of ``members`` only: itself when every member is asked for."""
        return tensor if len(members) == self.members else tensor[members]

    # -- what strategies differ in ------------------------------------------------------------
    def drop_scores(self, index: int, layer: nn.Module, members: np.ndarray) -> torch.Tensor:
        """Lower is dropped first: |w|, shaped (M, *one member's weight shape), a fresh tensor (only its
        active positions are read)."""
        return self.rows(member_view(layer, layer.weight).detach(), members).abs()

    def drop_indices(
        self, index: int, layer: nn.Module, members: np.ndarray, fractions: np.ndarray
    ) -> tuple[torch.Tensor, np.ndarray]:
        """(positions (M, k), counts (M,)): member m drops the flat positions in the first counts[m]
        entries of its row, its round(f_m * n_m) active weights with the lowest drop scores."""
        counts = np.rint(fractions * self.active[index][members]).astype(np.int64)
        k = int(counts.max())
        if k == 0:
            return torch.empty(len(members), 0, dtype=torch.long, device=self.device), counts
        active = self.rows(self.member_masks(layer), members)
        scores = self.drop_scores(index, layer, members).reshape(len(members), -1)
        return ranked(scores.masked_fill_(~active, torch.inf), counts, largest=False), counts

    @abstractmethod
    def grow_indices(
        self, index: int, layer: nn.Module, members: np.ndarray, counts: np.ndarray, mask: torch.Tensor
    ) -> torch.Tensor:
        """(M, max count) flat positions, member m growing the first counts[m] of its row, all inactive
        (``mask`` (M, positions) is the mask after the drop)."""

    def grown_values(self, index: int, layer: nn.Module, member: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Values of the grown weights (``position[p]`` of member ``member[p]``): 0, or U(-b, b) with
        b = grow_scale / sqrt(fan_in), the draw keyed by the position (not by the order of the picks)."""
        weight = layer.weight
        if self.config.grow_init == "zero":
            return torch.zeros(position.shape, device=weight.device, dtype=weight.dtype)
        bound = self.grow_scale[member] / math.sqrt(fans(member_view(layer, weight).shape[1:])[0])
        draw = 2 * index + _VALUES
        uniform = self.random.uniform((), step=self.step, draw=draw, members=member, rows=position, dtype=torch.float64)
        return ((2 * uniform - 1) * bound).to(weight.dtype)

    # -- the shared update ----------------------------------------------------------------------
    @torch.no_grad()
    def update_layer(self, index: int, layer: nn.Module, fractions: np.ndarray) -> np.ndarray:
        """Refresh layer ``index`` for the members with a positive fraction; the count regrown per member (S,)."""
        members = np.flatnonzero(fractions > 0)
        regrown = np.zeros(self.members, dtype=np.int64)
        drop, counts = self.drop_indices(index, layer, members, fractions[members])
        k = int(counts.max())
        if k == 0:
            return regrown
        n = self.member_masks(layer).shape[1]
        rows = torch.as_tensor(members, device=self.device)[:, None]
        # (SET's sign split returns more slots than the largest count: its two groups' picks side by side)
        keep = torch.arange(drop.shape[1], device=self.device) < torch.as_tensor(counts, device=self.device)[:, None]
        dropped = (rows * n + drop)[keep]  # flat positions in the member-first weight
        mask, weight = layer.mask.view(-1), layer.weight.view(-1)
        mask[dropped] = False  # dropped first: a just-dropped position may be regrown at once
        grow = self.grow_indices(index, layer, members, counts, self.rows(self.member_masks(layer), members))
        keep = keep[:, :k]
        grown = (rows * n + grow)[keep]
        weight[dropped] = 0
        weight[grown] = self.grown_values(index, layer, rows.expand_as(grow)[keep], grow[keep])
        mask[grown] = True
        if self.optimizer is not None:
            reset_optimizer_state(self.optimizer, layer.weight, torch.cat((dropped, grown)), flat=True)
        regrown[members] = counts
        return regrown

    def after_step(self) -> RefreshStats:
        super().after_step()
        fractions = self.fractions(self.step)
        if fractions is None:
            return NO_REFRESH
        regrown = sum(self.update_layer(i, layer, fractions) for i, layer in enumerate(self.masked))
        return RefreshStats(connections_regrown=regrown) if regrown.any() else NO_REFRESH

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

    def grow_indices(
        self, index: int, layer: nn.Module, members: np.ndarray, counts: np.ndarray, mask: torch.Tensor
    ) -> torch.Tensor:
        """Member m's counts[m] inactive positions uniformly at random, without replacement.

        Walk the member's stream of uniform random positions, skip active ones and repeats, and keep the
        first counts[m]: each kept position is uniform over the inactive ones not yet taken, so the set is
        a uniform random subset, at the cost of O(count) draws instead of a score per weight. The stream is
        a pure function of (seed, step, layer), so drawing more of it (for a member that needs more, or
        another round) leaves its start unchanged.
        """
        rows, n = mask.shape
        need = torch.as_tensor(counts, device=mask.device)[:, None]
        inactive = n - self.active[index][members] + counts
        expected = n * np.log((inactive + 0.5) / (inactive - counts + 0.5))  # sum_j n / (inactive - j)
        draws = int(1.1 * expected.max()) + 64
        while True:
            candidates = self.random.bits(
                (draws,), step=self.step, draw=2 * index + _POSITIONS, members=members
            ).remainder_(n)
            ordered, order = candidates.sort(dim=1, stable=True)
            repeat = torch.zeros_like(candidates, dtype=torch.bool)
            repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]  # a later draw of a position already drawn
            fresh = torch.empty_like(repeat).scatter_(1, order, ~repeat)
            usable = fresh & ~mask.gather(1, candidates)
            rank = usable.cumsum(1)
            if bool((rank[:, -1:] >= need).all()):
                break
            draws *= 2
        take = usable & (rank <= need)
        row, column = take.nonzero(as_tuple=True)
        positions = torch.zeros(rows, int(counts.max()), dtype=torch.long, device=mask.device)
        positions[row, rank[row, column] - 1] = candidates[row, column]
        return positions

    def drop_indices(
        self, index: int, layer: nn.Module, members: np.ndarray, fractions: np.ndarray
    ) -> tuple[torch.Tensor, np.ndarray]:
        """With ``split_sign``: round(f * n+) of the smallest positive weights and round(f * n-) of the
        negative weights closest to zero (exact zeros belong to neither)."""
        if not self.config.split_sign:
            return super().drop_indices(index, layer, members, fractions)
        weight = self.rows(member_view(layer, layer.weight).detach(), members).reshape(len(members), -1)
        active = self.rows(self.member_masks(layer), members)
        picks, valid, total = [], [], np.zeros(len(members), dtype=np.int64)
        for signed in (weight, -weight):  # smallest positives, then negatives closest to zero
            group = active & (signed > 0)
            counts = np.rint(fractions * group.sum(1).cpu().numpy()).astype(np.int64)
            if counts.max() == 0:
                continue
            picks.append(ranked(torch.where(group, signed, torch.inf), counts, largest=False))
            valid.append(picked(counts, weight.device))
            total += counts
        if not picks:
            return torch.empty(len(members), 0, dtype=torch.long, device=weight.device), total
        order = (~torch.cat(valid, 1)).to(torch.int8).argsort(dim=1, stable=True)  # each member's picks first
        return torch.cat(picks, 1).gather(1, order), total


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
        """On update steps keep the dense gradient (same backward pass, member-first) before it is masked."""
        if self.fractions(self.step + 1) is not None:
            for i, layer in enumerate(self.masked):
                grad = layer.weight.grad
                self.dense_grads[i] = None if grad is None else member_view(layer, grad).detach().clone()
        super().before_step()

    def grow_scores(self, index: int, layer: nn.Module, members: np.ndarray) -> torch.Tensor:
        """|dense gradient|, shaped like the drop scores (a fresh tensor)."""
        grad = self.dense_grads[index]
        if grad is None:
            raise RuntimeError("rigl has no dense gradient for this update: call before_step() after backward")
        return self.rows(grad, members).abs()

    def grow_indices(
        self, index: int, layer: nn.Module, members: np.ndarray, counts: np.ndarray, mask: torch.Tensor
    ) -> torch.Tensor:
        """Each member's inactive positions with the highest grow scores."""
        scores = self.grow_scores(index, layer, members).reshape(len(members), -1)
        return ranked(scores.masked_fill_(mask, -torch.inf), counts, largest=True)

    def after_step(self) -> RefreshStats:
        stats = super().after_step()
        self.dense_grads = [None] * len(self.masked)
        return stats
