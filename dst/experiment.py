"""The one training loop: stream -> model -> optimizer -> strategy -> metrics rows, for S members at once.

Online: each batch is predicted (loss, accuracy) before the model learns from it. The stream yields
member-first batches (S, batch, ...); the model (a population, or a plain model: a population of one)
predicts every member's batch in one pass, ``loss_fn`` gives one loss per member (S,), and their sum is
backpropagated, which gives each member exactly its own gradient. Every ``bin_size`` steps (and at the
end) each member gets one row in its own ``metrics.csv``: step, task, mean loss [and accuracy] over the
bin, units replaced and connections regrown in the bin, and the bin's wall time (shared by the members).
The hot path does no device synchronisation: per-step losses are kept as device tensors and reduced once
per bin; the NaN check runs every ``check_every`` steps on the same tensors and names the exact step.

A stream with held-out data (``evaluation_sets``, :mod:`dst.evaluation`) is evaluated where it says, at the
end of every task or epoch, in eval mode without gradients: each set's ``<name>_loss`` [and
``<name>_accuracy``] go into that bin's row (NaN in rows whose bin saw no evaluation; with several in one
bin, the last one's), and with ``bin_size=None`` every evaluation ends a bin (one row per epoch). With early
stopping, each task ends with the model of its best validation accuracy. A stream whose classes grow
(``active_outputs(task)``) sets how many outputs the model's :class:`dst.nets.ActiveOutputs` passes on, and
one with a schedule (``learning_rate_factor(step)``) scales the optimizer's learning rates before each step.

Checkpoints are taken at bin ends (``checkpoint_every`` is rounded up to whole bins) and hold the
model, optimizer, strategy and RNG states of the whole population. Because streams are pure functions
of (seed, step), a resumed run produces exactly the rows an uninterrupted run produces (all but the
timing columns); a resumed run with no checkpoint yet starts again from step 0 and rewrites the same rows.

A member whose loss becomes NaN or infinite stops and the others go on (:mod:`dst.failures`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .backends import Backends
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import ConfigError
from .failures import Failures
from .evaluation import Evaluation
from .nets import use_outputs
from .population import is_population
from .refresh import NO_REFRESH, RefreshStrategy
from .step import TrainingStep
from .rundir import FAILURE, append_metrics, check_config, check_output_dir, write_metrics
from .streams import Stream

if TYPE_CHECKING:
    from .probe import Probe

__all__ = ["Experiment", "TIMING_COLUMNS"]

log = logging.getLogger(__name__)

#: Columns that differ between otherwise identical runs.
TIMING_COLUMNS = ("seconds", "seconds_per_step", "probe_seconds")


class Experiment:
    """Runs a strategy on a stream online, for every member of a population, and logs one row per bin.

    Parameters
    ----------
    stream, model, optimizer, strategy:
        The parts; ``model`` must already be on ``stream.device``, and stream, model and strategy must
        have the same number of members.
    steps:
        Total training steps (batches).
    loss_fn:
        ``loss_fn(output, target)`` -> one loss per member, shape (S,) (``dst.population.mse_per_member``,
        ``cross_entropy_per_member``).
    fused:
        ``None`` lets :class:`dst.step.TrainingStep` write the gradients out (no autograd) whenever the model
        and loss allow it; ``False`` always runs autograd.
    backend:
        How sparse linear layers compute between refreshes (:mod:`dst.backends`): ``masked`` (the
        reference), ``condensed``, ``auto``. Results are the same; the model is masked again whenever the
        strategy refreshes, the probe or test runs, a checkpoint is written, and after ``run``.
    task_type:
        ``"classification"`` adds an online ``accuracy`` column.
    bin_size:
        Steps per metrics row; ``None``: one row per evaluation of the stream's held-out sets.
    out_dir:
        Where the checkpoint goes, and for a population of one its ``metrics.csv`` and ``config.json``;
        ``None`` keeps rows in memory.
    member_dirs:
        One directory per member for its ``metrics.csv``, ``config.json`` (and ``failure.json``); by
        default ``[out_dir]`` for a population of one. Needed for a larger population with an ``out_dir``.
    checkpoint_every:
        Steps between checkpoints (rounded up to whole bins); ``None`` or 0 disables them.
    metadata:
        Resolved settings written to each member's ``config.json`` (one dict for all, or one per member);
        a resume must find the same ones.
    on_row:
        Called with the list of the members' rows (one per member still running) right after they are
        written (studies report intermediate values from it); an exception it raises (e.g.
        ``optuna.TrialPruned``) stops the run, rows kept.
    """

    def __init__(
        self,
        stream: Stream,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        strategy: RefreshStrategy,
        *,
        steps: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        task_type: str = "regression",
        bin_size: int | None = 1000,
        out_dir: str | os.PathLike | None = None,
        member_dirs: Sequence[str | os.PathLike] | None = None,
        checkpoint_every: int | None = None,
        check_every: int = 1000,
        metadata: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
        progress: bool = True,
        probe: "Probe | None" = None,
        on_row: Callable[[list[dict[str, Any]]], None] | None = None,
        fused: bool | None = None,
        backend: str = "masked",
    ) -> None:
        if not isinstance(steps, int) or steps <= 0:
            raise ConfigError(f"steps must be a positive integer, got {steps!r}")
        if bin_size is None and not hasattr(stream, "evaluation_sets"):
            raise ConfigError(f"bin_size=None (a row per evaluation) needs a stream with held-out sets; "
                              f"{type(stream).__name__} has none")
        if bin_size is not None and bin_size <= 0:
            raise ConfigError(f"bin_size must be a positive integer, got {bin_size!r}")
        if task_type not in ("regression", "classification"):
            raise ConfigError(f"task_type must be 'regression' or 'classification', got {task_type!r}")
        self.stream, self.model, self.optimizer, self.strategy = stream, model, optimizer, strategy
        self.members = strategy.members
        stream_members = getattr(stream, "members", 1)
        if stream_members != self.members:
            raise ConfigError(
                f"the stream has {stream_members} members but the model and strategy {self.members}; "
                "build them from the same seeds"
            )
        self.population = is_population(model)
        self.steps, self.loss_fn, self.task_type = steps, loss_fn, task_type
        self.backends = Backends(model, optimizer, strategy, backend, getattr(stream, "batch_size", 1))
        if self.backends:
            log.info("sparse backends: %s", self.backends.describe())
        self.train_step = TrainingStep(model, optimizer, loss_fn, self.members, stream.device, fused)
        self.bin_size = bin_size
        self.check_every = max(1, min(check_every, bin_size or check_every))
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if member_dirs is None and self.out_dir is not None:
            if self.members != 1:
                raise ConfigError(f"a population of {self.members} members needs member_dirs: one directory each")
            member_dirs = [self.out_dir]
        self.member_dirs = [Path(d) for d in member_dirs] if member_dirs is not None else None
        if self.member_dirs is not None and len(self.member_dirs) != self.members:
            raise ConfigError(f"{len(self.member_dirs)} member_dirs for a population of {self.members} members")
        self.checkpoint_every = 0
        if checkpoint_every and bin_size is None:
            self.checkpoint_every = checkpoint_every  # taken at the first row end from each multiple on
        elif checkpoint_every:
            self.checkpoint_every = math.ceil(checkpoint_every / bin_size) * bin_size
            if self.checkpoint_every != checkpoint_every:
                log.info("checkpoint_every %d rounded up to %d (whole bins)", checkpoint_every, self.checkpoint_every)
        if metadata is None or isinstance(metadata, dict):
            metadata = [metadata] * self.members  # type: ignore[list-item]
        if len(metadata) != self.members:
            raise ConfigError(f"{len(metadata)} metadata dicts for a population of {self.members} members")
        self.metadata = list(metadata)
        self.progress = progress
        self.probe = probe
        self.on_row = on_row
        if probe is not None and not hasattr(stream, "probe_batch"):
            raise ConfigError(f"{type(stream).__name__} has no probe_batch(task): it cannot be probed")
        self.rows: list[list[dict[str, Any]]] = [[] for _ in range(self.members)]
        self.failures = Failures(model, optimizer, self.backends, self.members, self.member_dirs,
                                 self._columns(), self.member_name)
        self._probed: list[dict[str, Any]] = [{} for _ in range(self.members)]
        self.evaluation = (Evaluation(stream, model, loss_fn, task_type, self.members, self.population)
                           if hasattr(stream, "evaluation_sets") else None)
        self.grows = hasattr(stream, "active_outputs")  # class-incremental: the outputs in use grow by task
        # a stream with a learning-rate schedule scales each group's learning rate as given here
        self.lr_factor = getattr(stream, "learning_rate_factor", None)
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]

    @property
    def failed(self) -> dict[int, tuple[int, str]]:
        """member -> (step, message) of the members stopped by a non-finite loss (:mod:`dst.failures`)."""
        return self.failures.stopped

    def member_name(self, member: int) -> str:
        seeds = getattr(self.stream, "seeds", None)
        return f"member {member} (seed {seeds[member]})" if seeds else f"member {member}"

    # -- output -----------------------------------------------------------------------------
    def _start_files(self) -> None:
        """Each member's ``metrics.csv`` holds exactly its rows so far (none for a fresh run)."""
        assert self.member_dirs is not None
        for directory, rows in zip(self.member_dirs, self.rows):
            write_metrics(directory, rows)

    def _emit(self, member: int, row: dict[str, Any]) -> None:
        rows = self.rows[member]
        rows.append(row)
        if self.member_dirs is not None:
            append_metrics(self.member_dirs[member], row, list(rows[0]))

    def _columns(self) -> list[str]:
        return ["step", "task", "loss", *(["accuracy"] if self.task_type == "classification" else []),
                "units_replaced", "connections_regrown", "seconds", "seconds_per_step"]

    def run(self, resume: bool = False) -> list[pd.DataFrame]:
        """Train for ``steps`` steps (continuing from the checkpoint with ``resume``); return each member's rows."""
        if self.out_dir is not None:
            check_output_dir(self.out_dir, resume=resume)
            for directory, metadata in zip(self.member_dirs or (), self.metadata):
                check_output_dir(directory, resume=resume)
                if metadata is not None:
                    check_config(directory, metadata, resume=resume)
        elif resume:
            raise ConfigError("resume needs an out_dir holding a checkpoint")
        step, task = (load_checkpoint(self) if resume else (0, -1))
        if step < self.steps:
            if self.member_dirs is not None:
                self._start_files()
                for member, directory in enumerate(self.member_dirs):
                    if member not in self.failed:  # a failure of an earlier attempt no longer holds
                        (directory / FAILURE).unlink(missing_ok=True)
            self._loop(step, task)
        else:
            log.info("run already has %d of %d steps", step, self.steps)
        return [pd.DataFrame(rows) for rows in self.rows]

    def _next_event(self, step: int, in_bin: int) -> int:
        """The next step at which the loop leaves its hot path (check, bin end, probe, end)."""
        events = [step + self.check_every, self.steps]
        if self.bin_size is not None:
            events.append(step + self.bin_size - in_bin)
        if self.probe is not None and self.probe.every:
            events.append(step + self.probe.every - step % self.probe.every)
        if self.evaluation is not None:
            events.append(self.evaluation.next_step(step))
        return min(events)

    def _run_probe(self, task: int) -> None:
        self.backends.expand()
        self.failures.zero()
        inputs, targets = self.stream.probe_batch(task)  # type: ignore[attr-defined]
        self._probed = self.probe(  # type: ignore[misc]
            self.model, self.strategy.topology, inputs, targets, self.loss_fn
        )

    def _run_evaluation(self, task: int) -> None:
        """Evaluate the held-out sets of ``task`` (the model in full, its stopped members zeroed)."""
        self.backends.expand()
        self.failures.zero()
        self.evaluation.run(task)  # type: ignore[union-attr]

    def _bin_rows(
        self, step: int, task: int, losses, corrects, examples, units, connections, elapsed
    ) -> list[dict[str, Any]]:
        loss = torch.stack(losses).mean(0).tolist()
        accuracy = (torch.stack(corrects).sum(0) / examples).tolist() if corrects else None
        rows = []
        for member in range(self.members):
            if member in self.failed:
                continue
            row: dict[str, Any] = {"step": step, "task": task, "loss": loss[member]}
            if accuracy is not None:
                row["accuracy"] = accuracy[member]
            row.update(
                units_replaced=int(units[member]),
                connections_regrown=int(connections[member]),
                seconds=elapsed,
                seconds_per_step=elapsed / len(losses),
            )
            row.update(self._probed[member])
            if self.evaluation is not None:  # evaluation columns in every row, NaN where none ran in the bin
                row.update(self.evaluation.take_row(member))
            self._emit(member, row)
            rows.append(row)
        self._probed = [{} for _ in range(self.members)]
        if self.evaluation is not None:
            self.evaluation.clear()
        return rows

    def _loop(self, step: int, task: int) -> None:
        model, optimizer, strategy, train_step = self.model, self.optimizer, self.strategy, self.train_step
        backends = self.backends
        classify = self.task_type == "classification"
        losses: list[torch.Tensor] = []
        corrects: list[torch.Tensor] = []
        examples = 0
        units = np.zeros(self.members, dtype=np.int64)
        connections = np.zeros(self.members, dtype=np.int64)
        checked = 0
        bin_start_time = time.perf_counter()
        bar = tqdm(
            total=self.steps, initial=step, disable=not self.progress, unit="step",
            dynamic_ncols=True, mininterval=1.0, leave=False,
        )
        next_check = self._next_event(step, 0)
        evaluate_at = self.evaluation.next_step(step) if self.evaluation is not None else None
        next_checkpoint = (step // self.checkpoint_every + 1) * self.checkpoint_every if self.checkpoint_every else None
        applied_factor = None
        strategy.set_horizon(self.steps, self.stream.steps_per_task)
        model.train()
        try:
            for x, y, batch_task in self.stream.batches(step):
                if batch_task != task:
                    if self.evaluation is not None and task >= 0:
                        self.evaluation.end_task()  # early stopping: go on from the task's best state
                    task = batch_task
                    if self.grows:
                        use_outputs(model, self.stream.active_outputs(task))  # type: ignore[attr-defined]
                    strategy.on_task_start(task)
                    if self.probe is not None:
                        self._run_probe(task)
                if self.lr_factor is not None:
                    factor = self.lr_factor(step)
                    if factor != applied_factor:
                        for group, base in zip(optimizer.param_groups, self.base_lrs):
                            group["lr"] = base * factor
                        applied_factor = factor
                if backends:
                    backends.prepare(strategy.step + 1)  # compact layers, unless the strategy refreshes
                output, loss = train_step(x, y)  # the output, (S,) losses, and gradients in .grad
                losses.append(loss)
                if classify:
                    corrects.append((output.argmax(-1) == y).sum(1))
                examples += y.shape[1]
                strategy.before_step()
                optimizer.step()
                stats = strategy.after_step()
                if stats is not NO_REFRESH:
                    units += stats.units_replaced
                    connections += stats.connections_regrown
                step += 1
                if step < next_check and step < self.steps:
                    continue
                # -- once per check_every steps: NaN check, progress; bin rows; checkpoints -------
                self.failures.check(torch.stack(losses[checked:]), step)
                checked = len(losses)
                bar.update(step - bar.n)
                if self.probe is not None and self.probe.every and step % self.probe.every == 0:
                    self._run_probe(task)
                evaluated = step == evaluate_at
                if evaluated:
                    self._run_evaluation(task)
                    evaluate_at = self.evaluation.next_step(step)  # type: ignore[union-attr]
                if len(losses) == self.bin_size or step == self.steps or (self.bin_size is None and evaluated):
                    rows = self._bin_rows(step, task, losses, corrects, examples, units, connections,
                                          time.perf_counter() - bin_start_time)
                    if self.members == 1:
                        bar.set_postfix(loss=f"{self.rows[0][-1]['loss']:.4g}", refresh=False)
                    losses, corrects, examples, checked = [], [], 0, 0
                    units[:] = 0
                    connections[:] = 0
                    if next_checkpoint is not None and self.out_dir is not None and (
                        step >= next_checkpoint or step == self.steps
                    ):
                        save_checkpoint(self, step, task)
                        next_checkpoint = (step // self.checkpoint_every + 1) * self.checkpoint_every
                    if self.on_row is not None and rows:
                        self.on_row(rows)
                    bin_start_time = time.perf_counter()
                if step >= self.steps:
                    break
                next_check = self._next_event(step, len(losses))
            else:
                raise ConfigError(f"the stream ended after {step} steps, before the {self.steps} asked for")
        finally:
            bar.close()
            self.backends.expand()
