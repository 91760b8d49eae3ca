"""Named comparisons (``quick``: minutes on a laptop, ``permuted-mnist-cpu``, the published scales) and the
arms they make (:mod:`comparisons.arms` applies ``--bench``/``--set``/``--grid`` to them).

A preset is a function returning :class:`~comparisons.spec.Comparison` objects (``paper`` returns two,
one per benchmark, each written to ``OUT/<its name>/``). Arm templates carry a short name and the arm's
own settings; :func:`build_arms` applies the command line's ``--bench``/``--set``/``--grid`` on top and
expands grids. Nothing here builds a benchmark: :func:`comparisons.spec.resolve` does, once per arm.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from dst import benchmarks, strategies
from dst.errors import ConfigError

from .arms import build_arms
from .spec import Arm, Comparison, resolve

__all__ = ["PRESETS", "preset", "free_form", "build_arms", "describe_presets"]


def quick() -> list[Comparison]:
    """The paper's central claim on its own problem, in about 3 minutes on 2 CPU cores: bp and cbp, 30 seeds.

    Everything is the paper's bit-flipping setting (Dohare et al. 2024): a 20-5-1 ReLU learner, SGD 0.01,
    batch 1, one flipping bit changed every 10,000 examples, error bins of 20,000 examples, CBP with
    replacement rate 1e-4 and maturity threshold 100. Runs are 400,000 steps (40 tasks, of the paper's 1M),
    each arm's 30 seeds one population (one batched pass per arm, one arm per core). Measured (docs/results.md):
    backprop's error rises from the early to the late window with a 95% CI above 0, CBP's does not, CBP's
    late-window error is below backprop's with disjoint CIs, and backprop's units die (dead fraction ~0.6
    against ~0.07) while its effective rank collapses (~1.5 against ~3.7).
    """
    bench = dict(hidden=(5,), bin_size=20_000)
    arms = [
        Arm("bp", "bp", bench=bench),
        Arm("cbp", "cbp", settings={"replacement_rate": 1e-4, "maturity_threshold": 100}, bench=bench),
    ]
    return [Comparison("bit-flipping", tuple(arms), seeds=tuple(range(30)), steps=400_000, name="quick")]


def _mnist_arms(bench: Mapping[str, Any], density: float) -> list[Arm]:
    sparse = {**bench, "density": density, "distribution": "erk"}
    return [
        Arm("bp", "bp", bench=bench),
        Arm("cbp", "cbp", bench=bench),
        Arm("shrink-perturb", "shrink-perturb", bench=bench),
        Arm("l2", "bp", bench={**bench, "weight_decay": 1e-4}),
        Arm("set", "set", bench=sparse),
        Arm("rigl", "rigl", bench=sparse),
    ]


def permuted_mnist_cpu() -> list[Comparison]:
    """Permuted MNIST at dst's ``cpu`` benchmark preset: bp, cbp, shrink-perturb, l2 (bp with weight decay
    1e-4), and SET / RigL at 30% density (ERK), 10 seeds, each arm's seeds one population. The run length
    is the preset's. MNIST is read from
    ``--bench data_dir=...`` (on these machines ``../shared/data/mnist``), else ``$DST_DATA_DIR``."""
    arms = _mnist_arms({"preset": "cpu"}, density=0.3)
    return [Comparison("permuted-mnist", tuple(arms), seeds=tuple(range(10)), name="permuted-mnist-cpu")]


def paper_bit_flipping() -> list[Comparison]:
    """The paper's bit-flipping protocol exactly (Dohare et al. 2024): 20-5-1 ReLU, SGD 0.01, batch 1, 1M
    steps, a flipped bit every 10,000 examples, bins of 20,000 steps, 100 seeds; bp, cbp (replacement rate
    1e-4, maturity threshold 100), shrink-perturb (weight decay 1e-4, noise 1e-5), l2 (bp with weight decay
    1e-4) and a linear learner (20-1, no hidden layer). Each arm's 100 seeds are one population: about
    15 minutes on 2 CPU cores (docs/results.md)."""
    bench = dict(hidden=(5,))
    arms = [Arm("bp", "bp", bench=bench),
            Arm("cbp", "cbp", settings={"replacement_rate": 1e-4, "maturity_threshold": 100}, bench=bench),
            Arm("shrink-perturb", "shrink-perturb", settings={"weight_decay": 1e-4, "noise_std": 1e-5}, bench=bench),
            Arm("l2", "bp", bench={**bench, "weight_decay": 1e-4}),
            Arm("linear", "bp", bench=dict(hidden=()))]  # last: the cheapest (arms start in this order)
    return [Comparison("bit-flipping", tuple(arms), seeds=tuple(range(100)), steps=1_000_000,
                       name="paper-bit-flipping")]


def paper_permuted_mnist_narrow() -> list[Comparison]:
    """The authors' narrow permuted-MNIST protocol: 784-100-100-100-10 ReLU, SGD 0.003, batch 1, 10,000
    images per task, 100 tasks (1M steps), one row per task; bp, cbp (replacement rate 1e-4, maturity
    100), l2 (weight decay 1e-4), shrink-perturb (1e-4, noise 1e-5), 10 seeds, each arm one population.
    MNIST is read from ``--bench data_dir=...``, else ``$DST_DATA_DIR``. Measured on 2 CPU cores: bp, cbp
    and l2 45-65 minutes each (one core per arm); shrink-perturb draws a counter-based normal for each of its
    10 x 99,400 weights at every step (31 ms per step), about 9 hours."""
    bench = dict(hidden=(100, 100, 100), lr=0.003, batch_size=1, examples_per_task=10_000, tasks=100)
    arms = [Arm("bp", "bp", bench=bench),
            Arm("cbp", "cbp", settings={"replacement_rate": 1e-4, "maturity_threshold": 100}, bench=bench),
            Arm("l2", "bp", bench={**bench, "weight_decay": 1e-4}),
            Arm("shrink-perturb", "shrink-perturb", settings={"weight_decay": 1e-4, "noise_std": 1e-5}, bench=bench)]
    return [Comparison("permuted-mnist", tuple(arms), seeds=tuple(range(10)), name="paper-permuted-mnist-narrow")]


def paper_permuted_mnist() -> list[Comparison]:
    """Permuted MNIST at the published scale (``--bench preset=paper``: 800 tasks x 60,000 images,
    784-2000-2000-2000-10), the arms of ``permuted-mnist-cpu`` with the sparse arms at 10% density, 5 seeds.
    For a GPU."""
    arms = _mnist_arms({"preset": "paper"}, density=0.1)
    return [Comparison("permuted-mnist", tuple(arms), seeds=tuple(range(5)), name="paper-permuted-mnist")]


def sparse_bit_flipping() -> list[Comparison]:
    """Can a refreshed sparse topology keep plasticity as well as CBP, at a fraction of the weights? The
    paper's bit-flipping stream (1M steps, a change every 10,000 examples, bins of 20,000) with a wider
    learner, 20-100-1: dense bp and cbp, and at 10% of the weights (ERK) static sparse (bp), SET, RigL and
    CBP on RigL; 10 seeds, each arm's seeds one population."""
    dense = dict(hidden=(100,))
    sparse = {**dense, "density": 0.1, "distribution": "erk"}
    arms = [
        Arm("bp", "bp", bench=dense),
        Arm("cbp", "cbp", bench=dense),
        Arm("static-sparse", "bp", bench=sparse),
        Arm("set", "set", bench=sparse),
        Arm("rigl", "rigl", bench=sparse),
        Arm("cbp-rigl", "cbp-rigl", bench=sparse),
    ]
    return [Comparison("bit-flipping", tuple(arms), seeds=tuple(range(10)), steps=1_000_000,
                       name="sparse-bit-flipping")]


