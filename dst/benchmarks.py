"""Continual benchmarks, registered by name like strategies.

A benchmark bundles a stream, a learner network, an optimizer and a loss, with defaults from the
literature in a frozen config. ``python -m dst run --benchmark NAME --bench key=value`` overrides them,
validated exactly like strategy settings. Third-party benchmarks register through the entry-point
group ``dst.benchmarks``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .config import Config, setting
from .errors import ConfigError
from .init import INIT_SCHEMES
from .masked import sparsify
from .nets import ACTIVATION_MODULES, NORMS, mlp
from .optim import OPTIMIZERS, build_optimizer
from .population import check_seeds, cross_entropy_per_member, mse_per_member
from .registry import Registry
from .sparsity import DISTRIBUTIONS
from .backends import BACKENDS
from .streams import BitFlippingStream, Stream
from .streams.base import derive_seed

if TYPE_CHECKING:
    from .probe import Probe

__all__ = [
    "Benchmark",
    "BenchmarkConfig",
    "BitFlipping",
    "BitFlippingConfig",
    "ClassIncrementalCIFAR",
    "ClassIncrementalCIFARConfig",
    "ContinualImageNet",
    "ContinualImageNetConfig",
    "SlipperyAntBenchmark",
    "SlipperyAntConfig",
    "MNISTConfig",
    "PermutedMNIST",
    "PermutedMNISTConfig",
    "RandomLabelMNIST",
    "RandomLabelMNISTConfig",
    "register",
    "available",
    "get",
    "build",
    "registry",
]

registry: Registry = Registry("benchmark", "dst.benchmarks")
register = registry.register
available = registry.available
get = registry.get

_MODEL, _MASK = 11, 12  # seed-derivation keys


def _generators(generators: list[torch.Generator]) -> dict[str, Any]:
    """``mlp`` arguments: a plain model for one member (a population of one at the cost of a plain torch
    model), population layers for several. Member s is the same learner either way."""
    return {"generator": generators[0]} if len(generators) == 1 else {"generators": generators}


@dataclass(frozen=True)
class BenchmarkConfig(Config):
    """Settings every benchmark has: the optimizer, the sparsity of the learner, the logging bin."""

    optimizer: str = setting("sgd", choices=OPTIMIZERS, help="sgd, adam, adamw or elementwise-adam")
    lr: float = setting(0.01, low=0.0, low_open=True, search=(1e-4, 1e-1), log=True, help="step size")
    momentum: float = setting(0.0, low=0.0, high=1.0, high_open=True, help="SGD momentum")
    weight_decay: float = setting(0.0, low=0.0, help="L2 penalty (decoupled for adamw)")
    betas: tuple[float, ...] = setting((0.9, 0.999), low=0.0, high=1.0, high_open=True, help="Adam betas")
    density: float = setting(
        1.0, low=0.0, high=1.0, low_open=True, search=(0.05, 1.0), help="global weight density (1 = dense)"
    )
    distribution: str = setting("erk", choices=DISTRIBUTIONS, help="layer-density distribution")
    backend: str = setting(
        "auto", choices=BACKENDS, help="how sparse linear layers compute: masked (reference), condensed, csr, auto"
    )
    dense_first: bool = setting(False, help="keep the first layer dense")
    dense_last: bool = setting(False, help="keep the last layer dense")
    batch_size: int = setting(1, low=1, help="examples per step")
    bin_size: int = setting(1000, low=0, help="steps per metrics row (0: one row per task)")
    probe: bool = setting(True, help="plasticity metrics at every task start (dst.probe)")
    probe_every: int = setting(0, low=0, help="also probe every N steps (0: only at task starts)")
    probe_size: int = setting(2000, low=1, help="probe examples: the first ones of each task")

    def validate(self) -> None:
        if len(self.betas) != 2:
            raise ConfigError(f"{self.owner}: betas takes two values, got {self.betas}")


class Benchmark(ABC):
    """A continual problem with its learner. Subclasses say how to build the stream and the net."""

    name: ClassVar[str] = "benchmark"
    Config: ClassVar[type[BenchmarkConfig]] = BenchmarkConfig
    #: "regression" (MSE, no accuracy) or "classification" (cross-entropy, online accuracy).
    task_type: ClassVar[str] = "regression"

    #: Named override sets, e.g. the published scale: ``--bench preset=paper``.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: Whether several members train in one batched pass (population layers); else one member per run.
    batchable: ClassVar[bool] = True

    def __init__(self, config: BenchmarkConfig | None = None) -> None:
        self.config = config if config is not None else type(self).Config()

    def default_steps(self, stream: Stream) -> int:
        """Run length when none is given: ``tasks`` whole tasks where the config has them."""
        tasks = getattr(self.config, "tasks", None)
        if tasks is not None and stream.steps_per_task:
            return tasks * stream.steps_per_task
        return 100_000

    def bin_steps(self, stream: Stream) -> int:
        """Steps per metrics row: ``bin_size``, or one task when it is 0."""
        if self.config.bin_size:
            return self.config.bin_size
        if not stream.steps_per_task:
            raise ConfigError(f"{self.config.owner}: bin_size=0 (one row per task) needs tasks of fixed length")
        return stream.steps_per_task

    @abstractmethod
    def make_stream(self, seeds: tuple[int, ...], device: torch.device) -> Stream:
        """The stream of member-first ``(x, y, task)`` batches, one member per seed."""

    @abstractmethod
    def make_model(self, generators: list[torch.Generator]) -> nn.Module:
        """The dense learner, one member per generator (member s initialised from ``generators[s]``)."""

    @property
    def loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``loss_fn(output, target)`` -> one loss per member, shape (S,)."""
        return cross_entropy_per_member if self.task_type == "classification" else mse_per_member

    def make_experiment(self, stream: Stream, model: nn.Module, optimizer: torch.optim.Optimizer,
                        strategy: Any, **loop: Any) -> Any:
        """The training loop for these parts: :class:`dst.experiment.Experiment`, which a benchmark with
        another loop (PPO's) replaces; ``loop`` holds the run's steps, bins, files and callbacks."""
        from .experiment import Experiment

        return Experiment(stream, model, optimizer, strategy, loss_fn=self.loss_fn, task_type=self.task_type,
                          backend=self.config.backend, **loop)

    def make_probe(self) -> "Probe | None":
        from .probe import Probe

        return Probe(every=self.config.probe_every) if self.config.probe else None

    def make_optimizer(self, model: nn.Module, lr: float | Sequence[float] | None = None) -> torch.optim.Optimizer:
        """The benchmark's optimizer; ``lr`` (one per member, or one for all) overrides the config's."""
        c = self.config
        kwargs: dict[str, Any] = dict(weight_decay=c.weight_decay)
        if c.optimizer == "sgd":
            kwargs["momentum"] = c.momentum
        else:
            kwargs["betas"] = tuple(c.betas)
        return build_optimizer(c.optimizer, model.parameters(), c.lr if lr is None else lr, **kwargs)

    def build(
        self,
        seeds: int | Sequence[int],
        device: torch.device | str,
        lr: float | Sequence[float] | None = None,
    ) -> tuple[Stream, nn.Module, torch.optim.Optimizer]:
        """Stream, (sparsified) learner on ``device`` and its optimizer for one member per seed: member s is
        determined by ``seeds[s]`` alone, exactly as the population of that one seed."""
        seeds = check_seeds(seeds)
        if len(seeds) > 1 and not self.batchable:
            raise ConfigError(
                f"{self.config.owner} trains one member at a time (its net is not batched over members); "
                f"run its {len(seeds)} seeds as separate runs (--seed N), e.g. with python -m comparisons"
            )
        device = torch.device(device)
        model = self.make_model([torch.Generator().manual_seed(derive_seed(seed, _MODEL)) for seed in seeds])
        c = self.config
        sparsify(
            model,
            c.density,
            c.distribution,
            dense_first=c.dense_first,
            dense_last=c.dense_last,
            seed=[derive_seed(seed, _MASK) for seed in seeds],
        )
        model.to(device)
        return self.make_stream(seeds, device), model, self.make_optimizer(model, lr)


