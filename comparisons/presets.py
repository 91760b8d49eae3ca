"""Named comparisons: ``quick`` (minutes on a laptop), ``permuted-mnist-cpu`` and the published scales.

A preset is a function returning :class:`~comparisons.spec.Comparison` objects (``paper`` returns two,
one per benchmark, each written to ``OUT/<its name>/``). Arm templates carry a short name and the arm's
own settings; :func:`build_arms` turns them into labelled arms and applies the command line's
``--bench``/``--set``/``--grid`` on top.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from dst import benchmarks, strategies
from dst.errors import ConfigError

from .spec import (
    DEFAULT_SPARSE_DENSITY,
    Arm,
    Comparison,
    arm_label,
    expand_grid,
    needs_sparse,
    split_prefixed,
)

__all__ = ["PRESETS", "preset", "free_form", "build_arms", "describe_presets"]

log = logging.getLogger(__name__)

_SPARSE = {"density": 0.5, "distribution": "erk"}


def quick() -> list[Comparison]:
    """Bit-flipping, six arms x 3 seeds, under 2 minutes on 2 CPU cores: does a refresh keep plasticity?

    Dense arms ``bp``, ``cbp``, ``shrink-perturb`` and sparse arms (half the weights, ERK) ``set``, ``rigl``,
    ``cbp-rigl`` train a 20-50-1 ReLU net online for 12,000 steps. The paper's net has 5 hidden units and
    sees 1M examples; to make loss of plasticity show in 12k steps the stream changes 20x as often (every
    500 examples: 24 tasks), the step size is 3x the paper's (0.03), and the net is 50 wide so that half of
    it can be pruned and the unit metrics have units to count. One metrics row per task (``bin_size=500``)
    gives per-task error like the paper's bins; the probe (500 examples) runs at every task start, so the
    dead fraction and effective rank are tracked 24 times per run. At this length the late-window error
    is noisy across 3 seeds; the unit metrics (dead fraction, effective rank) carry the clearer signal.
    Measured: 1 min 35 s wall on 2 cores shared with other jobs (docs/comparisons.md).
    """
    bench = dict(hidden=(50,), lr=0.03, change_every=500, bin_size=500, probe_size=500, probe_every=0)
    arms = [
        Arm("bp", "bp", bench=bench),
        Arm("cbp", "cbp", bench=bench),
        Arm("shrink-perturb", "shrink-perturb", bench=bench),
        Arm("set", "set", bench={**bench, **_SPARSE}),
        Arm("rigl", "rigl", bench={**bench, **_SPARSE}),
        Arm("cbp-rigl", "cbp-rigl", bench={**bench, **_SPARSE}),
    ]
    return [Comparison("bit-flipping", tuple(arms), seeds=(0, 1, 2), steps=12_000, name="quick")]


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
    1e-4), and SET / RigL at 30% density (ERK), 3 seeds. The run length is the preset's. MNIST is read from
    ``--bench data_dir=...`` (on these machines ``../shared/data/mnist``), else ``$DST_DATA_DIR``."""
    arms = _mnist_arms({"preset": "cpu"}, density=0.3)
    return [Comparison("permuted-mnist", tuple(arms), seeds=(0, 1, 2), name="permuted-mnist-cpu")]


def paper_bit_flipping() -> list[Comparison]:
    """The published bit-flipping scale (Dohare et al. 2024): 20-5-1 net, 1M steps, a change every 10,000
    examples, bins of 20,000 steps; bp against cbp (replacement rate 1e-4, maturity threshold 100), 5 seeds.
    Hours per run on a CPU; use a machine with many cores (``--workers``)."""
    bench = dict(hidden=(5,))
    arms = [Arm("bp", "bp", bench=bench),
            Arm("cbp", "cbp", settings={"replacement_rate": 1e-4, "maturity_threshold": 100}, bench=bench)]
    return [Comparison("bit-flipping", tuple(arms), seeds=tuple(range(5)), steps=1_000_000,
                       name="paper-bit-flipping")]


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
    CBP on RigL; 5 seeds. About 30 runs of 5-10 minutes each on a CPU core."""
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
    return [Comparison("bit-flipping", tuple(arms), seeds=tuple(range(5)), steps=1_000_000,
                       name="sparse-bit-flipping")]


def paper() -> list[Comparison]:
    """Both published scales: ``paper-bit-flipping`` and ``paper-permuted-mnist`` (in OUT/<name>/)."""
    return paper_bit_flipping() + paper_permuted_mnist()


PRESETS: dict[str, Callable[[], list[Comparison]]] = {
    "quick": quick,
    "permuted-mnist-cpu": permuted_mnist_cpu,
    "sparse-bit-flipping": sparse_bit_flipping,
    "paper": paper,
    "paper-bit-flipping": paper_bit_flipping,
    "paper-permuted-mnist": paper_permuted_mnist,
}


def preset(name: str, *, bench: Sequence[str] = (), sets: Sequence[str] = (),
           grids: Sequence[str] = ()) -> list[Comparison]:
    """The comparisons of preset ``name`` with labelled arms and the ``--bench/--set/--grid`` overrides
    applied (see :func:`build_arms`); an unknown name is an error listing the presets."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return [replace(c, arms=build_arms(c.benchmark, c.arms, bench, sets, grids)) for c in PRESETS[name]()]


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
    arms = build_arms(benchmark, [Arm(name, name) for name in names], bench, sets, grids)
    return Comparison(benchmark, arms, tuple(seeds), steps)


