"""The image benchmarks: continual ImageNet-32 and class-incremental CIFAR-100, on conv nets.

Their data cannot be downloaded here; a user supplies it (``--bench data_dir=...`` or an environment
variable). Their conv nets are plain torch models, populations of one (``batchable = False``): each seed is
its own run, and ``python -m comparisons`` runs seeds in parallel processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .benchmarks import Benchmark, BenchmarkConfig, register
from .config import setting
from .errors import ConfigError, DataError
from .init import INIT_SCHEMES
from .nets import ACTIVATION_MODULES, NORMS, convnet
from .streams import Stream

__all__ = ["ClassIncrementalCIFAR", "ClassIncrementalCIFARConfig", "ContinualImageNet", "ContinualImageNetConfig"]


IMAGENET_DIR_ENV = "DST_IMAGENET_DIR"


@dataclass(frozen=True)
class ContinualImageNetConfig(BenchmarkConfig):
    """Continual ImageNet-32 (Dohare et al. 2024): the defaults are the paper's (5000 tasks, 250 epochs)."""

    data_dir: str = setting("", help=f"ImageNet-32 <class>.npy directory ('': ${IMAGENET_DIR_ENV})")
    tasks: int = setting(5000, low=1, help="tasks in a run when --steps is not given")
    epochs: int = setting(250, low=1, help="passes over the task's 1200 training images")
    batch_size: int = setting(100, low=1, help="examples per step (must divide 1200)")
    lr: float = setting(0.01, low=0.0, low_open=True, search=(1e-4, 1e-1), log=True, help="step size")
    momentum: float = setting(0.9, low=0.0, high=1.0, high_open=True, help="SGD momentum")
    bin_size: int = setting(0, low=0, help="steps per metrics row (0: one row per task)")
    # the probe's per-layer ranks flatten conv maps (1200 x 25088 for the first layer): its cost grows
    # with probe_size squared, about 2 s at 200 and 80 s at 1200 on two CPU cores, per task
    probe_size: int = setting(200, low=1, help="probe examples: the task's first training images (max 1200)")
    pixels: str = setting("unit", choices=("unit", "raw"), help="pixels /255 (unit) or 0-255 (released code)")
    channels: tuple[int, ...] = setting((32, 64, 128), low=1, help="conv channels (5x5, 3x3, 3x3 kernels)")
    kernel_sizes: tuple[int, ...] = setting((5, 3, 3), low=1, help="conv kernel sizes, one per channel entry")
    hidden: tuple[int, ...] = setting((128, 128), low=1, help="fully connected widths after the convs")
    activation: str = setting("relu", choices=tuple(ACTIVATION_MODULES), help="learner activation")
    init: str = setting("kaiming", choices=INIT_SCHEMES, help="learner weight initialisation")
    norm: str = setting("none", choices=NORMS, help="layer: LayerNorm over each hidden layer's units")

    def validate(self) -> None:
        super().validate()
        if 1200 % self.batch_size:
            raise ConfigError(f"{self.owner}: batch_size ({self.batch_size}) must divide the 1200 training images")
        if len(self.channels) != len(self.kernel_sizes):
            raise ConfigError(f"{self.owner}: channels and kernel_sizes need one entry each per conv layer")


@register("continual-imagenet")
class ContinualImageNet(Benchmark):
    """Continual ImageNet-32: binary tasks over class pairs, measured by each task's test accuracy.

    Task t trains ``epochs`` shuffled passes over 600 + 600 images of two classes, then the loop tests
    the model on their 100 + 100 held-out images (``test_accuracy``, one row per task). The learner is
    the reference's ConvNet: ``dst.nets.convnet(3, 32, 2)`` with its defaults, conv 32 (5x5), 64 (3x3),
    128 (3x3), each ReLU then 2x2 max-pooling, then 512 -> 128 -> 128 -> 2. SGD lr 0.01, momentum 0.9.
    Pixels are scaled to [0, 1] (``pixels=unit``); the released code feeds raw 0-255 values with
    PyTorch's default initialisation (``--bench preset=released``). The reference also resets the
    output layer at every task; here that is the ``head-reset`` strategy, not the default. Its CBP
    runs use replacement rate 3e-4. The data cannot be downloaded here: see ``dst.streams.imagenet32``.
    """

    Config = ContinualImageNetConfig
    task_type = "classification"
    batchable = False  # a plain ConvNet: a population of one (docs/architecture.md says why)
    presets = {
        "paper": dict(tasks=5000, epochs=250, batch_size=100, lr=0.01, momentum=0.9),
        "released": dict(pixels="raw", init="default"),
    }

    def data_dir(self) -> str:
        """``data_dir``, else ``$DST_IMAGENET_DIR``; a DataError saying how to supply it otherwise."""
        directory = self.config.data_dir or os.environ.get(IMAGENET_DIR_ENV, "")
        if not directory:
            raise DataError(
                "continual-imagenet needs the ImageNet-32 class files, which cannot be downloaded here. "
                "Get the continual-ImageNet archive linked from the loss-of-plasticity repository "
                "(lop/imagenet/README.md), extract it, and pass the folder holding 0.npy ... 999.npy "
                f"(or its parent with classes/) as --bench data_dir=DIR or in ${IMAGENET_DIR_ENV}."
            )
        return directory

    def make_stream(self, seeds: tuple[int, ...], device: torch.device) -> Stream:
        from .streams.imagenet_tasks import ContinualImageNetStream

        c = self.config
        return ContinualImageNetStream(
            self.data_dir(), seeds, epochs=c.epochs, batch_size=c.batch_size, probe_size=c.probe_size,
            pixel_scale=1 / 255 if c.pixels == "unit" else 1.0, device=device,
        )

    def make_model(self, generators: list[torch.Generator]) -> nn.Module:
        (generator,) = generators  # not batchable: one member
        c = self.config
        return convnet(3, 32, 2, c.channels, c.kernel_sizes, c.hidden, c.activation, init=c.init, generator=generator)


