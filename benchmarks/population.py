"""Cost of populations per member-step, each comparison measured in one process.

    python benchmarks/population.py                      # every part below
    python benchmarks/population.py --only bit-flipping  # 20-5-1 CBP and bp at S = 1, 100, 1000
    python benchmarks/population.py --only mnist         # 784-100-100-100-10 at batch 1, S = 1 and 10
    python benchmarks/population.py --only baseline      # a population of one against the single-learner code
    python benchmarks/population.py --only memory        # peak memory: S=1000 bit-flipping, S=30 MNIST
    python benchmarks/population.py --only cuda          # S=10,000 bit-flipping on CUDA, when present

bit-flipping: the whole loop (the stream, the training step, CBP's refresh, binned metrics rows) of
``dst.runner.prepare`` on the paper's learner (20-5-1, SGD 0.01, batch 1; CBP with replacement rate
1e-4 and maturity 100), probe off, no output files. Repetitions are interleaved and the median is
reported per member-step, with the targets: S=100 at most 4 us for CBP (and at least 60x less than
S=1), S=1000 at most 1 us, bp at S=100 at most 2 us. Beside them, a hand-written numpy step of 30
CBP learners (forward, backward, SGD, the utility update; no replacement, which is rare), the floor of
per-operation overhead that a batched framework can approach.

mnist: online permuted MNIST on synthetic images of MNIST's shape (the cost does not depend on the
pixels), bp, batch 1: S=10 per member-step should cost at most 0.6x of S=1.

baseline: ``dst`` at commit ``--baseline`` (the last single-learner version), unpacked with ``git
archive`` and imported under other names, against a population of one today: bp and cbp on 20-5-1
and on 784-100x3-10, the training step of each fed the same pre-generated examples, interleaved.
The target is at most 1.10x.

memory: each configuration in a fresh process; its peak resident memory above the imports.

Times are CPU times of this process (``time.process_time``; everything runs on one thread), which
other processes on a shared machine disturb far less than wall time.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "447d772"  # the last commit before populations
ISSUE_FLOOR = 1.5  # us per learner-step of the hand-written numpy CBP step when the issue set its targets


def _prepare(benchmark: str, strategy: str, members: int, steps: int, device: str = "cpu", **bench):
    from dst.runner import RunSpec, prepare

    settings = {"replacement_rate": 1e-4, "maturity_threshold": 100} if strategy == "cbp" else {}
    spec = RunSpec(benchmark, strategy, steps=steps, seeds=tuple(range(members)), device=device,
                   bench={"probe": False, "bin_size": min(steps, 1000), **bench}, settings=settings)
    return prepare(spec, progress=False)


def _time_loop(benchmark: str, strategy: str, members: int, steps: int, device: str = "cpu") -> float:
    """Seconds per member-step of ``Experiment.run`` (construction excluded)."""
    experiment = _prepare(benchmark, strategy, members, steps, device)
    start = time.process_time()
    experiment.run()
    if experiment.stream.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.process_time() - start) / (steps * members)


def _numpy_cbp(members: int = 30, steps: int = 5000) -> float:
    """A hand-written numpy step of ``members`` stacked 20-5-1 CBP learners, per learner-step."""
    rng = np.random.default_rng(0)
    w1 = rng.uniform(-0.5, 0.5, (members, 5, 20)).astype(np.float32)
    b1 = np.zeros((members, 5), np.float32)
    w2 = rng.uniform(-0.5, 0.5, (members, 1, 5)).astype(np.float32)
    b2 = np.zeros((members, 1), np.float32)
    norm, mean_sum, utility_sum = (np.zeros((members, 5), np.float32) for _ in range(3))
    x = rng.integers(0, 2, (steps, members, 20)).astype(np.float32)
    y = rng.normal(size=(steps, members, 1)).astype(np.float32)
    lr, eta = 0.01, 0.99
    start = time.process_time()
    for t in range(steps):
        xt = x[t]
        pre = np.einsum("moi,mi->mo", w1, xt) + b1
        h = np.maximum(pre, 0)
        out = np.einsum("moi,mi->mo", w2, h) + b2
        grad_out = 2 * (out - y[t])
        grad_h = np.einsum("moi,mo->mi", w2, grad_out) * (pre > 0)
        w2 -= lr * grad_out[:, :, None] * h[:, None, :]
        b2 -= lr * grad_out
        w1 -= lr * grad_h[:, :, None] * xt[:, None, :]
        b1 -= lr * grad_h
        factor = np.abs(w2).mean(1) / np.abs(w1).mean(2)
        norm *= eta
        norm += 1
        mean_sum *= eta
        mean_sum += h
        utility_sum *= eta
        utility_sum += factor * np.abs(h - mean_sum / norm)
    return (time.process_time() - start) / (steps * members)


def _median(values: list[float]) -> float:
    return statistics.median(values)


def bit_flipping(repeats: int) -> None:
    # S > 1 runs one whole task (10,000 steps), so that each task's per-member set-up counts as in a long run
    configs = [("cbp", 1, 4000), ("cbp", 100, 10_000), ("cbp", 1000, 10_000), ("bp", 1, 4000), ("bp", 100, 10_000)]
    times: dict[tuple[str, int], list[float]] = {(s, m): [] for s, m, _ in configs}
    numpy_times: list[float] = []
    for _ in range(repeats):
        for strategy, members, steps in configs:
            times[(strategy, members)].append(_time_loop("bit-flipping", strategy, members, steps))
        numpy_times.append(_numpy_cbp())
    us = {key: _median(value) * 1e6 for key, value in times.items()}
    floor = _median(numpy_times) * 1e6
    print("bit-flipping 20-5-1, whole loop, us per member-step (median of", repeats, "interleaved repeats)")
    for (strategy, members), value in us.items():
        print(f"  {strategy:4s} S={members:5d}: {value:9.2f} us")
    print(f"  numpy hand-written CBP, 30 learners: {floor:.2f} us per learner-step")
    print(f"  cbp S=1 / S=100: {us[('cbp', 1)] / us[('cbp', 100)]:.0f}x (target >= 60x); "
          f"S=100 {us[('cbp', 100)]:.2f} us (target <= 4), S=1000 {us[('cbp', 1000)]:.2f} us (target <= 1), "
          f"bp S=100 {us[('bp', 100)]:.2f} us (target <= 2)")
    print(f"  cbp S=100 / numpy floor: {us[('cbp', 100)] / floor:.2f}x; S=1000 / floor: {us[('cbp', 1000)] / floor:.2f}x")
    # The machine's speed drifts by 2x from hour to hour; the issue's targets were set where the floor took
    # ISSUE_FLOOR us. The same figures at that speed:
    scale = ISSUE_FLOOR / floor
    print(f"  at the issue's machine speed (numpy floor {ISSUE_FLOOR} us): cbp S=100 {us[('cbp', 100)] * scale:.2f} us, "
          f"S=1000 {us[('cbp', 1000)] * scale:.2f} us, bp S=100 {us[('bp', 100)] * scale:.2f} us")


def _mnist_experiment(members: int, steps: int):
    from dst.benchmarks import build as build_benchmark
    from dst.experiment import Experiment
    from dst.streams.mnist_tasks import PermutedMNISTStream

    benchmark = build_benchmark("permuted-mnist", probe=False, batch_size=1, hidden=(100, 100, 100))
    images = torch.randint(0, 256, (60_000, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (60_000,), generator=torch.Generator().manual_seed(1))
    seeds = tuple(range(members))
    model = benchmark.make_model([torch.Generator().manual_seed(seed) for seed in seeds])
    optimizer = benchmark.make_optimizer(model)
    stream = PermutedMNISTStream(images, labels, seeds, examples_per_task=60_000)
    import dst

    strategy = dst.strategies.build("bp", model, optimizer, seed=list(seeds))
    return Experiment(stream, model, optimizer, strategy, steps=steps, loss_fn=benchmark.loss_fn,
                      task_type="classification", bin_size=1000, progress=False)


def mnist(repeats: int) -> None:
    times: dict[int, list[float]] = {1: [], 10: []}
    for _ in range(repeats):
        for members in times:
            experiment = _mnist_experiment(members, 2000)
            start = time.process_time()
            experiment.run()
            times[members].append((time.process_time() - start) / (2000 * members))
    one, ten = (_median(times[m]) * 1e6 for m in (1, 10))
    print("permuted MNIST 784-100-100-100-10, batch 1, bp, whole loop, us per member-step")
    print(f"  S=1: {one:.1f} us, S=10: {ten:.1f} us; S=10 / S=1 = {ten / one:.2f} (target <= 0.6)")


# -- a population of one against the single-learner code ------------------------------------------


def _unpack_baseline(ref: str, into: Path) -> None:
    """``dst`` and ``cbp`` at ``ref`` as packages ``dst_baseline`` and ``cbp_baseline``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "dst", "cbp"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    for old, new in (("dst", "dst_baseline"), ("cbp", "cbp_baseline")):
        (into / old).rename(into / new)
    for path in into.rglob("*.py"):
        text = path.read_text()
        for old, new in (("from dst", "from dst_baseline"), ("import dst", "import dst_baseline"),
                         ("from cbp", "from cbp_baseline")):
            text = text.replace(old, new)
        path.write_text(text)