def describe_presets() -> str:
    """One paragraph per preset: its docstring and its arms."""
    lines = []
    for name, make in PRESETS.items():
        doc = " ".join((make.__doc__ or "").split())
        lines.append(f"{name}: {doc}")
        try:
            comparisons = preset(name)
        except ConfigError:  # e.g. a benchmark preset that this dst does not know yet: show the templates
            comparisons = make()
        for comparison in comparisons:
            steps = comparison.steps if comparison.steps is not None else "the benchmark's default"
            arms = ", ".join(arm.label for arm in comparison.arms)
            lines.append(f"    {comparison.name}: {comparison.benchmark}, {len(comparison.seeds)} seeds, "
                         f"{steps} steps; arms: {arms}")
        lines.append("")
    return "\n".join(lines)


def _density(benchmark: str, bench: Mapping[str, Any]) -> float:
    return float(benchmarks.build(benchmark, **dict(bench)).config.density)


def build_arms(
    benchmark: str,
    templates: Sequence[Arm],
    bench: Sequence[str] = (),
    sets: Sequence[str] = (),
    grids: Sequence[str] = (),
) -> tuple[Arm, ...]:
    """Label the arm ``templates`` and apply ``--bench``, ``--set`` and ``--grid`` assignments.

    ``--bench key=value`` applies to every arm, ``--bench NAME.key=value`` / ``--set NAME.key=value`` /
    ``--grid NAME.key=v1,v2`` to the arms whose strategy or template name is NAME. A sparse-only strategy
    (SET, RigL, ...) given no density gets :data:`DEFAULT_SPARSE_DENSITY`; an explicit density 1 is an error
    (at validation).
    """
    allowed = list(dict.fromkeys([t.strategy for t in templates] + [t.label for t in templates]))
    shared_bench, arm_bench = split_prefixed(bench, "--bench", allowed)
    loose_sets, arm_sets = split_prefixed(sets, "--set", allowed)
    if loose_sets:
        key = next(iter(loose_sets))
        raise ConfigError(f"--set {key}={loose_sets[key]}: name the strategy, e.g. --set cbp.{key}=...")
    loose_grids, arm_grids = split_prefixed(grids, "--grid", allowed)
    if loose_grids:
        key = next(iter(loose_grids))
        raise ConfigError(f"--grid {key}={loose_grids[key]}: name the strategy, e.g. --grid cbp.{key}=1e-5,1e-4")
    arms: list[Arm] = []
    for template in templates:
        names = (template.strategy, template.label)
        arm_overrides = {k: v for n in dict.fromkeys(names) for k, v in arm_bench.get(n, {}).items()}
        merged = {**template.bench, **shared_bench, **arm_overrides}
        try:
            density = _density(benchmark, merged)
        except ConfigError as err:
            raise ConfigError(f"arm {template.label!r}: {err}") from None
        if density >= 1.0 and "density" not in merged and needs_sparse(template.strategy):
            log.info("%s needs a sparse net: density %g", template.strategy, DEFAULT_SPARSE_DENSITY)
            merged["density"] = density = DEFAULT_SPARSE_DENSITY
        settings = {**template.settings}
        grid: dict[str, str] = {}
        for name in dict.fromkeys(names):
            settings.update(arm_sets.get(name, {}))
            grid.update(arm_grids.get(name, {}))
        base = Arm(arm_label(template.strategy, density, name=template.label), template.strategy, settings, merged)
        arms.extend(expand_grid(base, grid, density, name=template.label))
    return tuple(arms)
