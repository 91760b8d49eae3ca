"""Continual MNIST problems: online permuted MNIST and random-label MNIST.

Permuted MNIST (Dohare et al. 2024): task t applies a fixed random pixel permutation, drawn from the
seed, to the 60,000 training images (pixels scaled to [0, 1]) and shows ``examples_per_task`` of them
once, in a random order of their own. Each batch is predicted before it is learned (online accuracy).
The probe set of a task is its first ``probe_size`` examples.

Random-label MNIST (Kumar et al. 2023): a fixed random subset of ``subset`` images whose labels are
re-drawn at random for every task; each task runs ``epochs`` passes over the subset in fresh random
orders. It measures pure trainability: nothing about a task carries over to the next.

Populations: the streams serve one member per seed, x shaped (members, batch_size, 784) and y
(members, batch_size). Every member's permutations, orders, subset and labels are drawn from its own
seed exactly as a one-member stream draws them (one generator per member, at task boundaries only).
The images are on the device once, shared by all members; a chunk of steps (about ``CHUNK_BYTES``)
is gathered for all members at once, rows by each member's order, then pixels by each member's
permutation, and each step is a view into the chunk.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..errors import ConfigError
from ..population import check_seeds
from .base import Stream, derive_seed, steps_per_chunk

__all__ = ["PermutedMNISTStream", "RandomLabelMNISTStream"]

_PERMUTATION, _ORDER, _SUBSET, _LABELS = 31, 32, 33, 34  # seed-derivation keys


def _generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*keys))


def _scaled(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """All images once on the device, flattened, pixels scaled to [0, 1]."""
    return images.reshape(images.shape[0], -1).to(device, torch.float32, copy=True).div_(255.0).contiguous()


class PermutedMNISTStream(Stream):
    """Online permuted MNIST: one pass over ``examples_per_task`` permuted images per task."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        seeds: int | Sequence[int] = 0,
        *,
        examples_per_task: int = 60_000,
        batch_size: int = 1,
        probe_size: int = 2000,
        device: torch.device | str = "cpu",
    ) -> None:
        count = images.shape[0]
        if not 0 < examples_per_task <= count:
            raise ConfigError(f"examples_per_task must be in [1, {count}], got {examples_per_task}")
        if examples_per_task % batch_size:
            raise ConfigError(
                f"examples_per_task ({examples_per_task}) must be a multiple of batch_size ({batch_size})"
            )
        self.seeds = check_seeds(seeds)
        self.members = len(self.seeds)
        self.device = torch.device(device)
        self.images = _scaled(images, self.device)
        self.labels = labels.to(self.device, torch.long)
        self.examples_per_task, self.batch_size = examples_per_task, batch_size
        self.steps_per_task = examples_per_task // batch_size
        self.probe_size = min(probe_size, examples_per_task)
        # a chunk holds the gathered rows and their permuted copy, float32
        step_bytes = self.members * batch_size * self.images.shape[1] * 8
        self.steps_per_chunk = steps_per_chunk(step_bytes, self.steps_per_task)

    def permutations(self, task: int) -> torch.Tensor:
        """Each member's pixel permutation of ``task``: (members, pixels) on the device."""
        pixels = self.images.shape[1]
        drawn = [torch.randperm(pixels, generator=_generator(seed, _PERMUTATION, task)) for seed in self.seeds]
        return torch.stack(drawn).to(self.device)

    def orders(self, task: int) -> torch.Tensor:
        """The images each member is shown in ``task``, in order: (members, examples_per_task) on the device."""
        count = self.images.shape[0]
        drawn = [torch.randperm(count, generator=_generator(seed, _ORDER, task)) for seed in self.seeds]
        return torch.stack([order[: self.examples_per_task] for order in drawn]).to(self.device)

    def _examples(self, rows: torch.Tensor, permutations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``rows`` (members, count), each member's permuted by its permutation, and their labels."""
        x = self.images[rows]
        return torch.gather(x, 2, permutations.unsqueeze(1).expand_as(x)), self.labels[rows]

    def probe_batch(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``probe_size`` examples of ``task``, (members, probe_size, ...) (only those are gathered)."""
        return self._examples(self.orders(task)[:, : self.probe_size], self.permutations(task))

    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        task, offset = divmod(start_step, self.steps_per_task)
        size, chunk = self.batch_size, self.steps_per_chunk * self.batch_size
        while True:
            orders, permutations = self.orders(task), self.permutations(task)
            for first in range(offset * size, self.examples_per_task, chunk):
                x, y = self._examples(orders[:, first : first + chunk], permutations)
                for i in range(0, x.shape[1], size):
                    yield x[:, i : i + size], y[:, i : i + size], task
            task, offset = task + 1, 0


class RandomLabelMNISTStream(Stream):
    """A fixed subset of MNIST with labels re-drawn per task, ``epochs`` shuffled passes per task."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        seeds: int | Sequence[int] = 0,
        *,
        subset: int = 1200,
        epochs: int = 10,
        batch_size: int = 16,
        probe_size: int = 1200,
        device: torch.device | str = "cpu",
    ) -> None:
        count = images.shape[0]
        if not 0 < subset <= count:
            raise ConfigError(f"subset must be in [1, {count}], got {subset}")
        if subset % batch_size:
            raise ConfigError(f"subset ({subset}) must be a multiple of batch_size ({batch_size})")
        self.seeds = check_seeds(seeds)
        self.members = len(self.seeds)
        self.device = torch.device(device)
        self.images = _scaled(images, self.device)
        #: Each member's subset: (members, subset) indices into ``images``.
        self.chosen = torch.stack(
            [torch.randperm(count, generator=_generator(seed, _SUBSET))[:subset] for seed in self.seeds]
        ).to(self.device)
        self.subset, self.epochs, self.batch_size = subset, epochs, batch_size
        self.steps_per_epoch = subset // batch_size
        self.steps_per_task = epochs * self.steps_per_epoch
        self.probe_size = min(probe_size, subset)
        step_bytes = self.members * batch_size * self.images.shape[1] * 4
        self.steps_per_chunk = steps_per_chunk(step_bytes, self.steps_per_task)

    def task_labels(self, task: int) -> torch.Tensor:
        """Each member's labels of its subset in ``task``: (members, subset) on the device."""
        drawn = [torch.randint(0, 10, (self.subset,), generator=_generator(seed, _LABELS, task)) for seed in self.seeds]
        return torch.stack(drawn).to(self.device)

    def orders(self, task: int) -> torch.Tensor:
        """The order of each member's ``epochs`` passes in ``task``, one after another: (members,
        epochs * subset) positions in its subset, on the device."""
        drawn = [
            torch.cat([torch.randperm(self.subset, generator=_generator(seed, _ORDER, task, epoch))
                       for epoch in range(self.epochs)])
            for seed in self.seeds
        ]
        return torch.stack(drawn).to(self.device)

    def probe_batch(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``probe_size`` images of each member's subset with their labels in ``task``."""
        return self.images[self.chosen[:, : self.probe_size]], self.task_labels(task)[:, : self.probe_size]

    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        task, offset = divmod(start_step, self.steps_per_task)
        size, chunk = self.batch_size, self.steps_per_chunk * self.batch_size
        shown = self.epochs * self.subset
        while True:
            orders = self.orders(task)
            rows, labels = self.chosen.gather(1, orders), self.task_labels(task).gather(1, orders)
            for first in range(offset * size, shown, chunk):
                x, y = self.images[rows[:, first : first + chunk]], labels[:, first : first + chunk]
                for i in range(0, x.shape[1], size):
                    yield x[:, i : i + size], y[:, i : i + size], task
            task, offset = task + 1, 0