def _step_loop(train_step, optimizer, strategy, xs, ys) -> float:
    """Seconds per step of ``train_step(x, y)`` (forward, loss and gradients), before_step, optimizer step
    and after_step."""
    start = time.process_time()
    for x, y in zip(xs, ys):
        train_step(x, y)
        strategy.before_step()
        optimizer.step()
        strategy.after_step()
    return (time.process_time() - start) / len(xs)


def _autograd_step(model, optimizer, loss_fn):
    """The single-learner code's step: forward, loss, zero_grad, backward."""
    def step(x, y):
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    return step


def baseline(repeats: int, ref: str) -> None:
    import torch.nn.functional as F

    import dst
    from dst.benchmarks import build as build_benchmark
    from dst.step import TrainingStep

    with tempfile.TemporaryDirectory() as tmp:
        _unpack_baseline(ref, Path(tmp))
        sys.path.insert(0, tmp)
        import cbp_baseline.strategy  # noqa: F401  (registers the old cbp)
        import dst_baseline
        from dst_baseline.benchmarks import build as build_old

        nets = {"20-5-1": ("bit-flipping", {}, 20, 1), "784-100x3-10": ("permuted-mnist", {"hidden": (100, 100, 100)}, 784, 10)}
        print(f"a population of one against the single-learner code at {ref}: training step, us (median of {repeats})")
        for net, (name, bench, n_in, n_out) in nets.items():
            steps = 3000 if net == "20-5-1" else 1000
            generator = torch.Generator().manual_seed(0)
            x = torch.rand(steps, 1, 1, n_in, generator=generator)  # (step, member, batch, in)
            y = (torch.randn(steps, 1, 1, 1, generator=generator) if n_out == 1
                 else torch.randint(0, 10, (steps, 1, 1), generator=generator))
            for strategy_name in ("bp", "cbp"):
                settings = {"replacement_rate": 1e-4, "maturity_threshold": 100} if strategy_name == "cbp" else {}
                old_times, new_times = [], []
                for _ in range(repeats):
                    model = build_old(name, **bench).make_model(torch.Generator().manual_seed(0))
                    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
                    strategy = dst_baseline.strategies.build(strategy_name, model, optimizer, seed=0, **settings)
                    loss_fn = F.mse_loss if n_out == 1 else F.cross_entropy
                    old_step = _autograd_step(model, optimizer, loss_fn)
                    old_times.append(_step_loop(old_step, optimizer, strategy, x[:, 0], y[:, 0]))
                    new = build_benchmark(name, **bench)
                    model = new.make_model([torch.Generator().manual_seed(0)])
                    optimizer = new.make_optimizer(model, 0.01)
                    strategy = dst.strategies.build(strategy_name, model, optimizer, seed=0, **settings)
                    new_step = TrainingStep(model, optimizer, new.loss_fn, 1, torch.device("cpu"))
                    new_times.append(_step_loop(new_step, optimizer, strategy, x, y))
                before, after = _median(old_times) * 1e6, _median(new_times) * 1e6
                print(f"  {net:13s} {strategy_name:4s}: single-learner {before:7.1f} us, population of one "
                      f"{after:7.1f} us: {after / before:.2f}x (target <= 1.10)")
        sys.path.remove(tmp)


