"""From names and settings to a running experiment: what the CLI, comparisons and studies call.

    df = dst.runner.run(RunSpec("bit-flipping", "cbp", steps=100_000, seed=0,
                                settings={"replacement_rate": 1e-4}), out_dir="runs/x")
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from . import benchmarks, strategies
from .errors import ConfigError
from .experiment import Experiment
from .rundir import SUMMARY
from .streams.base import derive_seed
from .summary import summarize

__all__ = ["RunSpec", "prepare", "run", "resolve_device"]

_GLOBAL_RNG, _STRATEGY_RNG = 21, 22  # seed-derivation keys


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None) picks CUDA when present, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {device!r}: {err}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    return resolved


@dataclass(frozen=True)
class RunSpec:
    """One run: a benchmark, a strategy, their settings, a seed and a length."""

    benchmark: str = "bit-flipping"
    strategy: str = "bp"
    steps: int | None = None  # None: the benchmark's default length
    seed: int = 0
    bench: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    checkpoint_every: int | None = None


def prepare(
    spec: RunSpec,
    out_dir: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> Experiment:
    """Build the benchmark's stream, learner and optimizer, the strategy, and the experiment.

    ``on_row`` is passed to :class:`~dst.experiment.Experiment`: called with each metrics row."""
    if spec.steps is not None and (not isinstance(spec.steps, int) or spec.steps <= 0):
        raise ConfigError(f"steps must be a positive integer, got {spec.steps!r}")
    benchmark = benchmarks.build(spec.benchmark, **spec.bench)
    strategy_config = strategies.config(spec.strategy, **spec.settings)
    device = resolve_device(spec.device)
    torch.manual_seed(derive_seed(spec.seed, _GLOBAL_RNG))
    stream, model, optimizer = benchmark.build(spec.seed, device)
    steps = spec.steps if spec.steps is not None else benchmark.default_steps(stream)
    strategy = strategies.build(
        spec.strategy, model, optimizer, config=strategy_config, seed=derive_seed(spec.seed, _STRATEGY_RNG)
    )
    metadata = {
        "benchmark": spec.benchmark,
        "strategy": spec.strategy,
        "seed": spec.seed,
        "steps": steps,
        "device": str(device),
        "bench": benchmark.config.to_dict(),
        "settings": strategy_config.to_dict(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    return Experiment(
        stream,
        model,
        optimizer,
        strategy,
        steps=steps,
        loss_fn=benchmark.loss_fn,
        task_type=benchmark.task_type,
        bin_size=benchmark.bin_steps(stream),
        out_dir=out_dir,
        checkpoint_every=spec.checkpoint_every,
        metadata=metadata,
        progress=progress,
        probe=benchmark.make_probe(),
        on_row=on_row,
    )


def run(
    spec: RunSpec,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> pd.DataFrame:
    """Prepare and run ``spec``; returns the metrics rows (also in ``out_dir/metrics.csv``, with the
    run's :func:`dst.summary.summarize` in ``out_dir/summary.json``). ``on_row(row)`` is called after
    each row is written; an exception it raises stops the run (the rows written so far are kept)."""
    rows = prepare(spec, out_dir, progress=progress, on_row=on_row).run(resume=resume)
    if out_dir is not None and len(rows):
        # written last and atomically: a summary.json on disk always means a finished, readable run
        tmp = Path(out_dir, SUMMARY + ".tmp")
        tmp.write_text(json.dumps(summarize(rows), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, Path(out_dir, SUMMARY))
    return rows


def spec_dict(spec: RunSpec) -> dict[str, Any]:
    return asdict(spec)
