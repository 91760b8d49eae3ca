"""Slowly-changing regression ("bit-flipping"), Dohare et al. 2024, exactly as REFERENCE.md states.

Input: m = 20 bits. The first ``n_flipping`` (15) are held fixed for ``change_every`` (10,000) examples
and then changed; the rest are drawn i.i.d. per example. The target is a fixed random network per seed:
Linear(m -> 100) with weights and biases in {-1, +1}, linear threshold units, Linear(100 -> 1) with
weights and bias in {-1, +1}. Unit i outputs 1 iff (W x + b)_i > tau_i, with
tau_i = beta * (m + 1) - S_i and S_i = (m - sum_j W_ij + b_i) / 2 (the released code's definition).

Changing the flipping bits: ``flip="one"`` flips exactly one random bit (the paper's wording, the
released ``flip_one`` option); ``flip="all"`` re-draws all of them at random (the released default).

Populations: the stream serves one member per seed, x shaped (members, batch_size, m) and y
(members, batch_size, 1). Each member has its own target network (stacked, so one batched matmul
evaluates all of them), flip schedule and example bits, drawn from its own seed exactly as a one-member
stream draws them. At a task boundary the members' random bits are drawn (one generator per member)
and kept compactly as bools; float inputs and targets are then computed for all members at once, a
chunk of steps at a time (about ``CHUNK_BYTES``), and each step is a view into the chunk. The targets
are sums of a few integers, so float32 computes them exactly on any device.

Target table: within a task the flipping bits are fixed, so an example's target depends only on its
k = n_bits - n_flipping random bits, one of 2^k patterns (32 in the paper). When 2^k is at most the
task's length and at most ``TABLE_MAX`` (``uses_table``), each task evaluates the target network once
on the 2^k pattern inputs (the same ``LTUTarget`` call, members batched) and each example's target is
looked up by its pattern index, sum_j bit_j 2^j: 2^k network evaluations per member and task instead
of ``change_every``, and a gather per example instead of a (n_bits x target_hidden) matmul. Otherwise
(many random bits, so the table would be larger than the task or than memory allows) every example is
evaluated directly. Both are the same exact integer arithmetic, so they give identical targets.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..errors import ConfigError
from ..population import check_seeds
from .base import Stream, derive_seed, steps_per_chunk

__all__ = ["BitFlippingStream", "LTUTarget"]

_TARGET, _FLIPS, _EXAMPLES = 1, 2, 3  # seed-derivation keys for the independent random parts

#: The largest target table (patterns of the random bits) a task evaluates; beyond it targets are direct.
TABLE_MAX = 4096


def _generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*keys))


class LTUTarget:
    """The fixed target networks of a population, one per generator: {-1,+1} weights, linear threshold
    units, {-1,+1} output layer. Parameters are stacked over members (``weight1`` is
    (members, n_hidden, n_inputs)); inputs are (members, examples, n_inputs)."""

    def __init__(
        self,
        n_inputs: int,
        n_hidden: int,
        beta: float,
        generators: Sequence[torch.Generator],
        device: torch.device | str = "cpu",
    ) -> None:
        def signs(generator: torch.Generator, *shape: int) -> torch.Tensor:
            return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1

        drawn = [
            (signs(g, n_hidden, n_inputs), signs(g, n_hidden), signs(g, 1, n_hidden), signs(g, 1)) for g in generators
        ]
        self.weight1, self.bias1, self.weight2, self.bias2 = (torch.stack(part).to(device) for part in zip(*drawn))
        s = (n_inputs - self.weight1.sum(2) + self.bias1) / 2
        self.tau = beta * (n_inputs + 1) - s

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # (W x + b > tau) as 1.0 / 0.0, computed in place: the hidden layer is the chunk's largest tensor
        preactivation = torch.bmm(x, self.weight1.transpose(1, 2)).add_(self.bias1.unsqueeze(1))
        return preactivation.gt_(self.tau.unsqueeze(1))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(self.features(x), self.weight2.transpose(1, 2)).add_(self.bias2.unsqueeze(1))


class BitFlippingStream(Stream):
    """Online examples of the slowly-changing regression problem; one task per flipping-bit setting."""

    def __init__(
        self,
        seeds: int | Sequence[int] = 0,
        *,
        n_bits: int = 20,
        n_flipping: int = 15,
        change_every: int = 10_000,
        flip: str = "one",
        target_hidden: int = 100,
        beta: float = 0.7,
        batch_size: int = 1,
        probe_size: int = 2000,
        device: torch.device | str = "cpu",
    ) -> None:
        if not 0 <= n_flipping <= n_bits:
            raise ConfigError(f"n_flipping must be in [0, n_bits={n_bits}], got {n_flipping}")
        if flip not in ("one", "all"):
            raise ConfigError(f"flip must be 'one' or 'all', got {flip!r}")
        if change_every % batch_size != 0:
            raise ConfigError(
                f"change_every ({change_every}) must be a multiple of batch_size ({batch_size}) "
                "so that no batch straddles a change"
            )
        self.seeds = check_seeds(seeds)
        self.members = len(self.seeds)
        self.n_bits, self.n_flipping, self.change_every = n_bits, n_flipping, change_every
        self.flip, self.batch_size = flip, batch_size
        self.steps_per_task = change_every // batch_size
        self.probe_size = min(probe_size, change_every)
        self.device = torch.device(device)
        generators = [_generator(seed, _TARGET) for seed in self.seeds]
        self.target = LTUTarget(n_bits, target_hidden, beta, generators, self.device)
        self._flip_generators = [_generator(seed, _FLIPS) for seed in self.seeds]
        self._flipping_bits: list[torch.Tensor] = []  # per task, (members, n_flipping) bool on the CPU
        n_random = n_bits - n_flipping
        self.uses_table = 2**n_random <= min(change_every, TABLE_MAX)
        self._powers = (2 ** torch.arange(n_random, device=self.device)).float()  # pattern index weights
        # float32 inputs (and their random part), the target's hidden layer and output, per example
        self._direct_bytes = 4 * (2 * n_bits + target_hidden + 1)
        # with the table: float32 inputs (and their random part), the pattern index (as float and int64), y
        example_bytes = 4 * (2 * n_bits + 1) + 12 if self.uses_table else self._direct_bytes
        self.steps_per_chunk = steps_per_chunk(self.members * batch_size * example_bytes, self.steps_per_task)

    def flipping_bits(self, task: int) -> torch.Tensor:
        """The flipping bits of ``task``, (members, n_flipping) float on the device (computed in order and
        cached, so any task is reproducible)."""
        while len(self._flipping_bits) <= task:
            if not self._flipping_bits or self.flip == "all":
                drawn = [torch.randint(0, 2, (self.n_flipping,), generator=g) for g in self._flip_generators]
                bits = torch.stack(drawn).bool()
            else:
                bits = self._flipping_bits[-1].clone()
                if self.n_flipping:
                    drawn = [torch.randint(0, self.n_flipping, (1,), generator=g) for g in self._flip_generators]
                    members, index = torch.arange(self.members), torch.cat(drawn)
                    bits[members, index] = ~bits[members, index]
            self._flipping_bits.append(bits)
        return self._flipping_bits[task].to(self.device, torch.float32)

    def random_bits(self, task: int) -> torch.Tensor:
        """The i.i.d. bits of every example of ``task``: (members, change_every, n_bits - n_flipping) bool on
        the device."""
        shape = (self.change_every, self.n_bits - self.n_flipping)
        bits = torch.empty((self.members, *shape), dtype=torch.bool)
        for member, seed in enumerate(self.seeds):
            bits[member] = torch.randint(0, 2, shape, generator=_generator(seed, _EXAMPLES, task))
        return bits.to(self.device)

    def target_table(self, flipping: torch.Tensor) -> torch.Tensor:
        """The targets of a task's 2^k random-bit patterns, (members, 2^k): entry p is the target of the
        input with the task's flipping bits and random bit j equal to bit j of p. Evaluated a chunk of
        patterns at a time (about ``CHUNK_BYTES``), like the examples."""
        n_random, count = self.n_bits - self.n_flipping, 2 ** (self.n_bits - self.n_flipping)
        patterns = (torch.arange(count).unsqueeze(1) >> torch.arange(n_random)) & 1
        patterns = patterns.bool().to(self.device).expand(self.members, -1, -1)
        rows = steps_per_chunk(self.members * self._direct_bytes, count)
        parts = [self._examples(flipping, patterns[:, i : i + rows])[1] for i in range(0, count, rows)]
        return torch.cat(parts, dim=1).squeeze(2)

    def _examples(
        self, flipping: torch.Tensor, random_bits: torch.Tensor, table: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (members, count, n_bits) and targets (members, count, 1) from a task's flipping bits and
        ``count`` examples' random bits; the targets are looked up in the task's ``table`` if one is given,
        else evaluated."""
        members, count, _ = random_bits.shape
        x = torch.cat((flipping.unsqueeze(1).expand(members, count, -1), random_bits.float()), dim=2)
        if table is None:
            return x, self.target(x)
        index = torch.matmul(x[:, :, self.n_flipping :], self._powers).long()  # exact: below 2^24
        return x, table.gather(1, index).unsqueeze(2)

    def probe_batch(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``probe_size`` examples of ``task``, (members, probe_size, ...) on the device."""
        flipping = self.flipping_bits(task)
        table = self.target_table(flipping) if self.uses_table else None
        return self._examples(flipping, self.random_bits(task)[:, : self.probe_size], table)

    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        task, offset = divmod(start_step, self.steps_per_task)
        size, chunk = self.batch_size, self.steps_per_chunk * self.batch_size
        while True:
            flipping, random_bits = self.flipping_bits(task), self.random_bits(task)
            table = self.target_table(flipping) if self.uses_table else None
            for first in range(offset * size, self.change_every, chunk):
                x, y = self._examples(flipping, random_bits[:, first : first + chunk], table)
                for i in range(0, x.shape[1], size):
                    yield x[:, i : i + size], y[:, i : i + size], task
            task, offset = task + 1, 0
