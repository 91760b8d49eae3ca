"""Held-out evaluation inside the training loop, and early stopping within a task.

A stream with held-out data says when to evaluate and on what: ``next_evaluation(step)`` (the first step
after ``step`` that ends an evaluation period: a task for continual ImageNet, an epoch for class-incremental
CIFAR), ``evaluation_sets(task)`` (named sets, e.g. ``{"test": (x, y), "validation": (x, y)}``, member
first) and ``evaluation_names``, the names it returns. The loop evaluates the model there in eval mode without gradients and without touching any random
state, in chunks of ``chunk`` examples, and each set's ``<name>_loss`` [and ``<name>_accuracy``] go into
that step's metrics row (NaN in rows with no evaluation).

Early stopping (a stream with ``early_stopping`` true and a ``validation`` set; the authors' class-incremental
CIFAR): within each task the model state of the evaluation with the best validation accuracy (the first
such, as strictly better replaces it) is kept, per member, and when the task ends every member goes on from
its kept state: parameters and buffers (BatchNorm statistics), not the optimizer state or the strategy's,
as in the authors' code. The kept states are part of the checkpoint, so a resume is exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .population import forward, member_view

__all__ = ["Evaluation"]


def _member_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``model`` seen member first, (S, ...) views that write through."""
    return [member_view(module, tensor) for module in model.modules()
            for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False))]


class Evaluation:
    """Evaluates ``model`` on ``stream``'s held-out sets, and keeps each task's best state with early stopping."""

    def __init__(self, stream: Any, model: nn.Module, loss_fn, task_type: str, members: int, population: bool,
                 chunk: int = 1000) -> None:
        self.stream, self.model, self.loss_fn, self.task_type = stream, model, loss_fn, task_type
        self.members, self.population, self.chunk = members, population, chunk
        self.early_stopping = bool(getattr(stream, "early_stopping", False))
        self.names: list[str] = list(stream.evaluation_names)
        self.results: list[dict[str, float]] = [{} for _ in range(members)]
        self.best = torch.full((members,), -math.inf)
        self.kept: list[torch.Tensor] | None = None  # copies of _member_tensors at each member's best

    def next_step(self, step: int) -> int:
        return int(self.stream.next_evaluation(step))

    def columns(self) -> list[str]:
        suffixes = ("loss", "accuracy") if self.task_type == "classification" else ("loss",)
        return [f"{name}_{suffix}" for name in self.names for suffix in suffixes]

    @torch.no_grad()
    def run(self, task: int) -> None:
        """Evaluate every set of ``task``; with early stopping keep the state of members that improved."""
        sets = self.stream.evaluation_sets(task)
        if self.early_stopping and "validation" not in sets:
            raise ConfigError(f"{type(self.stream).__name__} asks for early stopping but has no validation set")
        if list(sets) != self.names:
            raise ConfigError(f"{type(self.stream).__name__}.evaluation_sets gave {list(sets)}, not the "
                              f"evaluation_names it declares ({self.names})")
        was_training = self.model.training
        self.model.eval()
        try:
            for name, (inputs, targets) in sets.items():
                loss, accuracy = self._measure(inputs, targets)
                for member in range(self.members):
                    self.results[member][f"{name}_loss"] = float(loss[member])
                    if accuracy is not None:
                        self.results[member][f"{name}_accuracy"] = float(accuracy[member])
                if name == "validation" and self.early_stopping and accuracy is not None:
                    self._keep_improved(accuracy)
        finally:
            self.model.train(was_training)

    def _measure(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean loss and accuracy per member over the set, chunk by chunk."""
        count = targets.shape[1]
        loss = torch.zeros(self.members, dtype=torch.float64)
        correct = torch.zeros(self.members, dtype=torch.float64)
        for first in range(0, count, self.chunk):
            x, y = inputs[:, first : first + self.chunk], targets[:, first : first + self.chunk]
            output = forward(self.model, x, self.population)
            loss += self.loss_fn(output, y).double().cpu() * y.shape[1]
            if self.task_type == "classification":
                correct += (output.argmax(-1) == y).sum(1).double().cpu()
        return loss / count, (correct / count if self.task_type == "classification" else None)

    def _keep_improved(self, accuracy: torch.Tensor) -> None:
        improved = accuracy.float() > self.best
        if not bool(improved.any()):
            return
        self.best = torch.where(improved, accuracy.float(), self.best)
        current = _member_tensors(self.model)
        if self.kept is None:
            self.kept = [tensor.detach().clone() for tensor in current]
            return
        index = improved.nonzero().flatten().to(current[0].device)
        for kept, tensor in zip(self.kept, current):
            kept[index] = tensor[index]

    @torch.no_grad()
    def end_task(self) -> None:
        """With early stopping: every member that was evaluated goes on from its best state of the task."""
        if self.kept is not None:
            evaluated = (self.best > -math.inf).nonzero().flatten()
            for kept, tensor in zip(self.kept, _member_tensors(self.model)):
                index = evaluated.to(tensor.device)
                tensor[index] = kept[index]
        self.best = torch.full((self.members,), -math.inf)
        self.kept = None

    def take_row(self, member: int) -> dict[str, float]:
        """The member's evaluation columns for the row now being written (NaN where none ran in its bin)."""
        return {column: self.results[member].get(column, math.nan) for column in self.columns()}

    def clear(self) -> None:
        self.results = [{} for _ in range(self.members)]

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best.clone(), "kept": None if self.kept is None else [t.cpu() for t in self.kept]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"].clone()
        device = next(iter(_member_tensors(self.model))).device
        self.kept = None if state["kept"] is None else [t.to(device) for t in state["kept"]]
