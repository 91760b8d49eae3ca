"""Members stopped by a non-finite loss: the rest of the population goes on without them.

A member whose loss becomes NaN or infinite stops: its rows so far are kept (``metrics.csv`` has at least
its header), ``failure.json`` in its directory says ``kind``, ``error`` and ``step``, and its parameters and
optimizer state are zeroed so that it cannot disturb a batched operation. When no member is left, the
run raises :class:`~dst.errors.NonFiniteLossError`, naming the first step that failed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .backends import Backends
from .errors import NonFiniteLossError
from .population import zero_members
from .rundir import METRICS, write_failure

__all__ = ["Failures"]

log = logging.getLogger(__name__)


class Failures:
    """The stopped members of one run (``stopped``: member -> (step, message)) and how one is stopped.

    ``columns`` is the header a stopped member's ``metrics.csv`` gets if it has no row yet; ``name(member)``
    names a member in messages."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        backends: Backends,
        members: int,
        member_dirs: Sequence[Path] | None,
        columns: Sequence[str],
        name: Callable[[int], str],
    ) -> None:
        self.model, self.optimizer, self.backends = model, optimizer, backends
        self.members, self.member_dirs, self.columns, self.name = members, member_dirs, list(columns), name
        self.stopped: dict[int, tuple[int, str]] = {}

    def check(self, recent: torch.Tensor, step: int) -> None:
        """Stop every running member with a non-finite loss among ``recent`` (steps, S) ending at ``step``."""
        finite = torch.isfinite(recent)
        if bool(finite.all()):
            return
        error = None
        for member in (~finite.all(0)).nonzero().flatten().tolist():
            if member in self.stopped:
                continue
            bad = int((~finite[:, member]).nonzero()[0, 0])
            error = self._stop(member, step - len(recent) + bad + 1, float(recent[bad, member]))
        if len(self.stopped) == self.members and error is not None:
            if self.members == 1:
                raise error
            first = min(step for step, _ in self.stopped.values())
            raise NonFiniteLossError(first, math.nan, f"every one of the {self.members} members")

    def _stop(self, member: int, step: int, value: float) -> NonFiniteLossError:
        """Stop ``member``: write its ``failure.json`` (and a header where it has no row) and zero it."""
        error = NonFiniteLossError(step, value, self.name(member) if self.members > 1 else "")
        self.stopped[member] = (step, str(error))
        log.warning("%s", error)
        if self.member_dirs is not None:
            directory = self.member_dirs[member]
            if not (directory / METRICS).stat().st_size:
                (directory / METRICS).write_text(",".join(self.columns) + "\n")
            write_failure(directory, "non-finite-loss", str(error), step)
        self.zero()
        return error

    def zero(self) -> None:
        """Zero the stopped members' parameters and optimizer state, whose non-finite values would otherwise
        reach batched operations (the probe's SVDs); they go on training unseen, and may diverge again, so
        this runs again before every probe and test."""
        if not self.stopped:
            return
        self.backends.expand()
        zero_members(self.model, self.optimizer, list(self.stopped))
