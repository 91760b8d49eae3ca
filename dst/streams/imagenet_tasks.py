"""Continual ImageNet-32 (Dohare et al. 2024): a long sequence of binary classification tasks.

Task t is a pair of ImageNet-32 classes. The pairs come from the seed: a random permutation of the
available classes taken in consecutive pairs, then a fresh permutation when those are used up (with an
odd number of classes the one left over sits out that cycle), so the two classes of a task always
differ. Labels are 0 and 1 by position in the pair. A task trains ``epochs`` passes over its
2 x 600 training images, each pass in a fresh random order, in mini-batches of ``batch_size``; after the
task the model is tested on the 2 x 100 test images (``test_batch``; the loop's ``evaluation_sets``), which is
the benchmark's measure.

Images are the uint8 files of :mod:`dst.streams.imagenet32`, read lazily (only the classes of the tasks
being run; a few tasks' tensors are kept in a small LRU cache). Pixels are scaled to [0, 1] by default
(``pixel_scale=1/255``); the released code feeds the raw 0-255 values (``pixel_scale=1``).
Training and test images of a task are stored interleaved (class 0, class 1, class 0, ...), so the
probe batch (the first ``probe_size`` training images) holds both classes equally.

Populations: continual ImageNet serves the conv nets, which run as populations of one, so the stream
takes exactly one seed; its batches still lead with a member dimension of 1, x shaped
(1, batch_size, 3, 32, 32) and y (1, batch_size).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch

from ..errors import ConfigError, DataError
from ..population import check_seeds
from .base import Stream, derive_seed
from .imagenet32 import (
    TEST_IMAGES_PER_CLASS,
    TRAIN_IMAGES_PER_CLASS,
    available_classes,
    load_imagenet32_class,
)

__all__ = ["ContinualImageNetStream"]

_CLASS_ORDER, _ORDER = 41, 42  # seed-derivation keys

TaskData = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*keys))


def _interleave(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images a0, b0, a1, b1, ... with labels 0, 1, 0, 1, ..."""
    images = torch.stack((first, second), dim=1).flatten(0, 1)
    labels = torch.arange(2).repeat(first.shape[0])
    return images, labels


class ContinualImageNetStream(Stream):
    """Binary ImageNet-32 tasks over a directory of ``<class>.npy`` files, ``epochs`` passes per task."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        seeds: int | Sequence[int] = 0,
        *,
        epochs: int = 250,
        batch_size: int = 100,
        probe_size: int = 2 * TRAIN_IMAGES_PER_CLASS,
        pixel_scale: float = 1 / 255,
        train_images: int = TRAIN_IMAGES_PER_CLASS,
        test_images: int = TEST_IMAGES_PER_CLASS,
        cached_tasks: int = 3,
        device: torch.device | str = "cpu",
    ) -> None:
        self.seeds = check_seeds(seeds)
        if len(self.seeds) > 1:
            raise ConfigError(
                f"got {len(self.seeds)} seeds, but continual ImageNet runs one member at a time (conv nets are "
                "populations of one); run seeds as separate runs"
            )
        self.members = 1
        self.data_dir = data_dir
        self.classes = available_classes(data_dir)  # DataError when missing or empty
        if len(self.classes) < 2:
            raise DataError(
                f"{data_dir} holds {len(self.classes)} class file(s) ({self.classes}); a binary task needs "
                "at least 2 (the benchmark uses 1000). Add the other <class_index>.npy files."
            )
        per_task = 2 * train_images
        if epochs < 1 or batch_size < 1 or cached_tasks < 1:
            raise ConfigError(
                f"epochs, batch_size and cached_tasks must be positive, got {epochs}, {batch_size}, {cached_tasks}"
            )
        if per_task % batch_size:
            raise ConfigError(f"the {per_task} training images of a task must be a multiple of batch_size ({batch_size})")
        self.device = torch.device(device)
        self.epochs, self.batch_size = epochs, batch_size
        self.pixel_scale = pixel_scale
        self.train_images, self.test_images = train_images, test_images
        self.examples_per_task = per_task
        self.steps_per_epoch = per_task // batch_size
        self.steps_per_task = epochs * self.steps_per_epoch
        self.probe_size = min(probe_size, per_task)
        self.cached_tasks = cached_tasks
        self._cache: OrderedDict[int, TaskData] = OrderedDict()

    @property
    def tasks_per_cycle(self) -> int:
        """Tasks before every class has been used once (one permutation of the classes)."""
        return len(self.classes) // 2

    def task_classes(self, task: int) -> tuple[int, int]:
        """The class indices of ``task``: label 0 is the first, label 1 the second."""
        cycle, pair = divmod(task, self.tasks_per_cycle)
        order = torch.randperm(len(self.classes), generator=_generator(self.seeds[0], _CLASS_ORDER, cycle))
        first, second = order[2 * pair : 2 * pair + 2].tolist()
        return self.classes[first], self.classes[second]

    def _task_data(self, task: int) -> TaskData:
        """``(x_train, y_train, x_test, y_test)`` of ``task`` on the device, scaled, interleaved by class."""
        if task in self._cache:
            self._cache.move_to_end(task)
            return self._cache[task]
        (train0, test0), (train1, test1) = (
            load_imagenet32_class(self.data_dir, c, train_images=self.train_images, test_images=self.test_images)
            for c in self.task_classes(task)
        )
        x_train, y_train = _interleave(train0, train1)
        x_test, y_test = _interleave(test0, test1)
        device, scale = self.device, self.pixel_scale
        data = (
            x_train.to(device, torch.float32) * scale, y_train.to(device),
            x_test.to(device, torch.float32) * scale, y_test.to(device),
        )
        self._cache[task] = data
        while len(self._cache) > self.cached_tasks:
            self._cache.popitem(last=False)
        return data

    def order(self, task: int, epoch: int) -> torch.Tensor:
        """The order in which ``epoch`` of ``task`` shows the training images (indices into them)."""
        return torch.randperm(self.examples_per_task, generator=_generator(self.seeds[0], _ORDER, task, epoch))

    def probe_batch(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The task's first ``probe_size`` training images (both classes alike) and their labels,
        (1, probe_size, ...)."""
        x, y, _, _ = self._task_data(task)
        return x[None, : self.probe_size], y[None, : self.probe_size]

    def test_batch(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The task's held-out test images (``test_images`` per class) and their labels,
        (1, 2 * test_images, ...)."""
        _, _, x, y = self._task_data(task)
        return x[None], y[None]

    evaluation_names = ("test",)

    def next_evaluation(self, step: int) -> int:
        """Each task is tested when it ends."""
        return (step // self.steps_per_task + 1) * self.steps_per_task

    def evaluation_sets(self, task: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {"test": self.test_batch(task)}

    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        task, offset = divmod(start_step, self.steps_per_task)
        size = self.batch_size
        while True:
            x, y, _, _ = self._task_data(task)
            first_epoch = offset // self.steps_per_epoch
            for epoch in range(first_epoch, self.epochs):
                order = self.order(task, epoch).to(self.device)
                first = offset % self.steps_per_epoch if epoch == first_epoch else 0
                for i in range(first * size, self.examples_per_task, size):
                    index = order[i : i + size]
                    yield x[index][None], y[index][None], task
            task, offset = task + 1, 0
