"""Slowly-changing regression ("bit-flipping"), Dohare et al. 2024, exactly as REFERENCE.md states.

Input: m = 20 bits. The first ``n_flipping`` (15) are held fixed for ``change_every`` (10,000) examples
and then changed; the rest are drawn i.i.d. per example. The target is a fixed random network per seed:
Linear(m -> 100) with weights and biases in {-1, +1}, linear threshold units, Linear(100 -> 1) with
weights and bias in {-1, +1}. Unit i outputs 1 iff (W x + b)_i > tau_i, with
tau_i = beta * (m + 1) - S_i and S_i = (m - sum_j W_ij + b_i) / 2 (the released code's definition).

Changing the flipping bits: ``flip="one"`` flips exactly one random bit (the paper's wording, the
released ``flip_one`` option); ``flip="all"`` re-draws all of them at random (the released default).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..errors import ConfigError
from .base import Stream, derive_seed

__all__ = ["BitFlippingStream", "LTUTarget"]

_TARGET, _FLIPS, _EXAMPLES = 1, 2, 3  # seed-derivation keys for the independent random parts


class LTUTarget:
    """The fixed target network: {-1,+1} weights, linear threshold units, {-1,+1} output layer."""

    def __init__(self, n_inputs: int, n_hidden: int, beta: float, generator: torch.Generator) -> None:
        def signs(*shape: int) -> torch.Tensor:
            return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1

        self.weight1 = signs(n_hidden, n_inputs)
        self.bias1 = signs(n_hidden)
        self.weight2 = signs(1, n_hidden)
        self.bias2 = signs(1)
        s = (n_inputs - self.weight1.sum(1) + self.bias1) / 2
        self.tau = beta * (n_inputs + 1) - s

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return ((x @ self.weight1.T + self.bias1) > self.tau).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x) @ self.weight2.T + self.bias2


class BitFlippingStream(Stream):
    """Online examples of the slowly-changing regression problem; one task per flipping-bit setting."""

    def __init__(
        self,
        seed: int = 0,
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
        self.seed = seed
        self.n_bits, self.n_flipping, self.change_every = n_bits, n_flipping, change_every
        self.flip, self.batch_size = flip, batch_size
        self.steps_per_task = change_every // batch_size
        self.probe_size = min(probe_size, change_every)
        self.device = torch.device(device)
        self.target = LTUTarget(
            n_bits, target_hidden, beta, torch.Generator().manual_seed(derive_seed(seed, _TARGET))
        )
        self._flip_generator = torch.Generator().manual_seed(derive_seed(seed, _FLIPS))
        self._flipping_bits: list[torch.Tensor] = []

    def flipping_bits(self, task: int) -> torch.Tensor:
        """The flipping bits of ``task`` (computed in order and cached, so any task is reproducible)."""
        while len(self._flipping_bits) <= task:
            if not self._flipping_bits or self.flip == "all":
                bits = torch.randint(0, 2, (self.n_flipping,), generator=self._flip_generator).float()
            else:
                bits = self._flipping_bits[-1].clone()
                if self.n_flipping:
                    index = torch.randint(0, self.n_flipping, (1,), generator=self._flip_generator)
                    bits[index] = 1 - bits[index]
            self._flipping_bits.append(bits)
        return self._flipping_bits[task]

    def task_examples(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``change_every`` examples of one task, (x, y), on the CPU."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, _EXAMPLES, task))
        random_bits = torch.randint(
            0, 2, (self.change_every, self.n_bits - self.n_flipping), generator=generator
        ).float()
        fixed = self.flipping_bits(task).expand(self.change_every, self.n_flipping)
        x = torch.cat((fixed, random_bits), dim=1)
        return x, self.target(x)

    def probe_batch(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``probe_size`` examples of ``task``, on the device."""
        x, y = self.task_examples(task)
        return x[: self.probe_size].to(self.device), y[: self.probe_size].to(self.device)

    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        task, offset = divmod(start_step, self.steps_per_task)
        size = self.batch_size
        while True:
            x, y = self.task_examples(task)
            x, y = x.to(self.device), y.to(self.device)
            for i in range(offset * size, self.change_every, size):
                yield x[i : i + size], y[i : i + size], task
            task, offset = task + 1, 0
