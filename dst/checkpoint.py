"""An experiment's checkpoint: everything a resume needs to continue exactly, in one atomic file.

The checkpoint holds the population's model, optimizer and strategy states, the held-out evaluation's kept
states (early stopping), the torch RNG states, the step and task, the members stopped by a non-finite loss,
and how many metrics rows each member had written; on resume each member's ``metrics.csv`` is cut back to
that many rows (the loop rewrites the rest identically).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from .rundir import CHECKPOINT, METRICS

if TYPE_CHECKING:
    from .experiment import Experiment

__all__ = ["checkpoint_state", "save_checkpoint", "load_checkpoint"]

log = logging.getLogger(__name__)


def checkpoint_state(experiment: "Experiment", step: int, task: int) -> dict[str, Any]:
    state = {
        "step": step,
        "task": task,
        "rows": [len(rows) for rows in experiment.rows],
        "failed": dict(experiment.failed),
        "model": experiment.model.state_dict(),
        "optimizer": experiment.optimizer.state_dict(),
        "strategy": experiment.strategy.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    if experiment.evaluation is not None:
        state["evaluation"] = experiment.evaluation.state_dict()
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(experiment: "Experiment", step: int, task: int) -> None:
    """Write the checkpoint (the model in its masked form) atomically: a crash never leaves half of one."""
    assert experiment.out_dir is not None
    experiment.backends.expand()
    tmp = experiment.out_dir / (CHECKPOINT + ".tmp")
    torch.save(checkpoint_state(experiment, step, task), tmp)
    os.replace(tmp, experiment.out_dir / CHECKPOINT)


def load_checkpoint(experiment: "Experiment") -> tuple[int, int]:
    """Restore the experiment from its checkpoint; (step, task) to continue from, (0, -1) without one."""
    assert experiment.out_dir is not None and experiment.member_dirs is not None
    path = experiment.out_dir / CHECKPOINT
    if not path.exists():
        if any((d / METRICS).exists() and (d / METRICS).stat().st_size for d in experiment.member_dirs):
            log.warning("%s has no %s yet: running it again from step 0 (the run is deterministic, so "
                        "the rows already written are recomputed)", experiment.out_dir, CHECKPOINT)
        return 0, -1
    state = torch.load(path, map_location="cpu", weights_only=False)
    experiment.model.load_state_dict(state["model"])
    experiment.optimizer.load_state_dict(state["optimizer"])
    experiment.strategy.load_state_dict(state["strategy"])
    if experiment.evaluation is not None:
        experiment.evaluation.load_state_dict(state["evaluation"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    counts = state["rows"] if isinstance(state["rows"], list) else [state["rows"]]
    experiment.failures.stopped = {int(k): tuple(v) for k, v in state.get("failed", {}).items()}  # type: ignore[misc]
    for member, (directory, count) in enumerate(zip(experiment.member_dirs, counts)):
        written = directory / METRICS
        rows = pd.read_csv(written).to_dict("records") if written.exists() and written.stat().st_size else []
        experiment.rows[member] = rows[:count]
    return int(state["step"]), int(state["task"])