def build(name: str, **overrides: Any) -> Benchmark:
    """A registered benchmark with its settings overridden (validated).

    ``preset=NAME`` first applies one of the benchmark's named presets (``Benchmark.presets``); the
    other overrides apply on top of it.
    """
    entry = registry.get(name)
    preset = overrides.pop("preset", None)
    if preset is not None:
        presets = getattr(entry.cls, "presets", {})
        if preset not in presets:
            raise ConfigError(
                f"benchmark {name!r} has no preset {preset!r}; presets: {', '.join(presets) or '(none)'}"
            )
        overrides = {**presets[preset], **overrides}
    return entry.cls(entry.config.from_dict(overrides))


@dataclass(frozen=True)
class BitFlippingConfig(BenchmarkConfig):
    """Slowly-changing regression (Dohare et al. 2024): defaults are the paper's."""

    lr: float = setting(0.01, low=0.0, low_open=True, search=(1e-4, 1e-1), log=True, help="step size")
    bin_size: int = setting(20_000, low=0, help="steps per metrics row (the paper's error bins; 0: per task)")
    n_bits: int = setting(20, low=1, help="input bits m")
    n_flipping: int = setting(15, low=0, help="bits held fixed within a task")
    change_every: int = setting(10_000, low=1, help="examples between changes of the flipping bits")
    flip: str = setting("one", choices=("one", "all"), help="flip one bit (paper) or re-draw all (released code)")
    target_hidden: int = setting(100, low=1, help="LTU units of the target network")
    beta: float = setting(0.7, low=0.0, high=1.0, help="LTU threshold parameter")
    hidden: tuple[int, ...] = setting((5,), low=1, help="learner hidden widths, e.g. 5 or 100,100")
    activation: str = setting("relu", choices=tuple(ACTIVATION_MODULES), help="learner activation")
    init: str = setting("kaiming", choices=INIT_SCHEMES, help="learner weight initialisation")
    norm: str = setting("none", choices=NORMS, help="layer: LayerNorm over each hidden layer's units")

    def validate(self) -> None:
        super().validate()
        if self.n_flipping > self.n_bits:
            raise ConfigError(f"{self.owner}: n_flipping ({self.n_flipping}) exceeds n_bits ({self.n_bits})")
        if self.change_every % self.batch_size:
            raise ConfigError(
                f"{self.owner}: change_every ({self.change_every}) must be a multiple of "
                f"batch_size ({self.batch_size})"
            )