CBP = {"replacement_rate": 1e-4, "maturity_threshold": 100}  # the paper's CBP settings


def _budget_arms(prefix: str, bench: Mapping[str, Any], width: int, hidden_layers: int,
                 widths: Sequence[int], erk_width: int | None, strategies_: Sequence[str]) -> list[Arm]:
    """Arms at one weight budget: dense bp and cbp at ``width``; constant fan-in at each of ``widths`` (x
    ``width``) with ``strategies_``; ERK at ``erk_width`` x with bp, cbp, rigl and cbp-rigl (SRigL needs
    constant fan-in). A sparse arm's density is the dense arm's weight count over its own."""
    n_in, n_out = bench["n_in"], bench["n_out"]
    shared = {key: value for key, value in bench.items() if key not in ("n_in", "n_out")}

    def weights(w: int) -> int:
        return n_in * w + (hidden_layers - 1) * w * w + w * n_out

    def arm(name: str, strategy: str, w: int, distribution: str | None = None) -> Arm:
        settings = CBP if "cbp" in strategy else {}
        sized = {**shared, "hidden": (w,) * hidden_layers}
        if distribution is not None:
            sized |= {"density": round(weights(width) / weights(w), 6), "distribution": distribution}
        return Arm(f"{prefix}-{name}", strategy, settings=settings, bench=sized)

    arms = [arm("dense-bp", "bp", width), arm("dense-cbp", "cbp", width)]
    for factor in widths:
        arms += [arm(f"fanin{factor}x-{s}", s, factor * width, "constant-fan-in") for s in strategies_]
    if erk_width is not None:
        arms += [arm(f"erk{erk_width}x-{s}", s, erk_width * width, "erk") for s in ("bp", "cbp", "rigl", "cbp-rigl")]
    return arms


