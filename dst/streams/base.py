"""What the experiment loop needs from a continual stream, and the helpers every stream shares."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["CHUNK_BYTES", "Stream", "derive_seed", "steps_per_chunk"]

#: About how many bytes of batches a stream computes at once (all members together, one chunk of steps).
CHUNK_BYTES = 64 * 2**20


def derive_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys (numpy SeedSequence): independent streams per key."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def steps_per_chunk(bytes_per_step: int, steps_per_task: int) -> int:
    """How many steps to compute at once so that a chunk stays near ``CHUNK_BYTES`` (at least 1, at most a task)."""
    return max(1, min(steps_per_task, CHUNK_BYTES // max(1, bytes_per_step)))


class Stream(ABC):
    """A never-ending (or long) sequence of mini-batches grouped into tasks, for a population of members.

    ``batches(start_step)`` yields ``(x, y, task)`` from step ``start_step`` on, on ``self.device``; x and y
    lead with the member dimension (``members``), and member s sees the data of its own seed,
    ``seeds[s]``, exactly as a one-member stream of that seed would. All members share the task
    boundaries. The sequence is a pure function of the seeds: starting at step s gives exactly the
    batches an uninterrupted iteration gives from step s, which is what makes checkpoint/resume exact.
    """

    batch_size: int = 1
    #: Steps per task when constant (None when tasks have no fixed length).
    steps_per_task: int | None = None
    device: torch.device = torch.device("cpu")
    #: One seed per member.
    seeds: tuple[int, ...] = (0,)
    #: How many independent learners the stream feeds: the size of the leading dimension of x and y.
    members: int = 1

    @abstractmethod
    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Yield ``(x, y, task)`` from ``start_step`` on, x and y shaped ``(members, batch_size, ...)``."""

    def task_of(self, step: int) -> int:
        if self.steps_per_task is None:
            raise TypeError(f"{type(self).__name__} has no fixed task length")
        return step // self.steps_per_task