# -- class-incremental CIFAR-100 ------------------------------------------------------------------


@dataclass(frozen=True)
class ClassIncrementalCIFARConfig(BenchmarkConfig):
    """Class-incremental CIFAR-100 (Dohare et al. 2024): the defaults are the authors' protocol."""

    data_dir: str = setting("", help="folder of cifar-100-python/ ('': $DST_CIFAR100_DIR)")
    tasks: int = setting(20, low=1, high=20, help="increments to run when --steps is not given (20: all 100 classes)")
    first_classes: int = setting(5, low=1, high=100, help="classes of the first task")
    classes_per_increment: int = setting(5, low=1, high=100, help="classes added by each later task")
    epochs_per_increment: int = setting(200, low=1, help="epochs of each task")
    epochs: int = setting(4000, low=1, help="epochs in all (must be tasks x epochs_per_increment of the full run)")
    batch_size: int = setting(90, low=1, help="examples per step")
    validation_per_class: int = setting(50, low=1, help="training images per class held out for validation")
    augmentation: bool = setting(True, help="flip, reflect-padded crop and rotation of training images")
    early_stopping: bool = setting(True, help="each task goes on from its epoch of best validation accuracy")
    width: int = setting(64, low=1, help="ResNet-18 channels of the first stage (64: the paper's)")
    init: str = setting("kaiming", choices=INIT_SCHEMES, help="weight initialisation of the ResNet")
    optimizer: str = setting("sgd", choices=("sgd",), help="SGD (the authors')")
    lr: float = setting(0.1, low=0.0, low_open=True, search=(1e-3, 1.0), log=True, help="base step size")
    momentum: float = setting(0.9, low=0.0, high=1.0, high_open=True, help="SGD momentum")
    weight_decay: float = setting(5e-4, low=0.0, help="SGD weight decay")
    bin_size: int = setting(0, low=0, help="steps per metrics row (0: one row per epoch)")
    probe_size: int = setting(1000, low=1, help="probe examples: the first of each task's first epoch")

    def validate(self) -> None:
        super().validate()
        if self.epochs % self.epochs_per_increment:
            raise ConfigError(f"{self.owner}: epochs ({self.epochs}) must be a multiple of epochs_per_increment "
                              f"({self.epochs_per_increment}): every task has the same number of epochs")
        if (100 - self.first_classes) % self.classes_per_increment:
            raise ConfigError(f"{self.owner}: after the first {self.first_classes} classes the other "
                              f"{100 - self.first_classes} must come in whole increments of {self.classes_per_increment}")
        total = 1 + (100 - self.first_classes) // self.classes_per_increment
        if self.epochs // self.epochs_per_increment != total:
            raise ConfigError(f"{self.owner}: epochs ({self.epochs}) / epochs_per_increment ({self.epochs_per_increment}) "
                              f"must be the {total} increments that bring in all 100 classes")
        if self.tasks > total:
            raise ConfigError(f"{self.owner}: tasks ({self.tasks}) exceeds the {total} increments there are")


@register("class-incremental-cifar100")
class ClassIncrementalCIFAR(Benchmark):
    """Class-incremental CIFAR-100 on the authors' ResNet-18 (:mod:`dst.streams.incremental_cifar`,
    :class:`dst.resnet.ResNet18`): 5 classes, then 5 more every 200 epochs, 4,000 epochs; SGD 0.1 with
    momentum 0.9 and weight decay 5e-4, the authors' schedule within each increment, batches of 90; one
    row per epoch with the test and validation accuracy on the classes seen so far. The data cannot be
    downloaded here: see :mod:`dst.streams.cifar100`. The ``paper`` preset is the full protocol (for a GPU);
    ``smoke`` a width-4 net over 2 epochs per increment, for tests on small generated files."""

    Config = ClassIncrementalCIFARConfig
    task_type = "classification"
    batchable = False  # a ResNet-18: a population of one
    presets = {
        "paper": dict(tasks=20, epochs=4000, epochs_per_increment=200, batch_size=90, width=64),
        "smoke": dict(tasks=2, epochs=40, epochs_per_increment=2, batch_size=5, width=4, validation_per_class=1,
                      probe_size=20),
    }

    def make_stream(self, seeds: tuple[int, ...], device: torch.device) -> Stream:
        from .streams.cifar100 import load_cifar100
        from .streams.incremental_cifar import ClassIncrementalCIFARStream

        c = self.config
        directory = c.data_dir or None
        return ClassIncrementalCIFARStream(
            load_cifar100(directory), load_cifar100(directory, train=False), seeds,
            first_classes=c.first_classes, classes_per_increment=c.classes_per_increment,
            epochs_per_increment=c.epochs_per_increment, batch_size=c.batch_size,
            validation_per_class=c.validation_per_class, augmentation=c.augmentation,
            early_stopping=c.early_stopping, probe_size=c.probe_size, device=device,
        )

    def make_model(self, generators: list[torch.Generator]) -> nn.Module:
        from .resnet import ResNet18

        (generator,) = generators  # not batchable: one member
        return ResNet18(100, self.config.width, init=self.config.init, generator=generator)

    def default_steps(self, stream: Stream) -> int:
        return stream.task_start(self.config.tasks)  # type: ignore[attr-defined]

    def bin_steps(self, stream: Stream) -> int | None:
        return self.config.bin_size or None  # None: a row at every epoch's evaluation