def sparse_budget() -> list[Comparison]:
    """The seed question per weight budget: does a structured sparse topology keep plasticity as well as
    dense CBP with the same number of weights, and at what cost? Bit-flipping (the paper's stream, 1M steps,
    20 seeds) at three budgets, the paper's 20-5-1 learner's weights, 5x and 25x them: dense bp and cbp at
    the width the budget buys (5, 25, 125), and 2x, 5x and 10x wider nets with the same weights, constant
    fan-in, with bp (static), cbp, rigl, srigl and cbp-srigl, plus 5x with ERK (bp, cbp, rigl, cbp-rigl).
    Permuted MNIST (784-100x3-10's weights, SGD 0.003, batch 1, 30 tasks of 10,000 images, 5 seeds): dense
    bp and cbp; constant fan-in at 2x and 5x the width with bp, cbp, srigl and cbp-srigl. Several hours on
    2 CPU cores: ``--estimate`` measures each arm briefly and prints the expected time."""
    flipping = {"n_in": 20, "n_out": 1}
    budgets = []
    for index, width in enumerate((5, 25, 125)):
        budgets += _budget_arms(f"b{5 ** index}x", {**flipping}, width, 1, (2, 5, 10), 5,
                                ("bp", "cbp", "rigl", "srigl", "cbp-srigl"))
    mnist = {"n_in": 784, "n_out": 10, "lr": 0.003, "batch_size": 1, "examples_per_task": 10_000, "tasks": 30}
    mnist_arms = _budget_arms("mnist", mnist, 100, 3, (2, 5), None, ("bp", "cbp", "srigl", "cbp-srigl"))
    return [
        Comparison("bit-flipping", tuple(budgets), seeds=tuple(range(20)), steps=1_000_000, name="sparse-budget-bit-flipping"),
        Comparison("permuted-mnist", tuple(mnist_arms), seeds=tuple(range(5)), name="sparse-budget-permuted-mnist"),
    ]


#: the methods preset's arms: (label, strategy, settings, benchmark overrides), each at its paper defaults
_METHODS: tuple[tuple[str, str, dict[str, Any], dict[str, Any]], ...] = (
    ("bp", "bp", {}, {}),
    ("cbp", "cbp", CBP, {}),
    ("redo", "redo", {}, {}),
    ("regrama", "regrama", {}, {}),
    ("snr", "snr", {}, {}),
    ("shrink-perturb", "shrink-perturb", {}, {}),
    ("l2-init", "l2-init", {}, {}),
    ("upgd", "upgd", {}, {}),
    ("weight-clipping", "weight-clipping", {}, {}),
    ("parseval", "parseval", {}, {}),
    ("spectral-reg", "spectral-reg", {}, {}),
    ("hare-tortoise", "hare-tortoise", {}, {}),
    ("crelu", "bp", {}, {"activation": "crelu"}),
    ("layer-norm", "bp", {}, {"norm": "layer"}),
)


