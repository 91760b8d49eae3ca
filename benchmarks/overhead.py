"""Per-step cost of the framework and of CBP, measured in one process.

    python benchmarks/overhead.py                 # both measurements
    python benchmarks/overhead.py --only small    # 5-unit bit-flipping net
    python benchmarks/overhead.py --only wide     # 784-2000-2000-2000-10 net, batch 1
    python benchmarks/overhead.py --only fidelity # magnitude_every=100 against exact utilities, same net
    python benchmarks/overhead.py --only refresh  # SET/RigL update cost at density 0.1, delta T = 100

Every net is a population of one built from population layers (``dst.nets.mlp(..., generators=[g])``,
what ``Benchmark.build`` gives a single run), fed member-first batches (1, batch, features).

small: a minimal hand-written PyTorch loop, dst's Experiment with ``bp``, and with ``cbp``, on the same
pre-generated bit-flipping examples (SGD 0.01, batch 1): the benchmark's model and optimizer
(``dst.optim.SGD``) in each, the minimal loop feeding the model x of shape (1, 1, 20) with
``F.mse_loss``, the Experiment reading the same batches from a stream that replays them. Repetitions are
interleaved and the median per-step time of each is reported, with the ratios framework/minimal and cbp/bp.

wide: a training step of a 784-2000-2000-2000-10 ReLU net at batch 1 (``dst.optim.SGD`` 0.003, random
inputs), with ``bp`` and with ``cbp`` (adaptable contribution, rate 1e-4, maturity 100), interleaved; and
the cost of one bare read of every weight, the floor under any exact per-step utility.

fidelity: exact and ``magnitude_every=100`` utilities tracked side by side on one run of that net
(no replacements): relative difference, rank correlation and agreement of the lowest-utility units.
The default 1,099 steps end 99 steps after the last refresh of the amortised sums: the stalest point.

refresh: the same net at density 0.1 (ERK), batch 1. The mean time of a training step with ``bp``
(static sparse), and the time of one SET / RigL mask update; the update's cost amortised over
delta T = 100 steps is reported as a fraction of the training step.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

import dst
from dst.benchmarks import build as build_benchmark
from dst.experiment import Experiment
from dst.population import cross_entropy_per_member
from dst.streams import Stream

Batch = tuple[torch.Tensor, torch.Tensor, int]


class _Replay(Stream):
    """Pre-generated member-first batches served again, so that the Experiment's timed loop costs no data
    generation, like the minimal loop's."""

    def __init__(self, batches: list[Batch], steps_per_task: int) -> None:
        self._batches = batches
        self.steps_per_task = steps_per_task

    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        yield from self._batches[start_step:]


