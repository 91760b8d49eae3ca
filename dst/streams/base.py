"""What the experiment loop needs from a continual stream."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["Stream", "derive_seed"]


def derive_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys (numpy SeedSequence): independent streams per key."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class Stream(ABC):
    """A never-ending (or long) sequence of mini-batches grouped into tasks.

    ``batches(start_step)`` yields ``(x, y, task)`` from step ``start_step`` on, on ``self.device``.
    The sequence is a pure function of the seed: starting at step s gives exactly the batches an
    uninterrupted iteration gives from step s, which is what makes checkpoint/resume exact.
    """

    batch_size: int = 1
    #: Steps per task when constant (None when tasks have no fixed length).
    steps_per_task: int | None = None
    device: torch.device = torch.device("cpu")

    @abstractmethod
    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Yield ``(x, y, task)`` from ``start_step`` on."""

    def task_of(self, step: int) -> int:
        if self.steps_per_task is None:
            raise TypeError(f"{type(self).__name__} has no fixed task length")
        return step // self.steps_per_task
