"""Class-incremental CIFAR-100 (Dohare et al. 2024; the authors' ``lop/incremental_cifar``).

The classes come in a seeded random order. Task 0 trains on the first ``first_classes`` (5) of them, and
every later task adds ``classes_per_increment`` (5) more, until all 100 are in: 20 tasks. A task is
``epochs_per_increment`` (200) epochs; an epoch is one pass, in a fresh seeded order, in batches of
``batch_size`` (90), over the training images of every class seen so far, so epochs (and tasks) grow
longer as classes arrive: task k has ``epochs_per_increment * (k + 1) * steps_per_increment_epoch`` steps.

Held out: the first ``validation_per_class`` (50) training images of each class, in file order, are the
validation set, as in the authors' code; the test file is the test set. At the end of every epoch both are
evaluated on the classes seen so far (:meth:`evaluation_sets`), which is how the authors measure it; with
``early_stopping`` the loop keeps the epoch of best validation accuracy of each task and goes on from it.
The learning rate follows the authors' schedule within each task (:meth:`learning_rate_factor`): the base
rate, then 0.2, 0.04 and 0.008 times it from epochs 60, 120 and 160 of 200.

Labels: class ``order[j]`` is label j, so the network's output j stands for the j-th class of the order and
a task uses the first ``active_outputs(task)`` outputs (the authors index the outputs by the order; with
outputs drawn alike at initialisation the two are the same problem).

Pixels are scaled to [0, 1] and normalised per channel with the CIFAR-100 training statistics the authors
use. Training batches are augmented as the authors' are, in their order: a horizontal flip with
probability 1/2, a 32 x 32 crop of the image reflect-padded by 4 pixels, and a rotation by an angle drawn
uniformly from 0-15 degrees about the centre, nearest pixel, zero (the mean colour) outside: torchvision's
``rotate`` defaults (the authors' ``RandomRotator`` from mlproj_manager could not be read here). The
augmentation draws are counter-based, a function of (seed, step, example), so a resumed run sees the same
batches. Conv nets run as populations of one: x is (1, batch, 3, 32, 32) and y (1, batch).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from ..population import MemberRandom, check_seeds
from .base import Stream, derive_seed

__all__ = ["ClassIncrementalCIFARStream", "augment", "MEAN", "STD"]

#: per-channel mean and standard deviation of the CIFAR-100 training images in [0, 1] (the authors' values)
MEAN = (0.5071, 0.4865, 0.4409)
STD = (0.2673, 0.2564, 0.2762)
_CLASS_ORDER, _ORDER, _AUGMENT = 51, 52, 53  # seed-derivation keys
Batch = tuple[torch.Tensor, torch.Tensor]


def augment(x: torch.Tensor, draws: torch.Tensor, *, padding: int = 4, degrees: float = 15.0) -> torch.Tensor:
    """The authors' training augmentation of normalised images x (B, C, H, W), from uniform ``draws``
    (B, 4) in [0, 1): flip when draws[:, 0] < 1/2, crop offsets floor(draws[:, 1:3] * (2 padding + 1)),
    rotation by draws[:, 3] * ``degrees`` counter-clockwise."""
    batch, _, height, width = x.shape
    x = torch.where((draws[:, 0] < 0.5)[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (padding,) * 4, mode="reflect")
    offsets = (draws[:, 1:3] * (2 * padding + 1)).long().clamp_(max=2 * padding)
    rows = offsets[:, 0, None] + torch.arange(height, device=x.device)
    columns = offsets[:, 1, None] + torch.arange(width, device=x.device)
    examples = torch.arange(batch, device=x.device)[:, None, None]
    x = padded.permute(0, 2, 3, 1)[examples, rows[:, :, None], columns[:, None, :]].permute(0, 3, 1, 2)
    angle = draws[:, 3].to(x.dtype) * math.radians(degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(cos)
    # grid_sample maps output to input coordinates: rotating the image by +angle reads it at -angle
    theta = torch.stack((torch.stack((cos, -sin, zero), -1), torch.stack((sin, cos, zero), -1)), 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


class ClassIncrementalCIFARStream(Stream):
    """Class-incremental CIFAR-100 over the loaded release (:func:`dst.streams.cifar100.load_cifar100`)."""

    def __init__(
        self,
        train: Batch,
        test: Batch,
        seeds: int | Sequence[int] = 0,
        *,
        first_classes: int = 5,
        classes_per_increment: int = 5,
        epochs_per_increment: int = 200,
        batch_size: int = 90,
        validation_per_class: int = 50,
        augmentation: bool = True,
        early_stopping: bool = True,
        lr_milestones: Sequence[float] = (0.3, 0.6, 0.8),
        lr_decay: float = 0.2,
        probe_size: int = 1000,
        device: torch.device | str = "cpu",
    ) -> None:
        self.seeds = check_seeds(seeds)
        if len(self.seeds) > 1:
            raise ConfigError(f"got {len(self.seeds)} seeds, but class-incremental CIFAR runs one member at a time "
                              "(its ResNet is a population of one); run the seeds as separate runs")
        self.members, self.device = 1, torch.device(device)
        (images, labels), (test_images, test_labels) = train, test
        classes = int(labels.max()) + 1 if labels.numel() else 0
        per_class = torch.bincount(labels, minlength=classes)
        if classes < first_classes or bool((per_class != per_class[0]).any()):
            raise DataError(f"the training set has {per_class.tolist()} images per class; class-incremental CIFAR "
                            f"needs the same number in each of at least {first_classes} classes")
        if (classes - first_classes) % classes_per_increment:
            raise ConfigError(f"{classes} classes do not arrive in whole increments of {classes_per_increment} "
                              f"after the first {first_classes}")
        train_per_class = int(per_class[0]) - validation_per_class
        if train_per_class < 1:
            raise DataError(f"{int(per_class[0])} training images per class leave none to train on after "
                            f"{validation_per_class} for validation; lower validation_per_class")
        if (first_classes * train_per_class) % batch_size or (classes_per_increment * train_per_class) % batch_size:
            raise ConfigError(f"batch_size {batch_size} must divide the {train_per_class} training images per class "
                              f"times {first_classes} and times {classes_per_increment}, so that epochs are whole batches")
        self.classes, self.first_classes, self.classes_per_increment = classes, first_classes, classes_per_increment
        self.tasks = 1 + (classes - first_classes) // classes_per_increment
        self.epochs_per_increment, self.batch_size = epochs_per_increment, batch_size
        self.augmentation, self.early_stopping, self.probe_size = augmentation, early_stopping, probe_size
        self.train_per_class = train_per_class
        self.lr_milestones = tuple(round(m * epochs_per_increment) for m in lr_milestones)
        self.lr_decay = lr_decay
        order = torch.randperm(classes, generator=torch.Generator().manual_seed(derive_seed(self.seeds[0], _CLASS_ORDER)))
        self.class_order = order
        rank = torch.empty_like(order)
        rank[order] = torch.arange(classes)
        # images by rank of class, then by position in the file: [rank, index within the class]
        by_class = torch.argsort(labels, stable=True).reshape(classes, -1)[order]
        self._validation = by_class[:, :validation_per_class].contiguous()
        self._train = by_class[:, validation_per_class:].contiguous()
        test_by_class = torch.argsort(test_labels, stable=True)
        test_counts = torch.bincount(test_labels, minlength=classes)
        if test_labels.numel() == 0 or bool((test_counts != test_counts[0]).any()):
            raise DataError(f"the test set has {test_counts.tolist()} images per class; it needs the same number in each")
        self._test = test_by_class.reshape(classes, -1)[order].contiguous()
        self.images, self.test_images = images.to(self.device), test_images.to(self.device)
        self.rank = rank.to(self.device)
        self._labels, self._test_labels = labels.to(self.device), test_labels.to(self.device)
        mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)
        self._scale, self._shift = 1 / (255 * std), mean / std
        self.random = MemberRandom.derived(self.seeds, _AUGMENT, device=self.device)
        self.steps_per_task = None  # tasks grow: task_start(k) gives where each begins

    # -- the schedule ----------------------------------------------------------------------------
    def active_outputs(self, task: int) -> int:
        """Classes seen in ``task`` (the outputs in use)."""
        return self.first_classes + min(task, self.tasks - 1) * self.classes_per_increment

    def steps_per_epoch(self, task: int) -> int:
        return self.active_outputs(task) * self.train_per_class // self.batch_size

    def task_start(self, task: int) -> int:
        """The step at which ``task`` begins: the sum of the earlier tasks' lengths."""
        first = self.first_classes * self.train_per_class // self.batch_size
        per_increment = self.classes_per_increment * self.train_per_class // self.batch_size
        # sum over k < task of epochs * (first + k * per_increment)
        return self.epochs_per_increment * (task * first + per_increment * task * (task - 1) // 2)

    @property
    def total_steps(self) -> int:
        return self.task_start(self.tasks)

    def task_of(self, step: int) -> int:
        task = 0
        while task + 1 < self.tasks and self.task_start(task + 1) <= step:
            task += 1
        return task

    def next_evaluation(self, step: int) -> int:
        """The first step after ``step`` that ends an epoch (where the held-out sets are evaluated)."""
        task = self.task_of(step)
        start, epoch = self.task_start(task), self.steps_per_epoch(task)
        return start + ((step - start) // epoch + 1) * epoch

    def learning_rate_factor(self, step: int) -> float:
        """The authors' schedule within each task: the base learning rate for the first 60 of 200 epochs, then
        times 0.2 at epochs 60, 120 and 160 (``lr_milestones`` as fractions of the task's epochs)."""
        task = self.task_of(step)
        epoch = (step - self.task_start(task)) // self.steps_per_epoch(task)
        return self.lr_decay ** sum(epoch >= milestone for milestone in self.lr_milestones)

    # -- data -------------------------------------------------------------------------------------
    def _normalised(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mul_(self._scale).sub_(self._shift)

    def _held_out(self, rows: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, task: int) -> Batch:
        index = rows[: self.active_outputs(task)].reshape(-1).to(self.device)
        return self._normalised(images[index])[None], self.rank[labels[index]][None]

    evaluation_names = ("test", "validation")

    def evaluation_sets(self, task: int) -> dict[str, Batch]:
        """The test and validation images of the classes seen in ``task``, (1, N, 3, 32, 32), labels (1, N)."""
        return {"test": self._held_out(self._test, self.test_images, self._test_labels, task),
                "validation": self._held_out(self._validation, self.images, self._labels, task)}

    def order(self, task: int, epoch: int) -> torch.Tensor:
        """The training images of ``task``'s classes in the order ``epoch`` shows them (indices into the file)."""
        rows = self._train[: self.active_outputs(task)].reshape(-1)
        generator = torch.Generator().manual_seed(derive_seed(self.seeds[0], _ORDER, task, epoch))
        return rows[torch.randperm(rows.numel(), generator=generator)].to(self.device)

    def probe_batch(self, task: int) -> Batch:
        """The first ``probe_size`` images of the task's first epoch, unaugmented."""
        index = self.order(task, 0)[: self.probe_size]
        return self._normalised(self.images[index])[None], self.rank[self._labels[index]][None]

    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        task = self.task_of(start_step)
        if start_step >= self.total_steps:
            raise ConfigError(f"class-incremental CIFAR has {self.total_steps} steps; step {start_step} is past its end")
        offset = start_step - self.task_start(task)
        size = self.batch_size
        while task < self.tasks:
            per_epoch = self.steps_per_epoch(task)
            for epoch in range(offset // per_epoch, self.epochs_per_increment):
                order = self.order(task, epoch)
                step = self.task_start(task) + epoch * per_epoch
                for i in range((offset % per_epoch if epoch == offset // per_epoch else 0), per_epoch):
                    index = order[i * size : (i + 1) * size]
                    x = self._normalised(self.images[index])
                    if self.augmentation:
                        x = augment(x, self.random.uniform((size, 4), step=step + i)[0])
                    yield x[None], self.rank[self._labels[index]][None], task
            task, offset = task + 1, 0
