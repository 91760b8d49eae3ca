"""How many units each member of a population replaces in one hidden layer at each step (host side).

CBP's rule, per member s with replacement rate r_s and maturity threshold m_s: a unit is eligible once
it is older than m_s steps; every step the accumulator gains r_s times the number of eligible units,
and its whole part is replaced (the lowest-utility eligible units), so that the units replaced up to
step t are floor(r_s * A_s(t)), A_s(t) being the eligible unit-steps so far. A replaced unit is eligible
again m_s + 1 steps later. Counting only eligible units avoids a burst that wipes a layer when the first
units mature; the mean life of a unit is about 1 / r_s.

Everything here is host integers in numpy arrays of shape (S,): which steps change anything is known
in advance, so a step that replaces nothing costs one comparison and never touches the device. The
exact accumulator is kept as the integer A_s and the count replaced so far, so a member's replacement
steps are a function of its own settings only (no float sum whose rounding depends on when it was
updated), and member s of a population replaces exactly what a population of one does.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["Turnover"]

_NEVER = np.iinfo(np.int64).max


class Turnover:
    """Eligibility and the replacement accumulator of one hidden layer, for every member.

    ``rate`` (S,) float and ``maturity`` (S,) int are the members' settings. :meth:`take` is called once
    per step, in step order, and returns how many units each member replaces then ((S,) int64), or None
    when no member replaces any. ``probabilistic`` is the released code's rounding instead of the exact
    accumulator: with r e < 1 expected units, one unit with probability r e, else floor(r e); it draws
    (S,) uniforms per step from ``uniform(step)``.
    """

    def __init__(
        self,
        units: int,
        rate: np.ndarray,
        maturity: np.ndarray,
        *,
        uniform: Callable[[int], np.ndarray] | None = None,
    ) -> None:
        self.units = units
        self.rate = np.asarray(rate, dtype=np.float64)
        self.maturity = np.asarray(maturity, dtype=np.int64)
        self.uniform = uniform
        members = self.rate.shape[0]
        self.eligible = np.zeros(members, np.int64)  # units older than the maturity threshold
        self.unit_steps = np.zeros(members, np.int64)  # A: eligible unit-steps up to step `since`
        self.replaced = np.zeros(members, np.int64)  # units replaced up to step `since`
        self.since = 0
        self.arrivals: dict[int, np.ndarray] = {}  # step -> units that become eligible then, per member
        self._arrival_steps: list[int] = []  # a heap of the keys of `arrivals`
        self._mature_later(0, np.full(members, units, np.int64))
        self.next_change = self._next_change()

    def _mature_later(self, step: int, counts: np.ndarray) -> None:
        """Units (re)born at ``step`` (``counts`` per member) become eligible at step + m + 1."""
        members = np.flatnonzero(counts)
        arrival = step + 1 + self.maturity[members]
        for when in np.unique(arrival).tolist():  # one key for a shared threshold
            if when not in self.arrivals:
                self.arrivals[when] = np.zeros_like(counts)
                heapq.heappush(self._arrival_steps, when)
            chosen = members[arrival == when]
            self.arrivals[when][chosen] += counts[chosen]

    def _first_owed(self) -> int:
        """The first step after ``since`` at which some member owes a unit: the least t with
        floor(r (A + (t - since) e)) > replaced, found from a division and made exact by checking it
        (the product is monotone in t, so one step either way settles rounding)."""
        active = self.rate * self.eligible > 0
        if not active.any():
            return _NEVER
        rate, eligible, unit_steps = self.rate[active], self.eligible[active], self.unit_steps[active]
        goal = self.replaced[active] + 1

        def owed(steps: np.ndarray) -> np.ndarray:
            return np.floor(rate * (unit_steps + steps * eligible)) >= goal

        ahead = np.ceil((goal / rate - unit_steps) / eligible)
        ahead = np.clip(ahead, 1, 2**40).astype(np.int64)  # 2^40 steps: never, and no int64 overflow
        ahead = np.where(owed(ahead), ahead, ahead + 1)
        ahead = np.where((ahead > 1) & owed(ahead - 1), ahead - 1, ahead)
        return self.since + int(ahead.min())

    def _next_change(self) -> int:
        if self.uniform is not None:  # probabilistic rounding: a draw at every step with units eligible
            return self.since + 1 if (self.rate * self.eligible > 0).any() else self._next_arrival()
        return min(self._first_owed(), self._next_arrival())

    def _next_arrival(self) -> int:
        return self._arrival_steps[0] if self._arrival_steps else _NEVER

    def take(self, step: int) -> np.ndarray | None:
        """How many units each member replaces at ``step`` (once per step, in order), or None if none."""
        if step < self.next_change:
            return None
        self.unit_steps += (step - 1 - self.since) * self.eligible  # through the previous step
        if self._arrival_steps and self._arrival_steps[0] == step:
            heapq.heappop(self._arrival_steps)
            self.eligible += self.arrivals.pop(step)
        self.unit_steps += self.eligible
        if self.uniform is None:
            owed = np.floor(self.rate * self.unit_steps).astype(np.int64) - self.replaced
        else:
            expected = self.rate * self.eligible
            owed = np.where(expected < 1, (self.uniform(step) <= expected) & (self.eligible > 0),
                            np.floor(expected)).astype(np.int64)
        counts = np.minimum(owed, self.eligible)
        self.since = step
        if not counts.any():
            self.next_change = self._next_change()
            return None
        self.replaced += counts
        self.eligible -= counts
        self._mature_later(step, counts)
        self.next_change = self._next_change()
        return counts

    def state_dict(self) -> dict[str, Any]:
        return {
            "eligible": self.eligible.copy(),
            "unit_steps": self.unit_steps.copy(),
            "replaced": self.replaced.copy(),
            "since": self.since,
            "arrivals": {when: counts.copy() for when, counts in self.arrivals.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.eligible = np.array(state["eligible"], np.int64)
        self.unit_steps = np.array(state["unit_steps"], np.int64)
        self.replaced = np.array(state["replaced"], np.int64)
        self.since = int(state["since"])
        self.arrivals = {int(when): np.array(counts, np.int64) for when, counts in state["arrivals"].items()}
        self._arrival_steps = sorted(self.arrivals)
        self.next_change = self._next_change()
