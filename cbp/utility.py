"""Unit utilities of continual backpropagation (Dohare et al. 2024), for every member of a population.

Member layout: a hidden layer's statistics are (S, units) tensors on the model's device, S the number of
members (1 for a plain torch model); a per-member setting (the decay rate eta) is an (S, 1) column that
broadcasts over the units. An activation h (S, batch, units[, H, W]) is averaged over the batch (and a
conv channel's positions) within each member.

For hidden unit i with activation h_i, bias-corrected running mean f_hat_i, outgoing weights w_out[:, i]
and incoming weights w_in[i, :], the instantaneous utility y_i is

    contribution            y_i = |h_i| * mean|w_out|
    adaptation              y_i = 1 / mean|w_in|
    zero_contribution       y_i = |h_i - f_hat_i| * mean|w_out|
    adaptable_contribution  y_i = |h_i - f_hat_i| * mean|w_out| / mean|w_in|   (the paper's overall utility)
    weight                  y_i = mean|w_out|
    random                  a fresh uniform draw at every step (from the strategy's member-keyed random numbers)

(the weight part comes from :mod:`cbp.weights`). Every step, the paper's recursions:

    age_i += 1
    f_i <- eta f_i + (1 - eta) h_i          f_hat_i = f_i / (1 - eta^age_i)
    u_i <- eta u_i + (1 - eta) y_i          u_hat_i = u_i / (1 - eta^age_i)

and units are ranked by the bias-corrected u_hat (ranking by the raw u would re-replace just-matured units).
The update is written once and runs on torch tensors or, for small CPU layers, on numpy views of the same
memory (:mod:`dst.arrays`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dst.arrays import Arrays
from dst.population import MemberRandom
from dst.surgery import UnitSelection
from dst.topology import HiddenLayer

__all__ = ["UTILITIES", "UnitUtility"]

UTILITIES = (
    "contribution",
    "adaptation",
    "adaptable_contribution",
    "zero_contribution",
    "weight",
    "random",
)

Array = torch.Tensor | np.ndarray


def _batch_mean(h: Array) -> Array:
    """(S, batch, units[, H, W]) -> (S, units): the mean over the batch and a channel's positions."""
    axes = (1, *range(3, h.ndim))
    count = 1
    for axis in axes:
        count *= h.shape[axis]
    return h.sum(axes) / count


def _corrected(running: Array, decay_power: Array) -> Array:
    """running / (1 - eta^age): the bias correction of a running average that started at 0."""
    return running / (1 - decay_power)