def _small(steps: int, repeats: int) -> None:
    benchmark = build_benchmark("bit-flipping", bin_size=steps, change_every=steps)
    times: dict[str, list[float]] = {"minimal": [], "dst bp": [], "dst cbp": []}
    for _ in range(repeats):
        for name in times:
            torch.manual_seed(0)
            stream, model, opt = benchmark.build(0, "cpu")  # a population of one
            examples = list(itertools.islice(stream.batches(), steps))  # x (1, 1, 20), y (1, 1, 1)
            if name == "minimal":
                start = time.perf_counter()
                for x, y, _ in examples:
                    loss = F.mse_loss(model(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                times[name].append((time.perf_counter() - start) / steps)
                continue
            strategy = dst.strategies.build(name.split()[1], model, opt, seed=0)
            experiment = Experiment(_Replay(examples, steps), model, opt, strategy, steps=steps,
                                    loss_fn=benchmark.loss_fn, bin_size=steps, progress=False)
            start = time.perf_counter()
            experiment.run()
            times[name].append((time.perf_counter() - start) / steps)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"bit-flipping 20-5-1, batch 1, {steps} steps x {repeats} interleaved repeats (median us/step)")
    for name, value in median.items():
        print(f"  {name:10s} {value * 1e6:8.1f}")
    print(f"  framework overhead (dst bp / minimal): {median['dst bp'] / median['minimal']:.3f}")
    print(f"  cbp / bp:                              {median['dst cbp'] / median['dst bp']:.3f}")


def _wide_net(density: float = 1.0):
    """784-2000-2000-2000-10 ReLU, a population of one (ERK-sparsified below density 1), and its SGD 0.003."""
    model = dst.nets.mlp(784, [2000, 2000, 2000], 10, generators=[torch.Generator().manual_seed(0)])
    dst.sparsify(model, density=density, distribution="erk", seed=0)
    return model, dst.optim.SGD(model.parameters(), lr=0.003)


def _wide_data(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs (steps, 1, 1, 784) and labels (steps, 1, 1): one member-first batch per step."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(steps, 1, 1, 784, generator=generator), torch.randint(0, 10, (steps, 1, 1), generator=generator)


def _train(model, opt, strategy, x, y, steps: int) -> float:
    """Seconds per step of the strategy protocol on a cross-entropy loss."""
    start = time.perf_counter()
    for i in range(steps):
        loss = cross_entropy_per_member(model(x[i]), y[i]).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        strategy.before_step()
        opt.step()
        strategy.after_step()
    return (time.perf_counter() - start) / steps


def _wide(steps: int, repeats: int) -> None:
    variants = {"bp": ("bp", {}), "cbp": ("cbp", {}), "cbp magnitude_every=100": ("cbp", {"magnitude_every": 100})}
    times: dict[str, list[float]] = {name: [] for name in variants}
    x, y = _wide_data(steps)
    for _ in range(repeats):
        for name in times:
            model, opt = _wide_net()
            strategy_name, settings = variants[name]
            strategy = dst.strategies.build(strategy_name, model, opt, seed=0, **settings)
            _train(model, opt, strategy, x, y, 5)  # warm-up
            times[name].append(_train(model, opt, strategy, x, y, steps))
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"784-2000-2000-2000-10, batch 1, {steps} steps x {repeats} interleaved repeats (median ms/step)")
    for name, value in median.items():
        print(f"  {name:24s} {value * 1e3:8.2f}   x{value / median['bp']:.3f} of bp")
    # The floor of any exact utility: every weight changes at every step and the utility depends on all
    # of them, so each step must at least read every weight matrix once. A bare sum (no |w|, one pass,
    # the fastest reduction there is) over all weights, as a fraction of the bp step:
    weights = [p.detach() for name, p in model.named_parameters() if name.endswith("weight")]
    reads = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            for weight in weights:
                weight.sum()
        reads.append((time.perf_counter() - start) / steps)
    read = statistics.median(reads)
    print(f"  one bare read of all {sum(w.numel() for w in weights) / 1e6:.1f}M weights: {read * 1e3:.2f} ms "
          f"= {read / median['bp'] * 100:.1f}% of a bp step (the least an exact per-step utility adds)")


def _fidelity(steps: int) -> None:
    """How far ``magnitude_every=100`` moves the utilities from the exact ones on one training run."""
    from scipy.stats import spearmanr

    model, opt = _wide_net()
    exact = dst.strategies.build("cbp", model, opt, replacement_rate=0.0, seed=0)
    amortised = dst.strategies.build("cbp", model, opt, replacement_rate=0.0, magnitude_every=100, seed=0)
    x, y = _wide_data(steps)
    print(f"784-2000-2000-2000-10, batch 1, SGD 0.003: corrected utilities after {steps} steps, "
          "magnitude_every=100 against exact")
    both = SimpleNamespace(before_step=lambda: None, after_step=lambda: (exact.after_step(), amortised.after_step()))
    _train(model, opt, both, x, y, steps)
    for index, (a, b) in enumerate(zip(exact.utilities, amortised.utilities)):
        (u,), (v,) = a.corrected_utility().numpy(), b.corrected_utility().numpy()  # the only member's (units,)
        relative = np.abs(v - u) / np.abs(u).clip(1e-12)
        low_u, low_v = np.argsort(u), np.argsort(v)
        overlap = len(set(low_u[:20]) & set(low_v[:20]))
        print(f"  layer {index}: relative difference median {np.median(relative):.2e}, max {relative.max():.2e}; "
              f"Spearman {spearmanr(u, v).statistic:.6f}; lowest unit same: {low_u[0] == low_v[0]}; "
              f"20 lowest shared: {overlap}/20")


def _refresh(steps: int, repeats: int) -> None:
    x, y = _wide_data(steps)
    model, opt = _wide_net(density=0.1)
    step_times = []
    strategies = {name: dst.strategies.build(name, model, opt, update_interval=10**9, schedule="constant", seed=0)
                  for name in ("set", "rigl")}
    bp = dst.strategies.build("bp", model, opt, seed=0)
    for _ in range(repeats):
        step_times.append(_train(model, opt, bp, x, y, steps))
    step = statistics.median(step_times)
    print(f"784-2000-2000-2000-10 at density 0.1 (ERK), batch 1: training step {step * 1e3:.2f} ms (median)")
    for name, strategy in strategies.items():
        fractions = np.full(strategy.members, 0.3)  # every member drops and regrows 30%
        update_times = []
        for _ in range(repeats):
            loss = cross_entropy_per_member(model(x[0]), y[0]).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if name == "rigl":  # keep the dense gradients (member-first), as before_step does on an update step
                strategy.dense_grads = [layer.weight.grad.detach().clone() for layer in strategy.masked]
            start = time.perf_counter()
            with torch.no_grad():
                for index, layer in enumerate(strategy.masked):
                    strategy.update_layer(index, layer, fractions)
            update_times.append(time.perf_counter() - start)
        update = statistics.median(update_times)
        print(f"  {name}: one update {update * 1e3:.1f} ms; amortised over 100 steps = "
              f"{update / 100 / step * 100:.2f}% of a training step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("small", "wide", "fidelity", "refresh"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--small-steps", type=int, default=20_000)
    parser.add_argument("--wide-steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fidelity-steps", type=int, default=1099)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    if args.only in (None, "small"):
        _small(args.small_steps, args.repeats)
    if args.only in (None, "wide"):
        _wide(args.wide_steps, args.repeats)
    if args.only in (None, "fidelity"):
        _fidelity(args.fidelity_steps)
    if args.only in (None, "refresh"):
        _refresh(args.wide_steps, args.repeats)


if __name__ == "__main__":
    main()