@register("bit-flipping")
class BitFlipping(Benchmark):
    """Slowly-changing regression: 20 bits, 15 of them change every 10,000 examples; LTU target net."""

    Config = BitFlippingConfig
    task_type = "regression"

    def make_stream(self, seeds: tuple[int, ...], device: torch.device) -> Stream:
        c = self.config
        return BitFlippingStream(
            seeds,
            n_bits=c.n_bits,
            n_flipping=c.n_flipping,
            change_every=c.change_every,
            flip=c.flip,
            target_hidden=c.target_hidden,
            beta=c.beta,
            batch_size=c.batch_size,
            probe_size=c.probe_size,
            device=device,
        )

    def make_model(self, generators: list[torch.Generator]) -> nn.Module:
        c = self.config
        return mlp(c.n_bits, c.hidden, 1, c.activation, init=c.init, norm=c.norm, **_generators(generators))


# -- MNIST benchmarks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MNISTConfig(BenchmarkConfig):
    """Settings shared by the MNIST benchmarks."""

    data_dir: str = setting("", help="MNIST directory ('' : DST_DATA_DIR, then the default cache)")
    tasks: int = setting(100, low=1, help="tasks in a run when --steps is not given")
    hidden: tuple[int, ...] = setting((100, 100, 100), low=1, help="learner hidden widths")
    activation: str = setting("relu", choices=tuple(ACTIVATION_MODULES), help="learner activation")
    init: str = setting("kaiming", choices=INIT_SCHEMES, help="learner weight initialisation")
    norm: str = setting("none", choices=NORMS, help="layer: LayerNorm over each hidden layer's units")
    bin_size: int = setting(0, low=0, help="steps per metrics row (0: one row per task)")