class UnitUtility:
    """Age, running mean f and running utility u of one hidden layer's units, for every member.

    ``decay_rate`` is eta, one value per member (or one for all). f, u and eta^age sit in one
    (3, S, units) tensor ``block`` (views ``mean``, ``utility``, ``decay_power``), so one multiplication
    decays all three and a reset writes them at once; ``age`` is a host step counter minus each unit's
    birth step. ``random`` (the strategy's member-keyed random numbers) and ``draw`` feed the ``random``
    utility. With ``arrays`` on the host, :meth:`update` takes numpy arrays and writes numpy views of
    the same tensors.
    """

    def __init__(
        self,
        layer: HiddenLayer,
        kind: str,
        decay_rate: float | Sequence[float],
        *,
        random: MemberRandom | None = None,
        draw: int = 0,
        arrays: Arrays | None = None,
    ) -> None:
        if kind not in UTILITIES:
            raise ValueError(f"unknown utility {kind!r}; use one of {', '.join(UTILITIES)}")
        if kind == "random" and random is None:
            raise ValueError("the random utility needs the strategy's random numbers (random=...)")
        weight = layer.incoming()
        members, units = weight.shape[:2]
        self.layer, self.kind, self.random, self.draw = layer, kind, random, draw
        self.steps = 0
        self.born = torch.zeros(members, units, dtype=torch.long, device=weight.device)
        self.block = torch.zeros(3, members, units, dtype=weight.dtype, device=weight.device)
        self.mean, self.utility, self.decay_power = self.block.unbind(0)
        self.decay_power.fill_(1)
        eta = torch.as_tensor(decay_rate, dtype=weight.dtype, device=weight.device).reshape(-1, 1)
        self.eta = eta.expand(members, 1).contiguous()  # (S, 1)
        self.rate = 1 - self.eta  # the weight 1 - eta of this step's value
        arrays = arrays or Arrays(host=False)
        block = arrays.state(self.block)
        # numpy multiplies arrays of one shape faster than it broadcasts a column: full-shaped copies there
        shape = (members, units) if arrays.host else (members, 1)
        decay = arrays.state(self.eta.expand(3, *shape).contiguous())  # eta for each of f, u and eta^age
        rate = arrays.state(self.rate.expand(shape).contiguous())
        self._arrays = (block, block[0], block[1], block[2], decay, rate)
        self._deviation = kind in ("zero_contribution", "adaptable_contribution")
        self._fresh = torch.tensor([0.0, 0.0, 1.0], dtype=weight.dtype, device=weight.device)[:, None]

    @property
    def age(self) -> torch.Tensor:
        """(S, units): steps since each unit was (re)initialised."""
        return self.steps - self.born

    def update(self, h: Array, weight_factor: Array | None) -> None:
        """One step from this step's activation ``h`` (S, batch, units[, H, W], detached) and the layer's
        weight factor (S, units) from :class:`cbp.weights.WeightFactors` (None for ``random``): torch
        tensors, or numpy arrays on the host (see :class:`dst.arrays.Arrays`)."""
        block, mean, utility, decay_power, eta, rate = self._arrays
        single = h.ndim == 3 and h.shape[1] == 1  # batch 1, MLP: nothing to average
        if single:
            h = h[:, 0]
        self.steps += 1
        block *= eta  # f, u and eta^age all decay by eta, so that with the next lines
        mean += rate * (h if single else _batch_mean(h))  # f <- eta f + (1 - eta) h
        if self._deviation:  # zero_contribution, adaptable_contribution: |h - f_hat| times the weight factor
            f_hat = _corrected(mean, decay_power)
            if single:
                deviation = abs(h - f_hat)
            else:
                deviation = _batch_mean(abs(h - f_hat.reshape(*f_hat.shape[:1], 1, -1, *(1,) * (h.ndim - 3))))
            y = deviation * weight_factor
        elif self.kind == "random":
            return
        elif self.kind == "contribution":
            y = (abs(h) if single else _batch_mean(abs(h))) * weight_factor  # |h| mean|w_out|
        else:  # adaptation, weight
            y = weight_factor
        utility += rate * y  # u <- eta u + (1 - eta) y

    def corrected_utility(self, members: torch.Tensor | None = None) -> torch.Tensor:
        """u_hat, what units are ranked by: (S, units), or (M, units) for ``members``. For the ``random``
        utility, this step's fresh uniform draws."""
        if self.kind == "random":
            units = self.block.shape[2]
            return self.random.uniform((units,), step=self.steps, draw=self.draw, members=members)
        if members is None:
            return _corrected(self.utility, self.decay_power)
        return _corrected(self.utility[members], self.decay_power[members])

    def corrected_mean(self, selection: UnitSelection | None = None) -> torch.Tensor:
        """f_hat, the bias-corrected mean activation: (S, units), or one value per selected unit."""
        if selection is None:
            return _corrected(self.mean, self.decay_power)
        index = (selection.members, selection.units)
        return _corrected(self.mean[index], self.decay_power[index])

    @torch.no_grad()
    def reset(self, selection: UnitSelection) -> None:
        """The selected units start afresh: age 0, f = u = 0 (and eta^0 = 1)."""
        self.born[selection.members, selection.units] = self.steps
        self.block[:, selection.members, selection.units] = self._fresh

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        return {"steps": self.steps, "born": self.born.clone(), "block": self.block.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        self.steps = int(state["steps"])
        self.born.copy_(state["born"])
        self.block.copy_(state["block"])
