"""Continual MNIST problems: online permuted MNIST and random-label MNIST.

Permuted MNIST (Dohare et al. 2024): task t applies a fixed random pixel permutation, drawn from the
seed, to the 60,000 training images (pixels scaled to [0, 1]) and shows ``examples_per_task`` of them
once, in a random order of their own. Each batch is predicted before it is learned (online accuracy).
The probe set of a task is its first ``probe_size`` examples.

Random-label MNIST (Kumar et al. 2023): a fixed random subset of ``subset`` images whose labels are
re-drawn at random for every task; each task runs ``epochs`` passes over the subset in fresh random
orders. It measures pure trainability: nothing about a task carries over to the next.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..errors import ConfigError
from .base import Stream, derive_seed

__all__ = ["PermutedMNISTStream", "RandomLabelMNISTStream"]

_PERMUTATION, _ORDER, _SUBSET, _LABELS = 31, 32, 33, 34  # seed-derivation keys


def _generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*keys))


class PermutedMNISTStream(Stream):
    """Online permuted MNIST: one pass over ``examples_per_task`` permuted images per task."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        seed: int = 0,
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
        self.seed = seed
        self.device = torch.device(device)
        # all images once on the device, flattened and scaled: permutations are then index operations
        self.images = (images.reshape(count, -1).to(self.device, torch.float32) / 255.0).contiguous()
        self.labels = labels.to(self.device, torch.long)
        self.examples_per_task, self.batch_size = examples_per_task, batch_size
        self.steps_per_task = examples_per_task // batch_size
        self.probe_size = min(probe_size, examples_per_task)

    def permutation(self, task: int) -> torch.Tensor:
        return torch.randperm(self.images.shape[1], generator=_generator(self.seed, _PERMUTATION, task))

    def order(self, task: int) -> torch.Tensor:
        full = torch.randperm(self.images.shape[0], generator=_generator(self.seed, _ORDER, task))
        return full[: self.examples_per_task]

    def task_examples(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The task's examples in the order they are shown: (x, y) on the device."""
        order = self.order(task).to(self.device)
        permutation = self.permutation(task).to(self.device)
        return self.images[order][:, permutation], self.labels[order]

    def probe_batch(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``probe_size`` examples of ``task`` (only those are gathered and permuted)."""
        order = self.order(task)[: self.probe_size].to(self.device)
        permutation = self.permutation(task).to(self.device)
        return self.images[order][:, permutation], self.labels[order]

    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        task, offset = divmod(start_step, self.steps_per_task)
        size = self.batch_size
        while True:
            x, y = self.task_examples(task)
            for i in range(offset * size, self.examples_per_task, size):
                yield x[i : i + size], y[i : i + size], task
            task, offset = task + 1, 0


class RandomLabelMNISTStream(Stream):
    """A fixed subset of MNIST with labels re-drawn per task, ``epochs`` shuffled passes per task."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        seed: int = 0,
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
        self.seed = seed
        self.device = torch.device(device)
        chosen = torch.randperm(count, generator=_generator(seed, _SUBSET))[:subset]
        self.images = (images[chosen].reshape(subset, -1).to(self.device, torch.float32) / 255.0).contiguous()
        self.subset, self.epochs, self.batch_size = subset, epochs, batch_size
        self.steps_per_epoch = subset // batch_size
        self.steps_per_task = epochs * self.steps_per_epoch
        self.probe_size = min(probe_size, subset)

    def task_labels(self, task: int) -> torch.Tensor:
        return torch.randint(0, 10, (self.subset,), generator=_generator(self.seed, _LABELS, task)).to(self.device)

    def probe_batch(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[: self.probe_size], self.task_labels(task)[: self.probe_size]

    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        task, offset = divmod(start_step, self.steps_per_task)
        size = self.batch_size
        while True:
            labels = self.task_labels(task)
            for epoch in range(offset // self.steps_per_epoch, self.epochs):
                order = torch.randperm(self.subset, generator=_generator(self.seed, _ORDER, task, epoch)).to(self.device)
                x, y = self.images[order], labels[order]
                first = offset % self.steps_per_epoch if epoch == offset // self.steps_per_epoch else 0
                for i in range(first * size, self.subset, size):
                    yield x[i : i + size], y[i : i + size], task
            task, offset = task + 1, 0