# -- memory ----------------------------------------------------------------------------------------


def _memory_child(benchmark: str, members: int) -> None:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if benchmark == "bit-flipping":
        experiment = _prepare("bit-flipping", "cbp", members, 2000)
    else:
        experiment = _mnist_experiment(members, 200)
    experiment.run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{(peak - base) / 1024:.0f}")


def memory() -> None:
    print("peak resident memory above the imports (fresh process each)")
    for benchmark, members in (("bit-flipping", 1000), ("permuted-mnist", 30)):
        out = subprocess.run([sys.executable, __file__, "--memory-child", benchmark, str(members)], check=True,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        print(f"  {benchmark} S={members}: {out.stdout.strip().splitlines()[-1]} MiB")


def cuda() -> None:
    if not torch.cuda.is_available():
        print("cuda: no CUDA device here; S=10,000 on CUDA was not measured")
        return
    for strategy in ("bp", "cbp"):
        _time_loop("bit-flipping", strategy, 10_000, 500, device="cuda")  # warm-up: kernels, allocator
        value = _time_loop("bit-flipping", strategy, 10_000, 4000, device="cuda")
        print(f"cuda {torch.cuda.get_device_name()}: bit-flipping {strategy} S=10,000: {value * 1e9:.1f} ns per member-step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("bit-flipping", "mnist", "baseline", "memory", "cuda"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE, help="commit of the single-learner code")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.memory_child:
        _memory_child(args.memory_child[0], int(args.memory_child[1]))
        return
    parts = {
        "bit-flipping": lambda: bit_flipping(args.repeats),
        "mnist": lambda: mnist(args.repeats),
        "baseline": lambda: baseline(args.repeats, args.baseline),
        "memory": memory,
        "cuda": cuda,
    }
    for name, part in parts.items():
        if args.only in (None, name):
            part()


if __name__ == "__main__":
    main()
