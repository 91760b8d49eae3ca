"""Cost of a sparse training step on each backend, as ratios to plain dense SGD measured in one process.

    python benchmarks/sparse_speed.py                 # the full table (a few minutes)
    python benchmarks/sparse_speed.py --quick         # batch 1 at densities 0.1 and 0.05 only
    python benchmarks/sparse_speed.py --device cuda   # the same on a GPU

The learner is 784-2000-2000-2000-10 (ReLU, SGD 0.01, cross-entropy), a population of one, trained on
random MNIST-shaped examples through the framework's own step (``dst.step.TrainingStep``, the strategy's
``before_step`` / ``after_step``, the optimizer, and ``dst.backends.Backends`` switching layers), one
thread. Rows:

- ``dense``: no mask (plain dense SGD, the reference 1.00x);
- ``masked d``: static sparse training (bp) on the masked backend at density d (ERK, unstructured);
- ``condensed d``: the same with constant fan-in (ERK's layer densities) on the condensed backend;
- ``csr d``: the unstructured (ERK) net on the CSR backend;
- ``srigl masked 0.1`` / ``srigl condensed 0.1``: SRigL (update every 100 steps, drop fraction 0.3), over
  blocks of 200 steps, so each block holds two refreshes: its amortised cost;
- at batch 1, beside the peers (``benchmarks/peers.py``: rigl-torch's and sparsimony's RigL where they are
  installed, ``pip install --no-deps rigl-torch sparsimony``): ``torch dense``, plain PyTorch dense SGD
  (autograd, ``torch.optim.SGD``) and ``rigl masked 0.1``, dst's RigL (ERK, the same schedule), over
  blocks of 200 steps like SRigL.

Targets (issue #15): masked at 0.1 at most 1.10x dense; condensed at 0.1 at most 0.5x; SRigL's amortised
refresh at most 5% above static condensed; CSR at 0.05 at most 0.7x. The break-even density of a backend is where its ratio crosses
1.00 (interpolated in log density between the measured densities). Repetitions of all rows are
interleaved, and each row reports the median over repetitions of the CPU time per step
(``time.process_time``), which other processes on a shared machine disturb far less than wall time.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

import dst
from peers import PEERS, PeerLearner, available, seconds_per_step
from dst.backends import Backends
from dst.population import cross_entropy_per_member
from dst.step import TrainingStep

SHAPE = (784, [2000, 2000, 2000], 10)
DENSITIES = (0.5, 0.2, 0.1, 0.05, 0.02)


class Learner:
    """One configuration: model, optimizer, strategy, backends and a block of pre-drawn examples."""

    def __init__(self, density: float, backend: str, strategy: str, batch: int, device: str, steps: int) -> None:
        n_in, hidden, n_out = SHAPE
        self.model = dst.nets.mlp(n_in, hidden, n_out, generators=[torch.Generator().manual_seed(0)]).to(device)
        if density < 1:
            distribution = "constant-fan-in" if backend == "condensed" or strategy == "srigl" else "erk"
            dst.sparsify(self.model, density, distribution, seed=[1])
        self.optimizer = dst.build_optimizer("sgd", self.model.parameters(), 0.01)
        settings = {"update_interval": 100, "drop_fraction": 0.3} if strategy != "bp" else {}
        self.strategy = dst.strategies.build(strategy, self.model, self.optimizer, seed=[2], **settings)
        self.strategy.set_horizon(10_000_000, None)
        self.backends = Backends(self.model, self.optimizer, self.strategy, backend)
        self.step = TrainingStep(self.model, self.optimizer, cross_entropy_per_member, 1, torch.device(device))
        g = torch.Generator().manual_seed(3)
        self.x = torch.rand(steps, 1, batch, n_in, generator=g).to(device)
        self.y = torch.randint(0, n_out, (steps, 1, batch), generator=g).to(device)
        self.device = device

    def run(self) -> float:
        """CPU seconds per step over one block."""
        return seconds_per_step(self._block, len(self.x), self.device)

    def _block(self) -> None:
        for x, y in zip(self.x, self.y):
            if self.backends:
                self.backends.prepare(self.strategy.step + 1)
            self.step(x, y)
            self.strategy.before_step()
            self.optimizer.step()
            self.strategy.after_step()


def _break_even(ratios: dict[float, float]) -> str:
    """The density at which the ratio crosses 1, interpolated in log density."""
    points = sorted(ratios.items())
    for (d0, r0), (d1, r1) in zip(points, points[1:]):
        if (r0 - 1) * (r1 - 1) <= 0 and r0 != r1:
            t = (1 - r0) / (r1 - r0)
            return f"{math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0))):.2f}"
    if all(r < 1 for _, r in points):
        return f"> {points[-1][0]}"
    return f"< {points[0][0]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 at densities 0.1 and 0.05 only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    densities = (0.1, 0.05) if args.quick else DENSITIES
    batches = (1,) if args.quick else (1, 16)
    for batch in batches:
        steps = 20 if batch == 1 else 10
        rows: dict[str, Learner | PeerLearner] = {"dense": Learner(1.0, "masked", "bp", batch, args.device, steps)}
        for density in densities:
            rows[f"masked {density}"] = Learner(density, "masked", "bp", batch, args.device, steps)
            rows[f"condensed {density}"] = Learner(density, "condensed", "bp", batch, args.device, steps)
            rows[f"csr {density}"] = Learner(density, "csr", "bp", batch, args.device, steps)
        if batch == 1:
            rows["srigl masked 0.1"] = Learner(0.1, "masked", "srigl", batch, args.device, 200)
            rows["srigl condensed 0.1"] = Learner(0.1, "condensed", "srigl", batch, args.device, 200)
            rows["rigl masked 0.1"] = Learner(0.1, "masked", "rigl", batch, args.device, 200)
            rows["torch dense"] = PeerLearner(SHAPE, None, 1.0, batch, args.device, steps)
            for peer in PEERS:
                if available(peer) is None:
                    rows[f"{peer} 0.1"] = PeerLearner(SHAPE, peer, 0.1, batch, args.device, 200)
        for learner in rows.values():  # warm up: first conversions, allocator, caches
            learner.run()
        times: dict[str, list[float]] = {name: [] for name in rows}
        for _ in range(args.repeats):
            for name, learner in rows.items():
                times[name].append(learner.run())
        median = {name: statistics.median(values) for name, values in times.items()}
        dense = median["dense"]
        print(f"\n784-2000x3-10, batch {batch}, one thread, {args.device}: ms per step, ratio to plain dense SGD")
        print(f"{'':24} {'ms/step':>9} {'x dense':>8}")
        for name, value in median.items():
            print(f"{name:24} {value * 1e3:9.3f} {value / dense:8.2f}")
        for backend in ("masked", "condensed", "csr"):
            ratios = {d: median[f"{backend} {d}"] / dense for d in densities}
            if len(ratios) > 1:
                print(f"break-even density, {backend}: {_break_even(ratios)}")
        if batch == 1:
            static = median["condensed 0.1"]
            print(f"SRigL's amortised refresh on condensed at 0.1: {median['srigl condensed 0.1'] / static - 1:+.1%} "
                  f"over static condensed (target <= +5%); on masked {median['srigl masked 0.1'] / median['masked 0.1'] - 1:+.1%}")
            torch_dense = median["torch dense"]
            print(f"RigL at 0.1 against plain PyTorch dense SGD ({torch_dense * 1e3:.3f} ms/step): dst (masked, ERK) "
                  f"{median['rigl masked 0.1'] / torch_dense:.2f}x", end="")
            for peer in PEERS:
                missing = available(peer)
                print(f"; {peer} " + (f"{median[f'{peer} 0.1'] / torch_dense:.2f}x" if missing is None else missing),
                      end="")
            print()


if __name__ == "__main__":
    main()
