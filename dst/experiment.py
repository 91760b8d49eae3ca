"""The one training loop: stream -> model -> optimizer -> strategy -> metrics rows.

Online: each batch is predicted (loss, accuracy) before the model learns from it. Every ``bin_size``
steps (and at the end) one row goes to ``metrics.csv``: step, task, mean loss [and accuracy] over the
bin, units replaced and connections regrown in the bin, and the bin's wall time. The hot path does no
device synchronisation: per-step losses are kept as device tensors and reduced once per bin; the NaN
check runs every ``check_every`` steps on the same tensors and names the exact step.

A stream with held-out data (a ``test_batch(task)`` method) is tested at the end of every task, in eval
mode without gradients: ``test_loss`` [and ``test_accuracy``] of the task that ended go into that bin's
row (NaN in rows whose bin saw no task end; with several task ends in one bin, the last one's).

Checkpoints are taken at bin ends (``checkpoint_every`` is rounded up to whole bins) and hold the
model, optimizer, strategy and RNG states. Because streams are pure functions of (seed, step), a
resumed run produces exactly the rows an uninterrupted run produces (all but the timing columns); a
resumed run with no checkpoint yet starts again from step 0 and rewrites the same rows.

A run that stops on a NaN or infinite loss keeps its rows (``metrics.csv`` has at least its header)
and writes ``failure.json``: ``kind``, ``error`` (the message) and ``step``.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ConfigError, NonFiniteLossError
from .refresh import NO_REFRESH, RefreshStrategy
from .rundir import CHECKPOINT, FAILURE, METRICS, check_config, check_output_dir, write_failure
from .streams import Stream

if TYPE_CHECKING:
    from .probe import Probe

__all__ = ["Experiment", "TIMING_COLUMNS"]

log = logging.getLogger(__name__)

#: Columns that differ between otherwise identical runs.
TIMING_COLUMNS = ("seconds", "seconds_per_step", "probe_seconds")


class Experiment:
    """Runs a strategy on a stream online and logs one row per bin.

    Parameters
    ----------
    stream, model, optimizer, strategy:
        The parts; ``model`` must already be on ``stream.device``.
    steps:
        Total training steps (batches).
    loss_fn:
        ``loss_fn(output, target)`` -> scalar tensor.
    task_type:
        ``"classification"`` adds an online ``accuracy`` column.
    bin_size:
        Steps per metrics row.
    out_dir:
        Where ``metrics.csv`` (and ``checkpoint.pt``, ``config.json``) go; ``None`` keeps rows in memory.
    checkpoint_every:
        Steps between checkpoints (rounded up to whole bins); ``None`` or 0 disables them.
    metadata:
        Resolved settings written to ``config.json``; a resume must find the same ones.
    on_row:
        Called with each metrics row right after it is written (studies report intermediate values
        from it); an exception it raises (e.g. ``optuna.TrialPruned``) stops the run, rows kept.
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
        bin_size: int = 1000,
        out_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        check_every: int = 1000,
        metadata: dict[str, Any] | None = None,
        progress: bool = True,
        probe: "Probe | None" = None,
        on_row: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if not isinstance(steps, int) or steps <= 0:
            raise ConfigError(f"steps must be a positive integer, got {steps!r}")
        if bin_size <= 0:
            raise ConfigError(f"bin_size must be a positive integer, got {bin_size!r}")
        if task_type not in ("regression", "classification"):
            raise ConfigError(f"task_type must be 'regression' or 'classification', got {task_type!r}")
        self.stream, self.model, self.optimizer, self.strategy = stream, model, optimizer, strategy
        self.steps, self.loss_fn, self.task_type = steps, loss_fn, task_type
        self.bin_size = bin_size
        self.check_every = max(1, min(check_every, bin_size))
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.checkpoint_every = 0
        if checkpoint_every:
            self.checkpoint_every = math.ceil(checkpoint_every / bin_size) * bin_size
            if self.checkpoint_every != checkpoint_every:
                log.info("checkpoint_every %d rounded up to %d (whole bins)", checkpoint_every, self.checkpoint_every)
        self.metadata = metadata
        self.progress = progress
        self.probe = probe
        self.on_row = on_row
        if probe is not None and not hasattr(stream, "probe_batch"):
            raise ConfigError(f"{type(stream).__name__} has no probe_batch(task): it cannot be probed")
        self.rows: list[dict[str, Any]] = []
        self._probed: dict[str, Any] = {}
        # streams with held-out data per task (test_batch) are tested at the end of every task
        self.evaluate = hasattr(stream, "test_batch")
        if self.evaluate and not stream.steps_per_task:
            raise ConfigError(f"{type(stream).__name__} has test_batch(task) but no fixed task length")
        self._tested: dict[str, Any] = {}

    # -- checkpoints ------------------------------------------------------------------------
    def _checkpoint_state(self, step: int, task: int) -> dict[str, Any]:
        state = {
            "step": step,
            "task": task,
            "rows": len(self.rows),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "strategy": self.strategy.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def _save_checkpoint(self, step: int, task: int) -> None:
        assert self.out_dir is not None
        tmp = self.out_dir / (CHECKPOINT + ".tmp")
        torch.save(self._checkpoint_state(step, task), tmp)
        os.replace(tmp, self.out_dir / CHECKPOINT)  # atomic: a crash never leaves half a checkpoint

    def _load_checkpoint(self) -> tuple[int, int]:
        assert self.out_dir is not None
        path = self.out_dir / CHECKPOINT
        if not path.exists():
            written = self.out_dir / METRICS
            if written.exists() and written.stat().st_size:
                log.warning("%s has no %s yet: running it again from step 0 (the run is deterministic, so "
                            "the rows already in %s are recomputed)", self.out_dir, CHECKPOINT, METRICS)
            return 0, -1
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.strategy.load_state_dict(state["strategy"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        rows = pd.read_csv(self.out_dir / METRICS).to_dict("records") if (self.out_dir / METRICS).exists() else []
        self.rows = rows[: state["rows"]]
        return int(state["step"]), int(state["task"])

    # -- output -----------------------------------------------------------------------------
    def _open_csv(self) -> Any:
        assert self.out_dir is not None
        path = self.out_dir / METRICS
        handle = path.open("w", newline="")
        if self.rows:
            writer = csv.DictWriter(handle, fieldnames=list(self.rows[0]), lineterminator="\n", restval="")
            writer.writeheader()
            writer.writerows(self.rows)
            handle.flush()
        return handle

    def _emit(self, handle: Any, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if handle is None:
            return
        if handle.tell() == 0:
            csv.DictWriter(handle, fieldnames=list(row), lineterminator="\n").writeheader()
        csv.DictWriter(handle, fieldnames=list(self.rows[0]), lineterminator="\n", restval="").writerow(row)
        handle.flush()

    # -- the loop ---------------------------------------------------------------------------
    def run(self, resume: bool = False) -> pd.DataFrame:
        """Train for ``steps`` steps (continuing from the checkpoint with ``resume``); return the rows."""
        if self.out_dir is not None:
            check_output_dir(self.out_dir, resume=resume)
        elif resume:
            raise ConfigError("resume needs an out_dir holding a checkpoint")
        if self.out_dir is not None and self.metadata is not None:
            check_config(self.out_dir, self.metadata, resume=resume)
        step, task = (self._load_checkpoint() if resume else (0, -1))
        if step >= self.steps:
            log.info("run already has %d of %d steps", step, self.steps)
            return pd.DataFrame(self.rows)
        handle = self._open_csv() if self.out_dir is not None else None
        if self.out_dir is not None:
            (self.out_dir / FAILURE).unlink(missing_ok=True)  # a failure of an earlier attempt no longer holds
        try:
            self._loop(step, task, handle)
        except NonFiniteLossError as err:
            if handle is not None:
                self._record_failure(handle, err)
            raise
        finally:
            if handle is not None:
                handle.close()
        return pd.DataFrame(self.rows)

    def _record_failure(self, handle: Any, err: NonFiniteLossError) -> None:
        """Leave a header in an empty ``metrics.csv`` and say in ``failure.json`` why and where the run stopped."""
        assert self.out_dir is not None
        if handle.tell() == 0:
            columns = ["step", "task", "loss", *(["accuracy"] if self.task_type == "classification" else []),
                       "units_replaced", "connections_regrown", "seconds", "seconds_per_step"]
            csv.writer(handle, lineterminator="\n").writerow(columns)
            handle.flush()
        write_failure(self.out_dir, "non-finite-loss", str(err), err.step)

    def _next_event(self, step: int, in_bin: int) -> int:
        """The next step at which the loop leaves its hot path (check, bin end, probe, end)."""
        events = [step + self.check_every, step + self.bin_size - in_bin, self.steps]
        if self.probe is not None and self.probe.every:
            events.append(step + self.probe.every - step % self.probe.every)
        if self.evaluate:
            events.append(step + self.stream.steps_per_task - step % self.stream.steps_per_task)  # type: ignore[operator]
        return min(events)

    def _run_probe(self, task: int) -> None:
        inputs, targets = self.stream.probe_batch(task)  # type: ignore[attr-defined]
        self._probed = self.probe(  # type: ignore[misc]
            self.model, self.strategy.topology, inputs, targets, self.loss_fn
        )

    @torch.no_grad()
    def _run_test(self, task: int) -> None:
        """Test the model (eval mode, no gradient, no RNG) on the held-out data of a finished task."""
        inputs, targets = self.stream.test_batch(task)  # type: ignore[attr-defined]
        was_training = self.model.training
        self.model.eval()
        try:
            output = self.model(inputs)
        finally:
            self.model.train(was_training)
        self._tested = {"test_loss": float(self.loss_fn(output, targets))}
        if self.task_type == "classification":
            self._tested["test_accuracy"] = float((output.argmax(1) == targets).float().mean())

    def _loop(self, step: int, task: int, handle: Any) -> None:
        model, optimizer, strategy, loss_fn = self.model, self.optimizer, self.strategy, self.loss_fn
        classify = self.task_type == "classification"
        losses: list[torch.Tensor] = []
        corrects: list[torch.Tensor] = []
        examples = 0
        units = connections = 0
        checked = 0
        bin_start_time = time.perf_counter()
        bar = tqdm(
            total=self.steps, initial=step, disable=not self.progress, unit="step",
            dynamic_ncols=True, mininterval=1.0, leave=False,
        )
        next_check = self._next_event(step, 0)
        strategy.set_horizon(self.steps, self.stream.steps_per_task)
        model.train()
        try:
            for x, y, batch_task in self.stream.batches(step):
                if batch_task != task:
                    task = batch_task
                    strategy.on_task_start(task)
                    if self.probe is not None:
                        self._run_probe(task)
                output = model(x)
                loss = loss_fn(output, y)
                losses.append(loss.detach())
                if classify:
                    corrects.append((output.detach().argmax(1) == y).sum())
                examples += y.shape[0]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
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
                recent = torch.stack(losses[checked:])
                if not bool(torch.isfinite(recent).all()):
                    bad = int((~torch.isfinite(recent)).nonzero()[0, 0])
                    bad_step = step - len(recent) + bad + 1
                    raise NonFiniteLossError(bad_step, float(recent[bad]))
                checked = len(losses)
                bar.update(step - bar.n)
                if self.probe is not None and self.probe.every and step % self.probe.every == 0:
                    self._run_probe(task)
                if self.evaluate and step % self.stream.steps_per_task == 0:  # type: ignore[operator]
                    self._run_test(task)  # the task just ended
                if len(losses) == self.bin_size or step == self.steps:
                    elapsed = time.perf_counter() - bin_start_time
                    row: dict[str, Any] = {"step": step, "task": task, "loss": float(torch.stack(losses).mean())}
                    if classify:
                        row["accuracy"] = float(torch.stack(corrects).sum()) / examples
                    row.update(
                        units_replaced=units,
                        connections_regrown=connections,
                        seconds=elapsed,
                        seconds_per_step=elapsed / len(losses),
                    )
                    row.update(self._probed)
                    self._probed = {}
                    if self.evaluate:  # test columns in every row, NaN where no task ended in the bin
                        columns = ("test_loss", "test_accuracy") if classify else ("test_loss",)
                        row.update({column: self._tested.get(column, math.nan) for column in columns})
                        self._tested = {}
                    self._emit(handle, row)
                    bar.set_postfix(loss=f"{row['loss']:.4g}", refresh=False)
                    losses, corrects, examples, units, connections, checked = [], [], 0, 0, 0, 0
                    if self.checkpoint_every and self.out_dir is not None and (
                        step % self.checkpoint_every == 0 or step == self.steps
                    ):
                        self._save_checkpoint(step, task)
                    if self.on_row is not None:
                        self.on_row(row)
                    bin_start_time = time.perf_counter()
                if step >= self.steps:
                    break
                next_check = self._next_event(step, len(losses))
            else:
                raise ConfigError(f"the stream ended after {step} steps, before the {self.steps} asked for")
        finally:
            bar.close()