def methods() -> list[Comparison]:
    """Every plasticity method at its paper's (or released code's) defaults, on the two CPU protocols, 10 seeds
    per arm as one population: bit-flipping (the paper's 20-5-1 learner, SGD 0.01, batch 1, 1M steps) and
    permuted MNIST (784-100x3-10, SGD 0.003, batch 1, 30 tasks of 10,000 images). The architectures (CReLU,
    LayerNorm) are backprop on the changed net; plasticity injection injects halfway through the run. Several hours on 2 CPU cores (``--estimate``)."""
    def arms(bench: Mapping[str, Any], head_layers: int) -> tuple[Arm, ...]:
        injection = Arm("plasticity-injection", "plasticity-injection", bench=dict(bench),
                        settings={"head_layers": head_layers} if head_layers != 2 else {})
        return tuple(Arm(label, strategy, settings=settings, bench={**bench, **extra})
                     for label, strategy, settings, extra in _METHODS) + (injection,)

    mnist = {"lr": 0.003, "batch_size": 1, "examples_per_task": 10_000, "tasks": 30, "hidden": (100, 100, 100)}
    return [  # the 20-5-1 learner's head can only be its output layer; the MNIST net's is its last two layers
        Comparison("bit-flipping", arms({"hidden": (5,)}, 1), seeds=tuple(range(10)), steps=1_000_000,
                   name="methods-bit-flipping"),
        Comparison("permuted-mnist", arms(mnist, 2), seeds=tuple(range(10)), name="methods-permuted-mnist"),
    ]


def incremental_cifar() -> list[Comparison]:
    """Class-incremental CIFAR-100 as the authors ran it (``--bench preset=paper``: ResNet-18, 5 classes and 5
    more every 200 epochs, 4,000 epochs, SGD 0.1 with momentum 0.9 and weight decay 5e-4 in every arm), 5
    seeds: backprop; CBP at the paper's settings for it (replacement rate 1e-5, maturity 1,000, the
    contribution utility); shrink and perturb (the optimizer's weight decay, noise 1e-5 after every step, as the
    authors' code); the head reset at each increment; a fresh network at each increment. A GPU run: about
    6 GPU-hours per run on an A100 in the authors' setting (``--estimate``). The data cannot be downloaded here
    (``--bench data_dir=DIR`` or DST_CIFAR100_DIR); ``--bench preset=smoke`` runs it in seconds."""
    bench = {"preset": "paper"}
    arms = (
        Arm("bp", "bp", bench=bench),
        Arm("cbp", "cbp", settings={"replacement_rate": 1e-5, "maturity_threshold": 1000, "utility": "contribution"},
            bench=bench),
        Arm("shrink-perturb", "shrink-perturb", settings={"weight_decay": 0.0, "noise_std": 1e-5}, bench=bench),
        Arm("head-reset", "head-reset", bench=bench),
        Arm("retrain", "retrain", bench=bench),
    )
    return [Comparison("class-incremental-cifar100", arms, seeds=tuple(range(5)), name="incremental-cifar")]


#: the authors' Slippery Ant arms (``lop/rl/cfg/sant``): label, strategy, settings, benchmark overrides
_SLIPPERY_ANT = (
    ("std-ppo", "bp", {}, {}),
    ("ns-adam", "bp", {}, {"betas": (0.99, 0.99)}),
    ("l2", "bp", {}, {"betas": (0.99, 0.99), "weight_decay": 1e-3}),
    ("cbp", "cbp", {"replacement_rate": 1e-4, "maturity_threshold": 10_000, "utility": "contribution"},
     {"betas": (0.99, 0.99), "weight_decay": 1e-4}),
)


def _slippery_ant(preset: str, name: str) -> list[Comparison]:
    """The authors' four arms at the benchmark's ``preset``, 3 seeds."""
    arms = tuple(Arm(label, strategy, settings=settings, bench={"preset": preset, **bench})
                 for label, strategy, settings, bench in _SLIPPERY_ANT)
    return [Comparison("slippery-ant", arms, seeds=(0, 1, 2), name=name)]