class MNISTBenchmark(Benchmark):
    """Shared parts: MNIST loading, the MLP learner, cross-entropy, task-sized bins."""

    Config = MNISTConfig
    task_type = "classification"

    def _data(self) -> tuple[torch.Tensor, torch.Tensor]:
        from .streams.mnist import load_mnist

        return load_mnist(self.config.data_dir or None, train=True)

    def make_model(self, generators: list[torch.Generator]) -> nn.Module:
        c = self.config
        return mlp(784, c.hidden, 10, c.activation, init=c.init, norm=c.norm, **_generators(generators))


@dataclass(frozen=True)
class PermutedMNISTConfig(MNISTConfig):
    """Online permuted MNIST; the defaults are a small net, the ``paper`` preset the published scale."""

    lr: float = setting(0.003, low=0.0, low_open=True, search=(1e-4, 1e-1), log=True, help="step size")
    examples_per_task: int = setting(60_000, low=1, high=60_000, help="images shown per task (one pass)")


@register("permuted-mnist")
class PermutedMNIST(MNISTBenchmark):
    """Online permuted MNIST: each task a fixed pixel permutation of the 60,000 images, shown once."""

    Config = PermutedMNISTConfig
    presets = {
        "paper": dict(tasks=800, examples_per_task=60_000, batch_size=1, hidden=(2000, 2000, 2000), lr=0.003),
        # Found by experiment (docs/results.md): on 2 CPU cores a 100-100-100 net with mini-batches of 16
        # and a 10x larger step than the paper's runs 100 full tasks in minutes, and backprop's online
        # accuracy falls from ~0.93 (tasks 5-15) to ~0.89 (tasks 90-100) while its dead units rise to ~30%.
        "cpu": dict(tasks=100, examples_per_task=60_000, batch_size=16, hidden=(100, 100, 100), lr=0.03),
    }

    def make_stream(self, seeds: tuple[int, ...], device: torch.device) -> Stream:
        from .streams.mnist_tasks import PermutedMNISTStream

        c = self.config
        images, labels = self._data()
        return PermutedMNISTStream(images, labels, seeds, examples_per_task=c.examples_per_task,
                                   batch_size=c.batch_size, probe_size=c.probe_size, device=device)


@dataclass(frozen=True)
class RandomLabelMNISTConfig(MNISTConfig):
    """Random-label MNIST (Kumar et al. 2023): 1200 images, labels re-drawn per task, batch 16."""

    lr: float = setting(0.01, low=0.0, low_open=True, search=(1e-4, 1e-1), log=True, help="step size")
    batch_size: int = setting(16, low=1, help="examples per step")
    subset: int = setting(1200, low=1, high=60_000, help="images in the fixed subset")
    epochs: int = setting(10, low=1, help="passes over the subset per task")


@register("random-label-mnist")
class RandomLabelMNIST(MNISTBenchmark):
    """Random-label MNIST: a fixed 1200-image subset whose labels are re-drawn for every task."""

    Config = RandomLabelMNISTConfig

    def make_stream(self, seeds: tuple[int, ...], device: torch.device) -> Stream:
        from .streams.mnist_tasks import RandomLabelMNISTStream

        c = self.config
        images, labels = self._data()
        return RandomLabelMNISTStream(images, labels, seeds, subset=c.subset, epochs=c.epochs,
                                      batch_size=c.batch_size, probe_size=c.probe_size, device=device)


# the image benchmarks (conv nets, data the user supplies) register themselves on import
from .image_benchmarks import (  # noqa: E402
    ClassIncrementalCIFAR,
    ClassIncrementalCIFARConfig,
    ContinualImageNet,
    ContinualImageNetConfig,
)
from .rl.benchmark import SlipperyAntBenchmark, SlipperyAntConfig  # noqa: E402  (needs the rl extra only to run)