def paper_slippery_ant() -> list[Comparison]:
    """PPO on Slippery Ant as the authors ran it (``--bench preset=paper``: 20M steps, friction changed every 2M
    at an episode end, drawn per seed log-uniformly from [0.02, 2]), 3 seeds: standard PPO (Adam 1e-4), NS Adam
    (betas 0.99, 0.99), L2 (NS Adam, weight decay 1e-3) and CBP (NS Adam, weight decay 1e-4, replacement rate
    1e-4, maturity 10,000, the contribution utility), the settings of their ``cfg/sant``. Days of CPU per run
    (the authors report about 24 CPU-hours per 50M steps); ``--estimate`` measures it here. Needs the rl extra."""
    return _slippery_ant("paper", "paper-slippery-ant")


def slippery_ant_cpu() -> list[Comparison]:
    """The four Slippery Ant arms of ``paper-slippery-ant`` at the benchmark's ``cpu`` preset (700,000 steps,
    friction changed every 100,000 at an episode end, 64-64 networks, Adam lr 3e-4), 3 seeds: about an hour on
    2 cores (``--workers 2``). Needs the rl extra."""
    return _slippery_ant("cpu", "slippery-ant-cpu")


def paper() -> list[Comparison]:
    """Both published scales: ``paper-bit-flipping`` and ``paper-permuted-mnist`` (in OUT/<name>/)."""
    return paper_bit_flipping() + paper_permuted_mnist()


PRESETS: dict[str, Callable[[], list[Comparison]]] = {
    "quick": quick,
    "permuted-mnist-cpu": permuted_mnist_cpu,
    "sparse-bit-flipping": sparse_bit_flipping,
    "sparse-budget": sparse_budget,
    "methods": methods,
    "incremental-cifar": incremental_cifar,
    "paper": paper,
    "paper-bit-flipping": paper_bit_flipping,
    "paper-permuted-mnist": paper_permuted_mnist,
    "paper-permuted-mnist-narrow": paper_permuted_mnist_narrow,
    "paper-slippery-ant": paper_slippery_ant,
    "slippery-ant-cpu": slippery_ant_cpu,
}


def preset(name: str, *, bench: Sequence[str] = (), sets: Sequence[str] = (),
           grids: Sequence[str] = ()) -> list[Comparison]:
    """The comparisons of preset ``name`` with the ``--bench/--set/--grid`` overrides applied (see
    :func:`build_arms`); an unknown name is an error listing the presets."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return [replace(c, arms=build_arms(c.arms, bench, sets, grids)) for c in PRESETS[name]()]


def free_form(benchmark: str, strategy_names: Sequence[str], *, seeds: Sequence[int] = (0, 1, 2),
              steps: int | None = None, bench: Sequence[str] = (), sets: Sequence[str] = (),
              grids: Sequence[str] = ()) -> Comparison:
    """A comparison of the named strategies on ``benchmark``, one arm each before grids expand them."""
    benchmarks.get(benchmark)
    names = list(dict.fromkeys(s.strip() for s in strategy_names if s.strip()))
    if not names:
        raise ConfigError("--strategies: name at least one strategy, e.g. --strategies bp,cbp")
    for name in names:
        strategies.get(name)  # unknown strategy -> ConfigError listing the available ones
    arms = build_arms([Arm(name, name) for name in names], bench, sets, grids)
    return Comparison(benchmark, arms, tuple(seeds), steps)


def describe_presets() -> str:
    """One paragraph per preset: its docstring and its arms (labelled when their settings resolve here)."""
    lines = []
    for name, make in PRESETS.items():
        doc = " ".join((make.__doc__ or "").split())
        lines.append(f"{name}: {doc}")
        for comparison in make():
            try:
                arms = ", ".join(arm.label for arm in resolve(comparison, check_runs=False))
            except ConfigError:  # e.g. a benchmark preset that this dst does not know yet: the names
                arms = ", ".join(arm.title for arm in comparison.arms)
            steps = comparison.steps if comparison.steps is not None else "the benchmark's default"
            lines.append(f"    {comparison.name}: {comparison.benchmark}, {len(comparison.seeds)} seeds, "
                         f"{steps} steps; arms: {arms}")
        lines.append("")
    return "\n".join(lines)
