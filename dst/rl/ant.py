"""Slippery Ant (Dohare et al. 2024): Gymnasium's MuJoCo Ant whose ground friction changes every so often.

The authors' code (``lop/envs/slippery_ant.py`` on gym's Ant-v3 and mujoco-py, which no longer install) sets
the sliding friction of the XML's default geom, which every geom of the Ant and the floor inherit, to the
friction in force (torsional and rolling friction stay 0.5 and 0.5), and changes it at the first episode end
after ``change_time`` (2,000,000) steps since the last change. The frictions are a fixed list per seed,
drawn log-uniformly from [0.02, 2] (the authors ship theirs as ``cfg/frictions``: 100 seeds x 50 values, all
in that range). Here the same is done at run time on Gymnasium's current Ant (``Ant-v5``): every geom's
sliding friction is set to the friction in force, from :func:`friction_schedule` (a seeded log-uniform draw)
or from a list the user gives; a list that runs out starts again from its first value.

The environment's whole state (MuJoCo's data, its random generator, the step count of the episode, which
friction is in force and for how long) is in :meth:`SlipperyAnt.state_dict`, so a run resumes exactly.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..streams.base import derive_seed

__all__ = ["FRICTION_RANGE", "SlipperyAnt", "friction_schedule", "require_gymnasium"]

#: the authors' range of frictions, drawn log-uniformly
FRICTION_RANGE = (0.02, 2.0)
_FRICTIONS, _ENV = 71, 72  # seed-derivation keys


def require_gymnasium():
    """Gymnasium with MuJoCo, or an error that names the extra to install."""
    try:
        import gymnasium
        import mujoco  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"the RL benchmarks need Gymnasium with MuJoCo ({error.name} is missing): "
                          'pip install -e ".[rl]"') from None
    return gymnasium


def friction_schedule(seed: int, changes: int, low: float = FRICTION_RANGE[0],
                      high: float = FRICTION_RANGE[1]) -> tuple[float, ...]:
    """``changes`` frictions for ``seed``, log-uniform in [low, high]: exp(U(ln low, ln high))."""
    if not 0 < low <= high:
        raise ConfigError(f"a friction range needs 0 < low <= high, got [{low}, {high}]")
    rng = np.random.default_rng(derive_seed(seed, _FRICTIONS))
    return tuple(float(f) for f in np.exp(rng.uniform(math.log(low), math.log(high), changes)))


class SlipperyAnt:
    """One Gymnasium Ant whose friction follows ``frictions``, changed at the first episode end once
    ``change_time`` steps have passed since the last change. ``step`` returns (obs, reward, terminated,
    truncated) as Gymnasium does; ``friction`` is the one in force. ``episode_steps`` caps an episode (Gymnasium's
    1,000 by default)."""

    def __init__(self, frictions: Sequence[float], change_time: int, seed: int, env_id: str = "Ant-v5",
                 episode_steps: int | None = None) -> None:
        frictions = tuple(float(f) for f in frictions)
        if not frictions:
            raise ConfigError("the friction list is empty: give at least one friction, e.g. frictions=1.0,0.1")
        if any(not math.isfinite(f) or f <= 0 for f in frictions):
            raise ConfigError(f"frictions must be positive, got {list(frictions)}")
        if change_time < 1:
            raise ConfigError(f"change_time must be at least 1 step, got {change_time}")
        gymnasium = require_gymnasium()
        self.env = gymnasium.make(env_id, **({} if episode_steps is None else {"max_episode_steps": episode_steps}))
        self.frictions, self.change_time, self.seed = frictions, int(change_time), int(seed)
        self.observation_size = int(self.env.observation_space.shape[0])
        self.action_size = int(self.env.action_space.shape[0])
        self.index, self.since_change, self.changes = 0, 0, 0
        self._reset_before = False
        self._apply_friction()

    @property
    def friction(self) -> float:
        return self.frictions[self.index % len(self.frictions)]

    def _apply_friction(self) -> None:
        model = self.env.unwrapped.model
        model.geom_friction[:, 0] = self.friction  # every geom: the authors' default-geom friction

    def reset(self) -> np.ndarray:
        """A new episode (the first one seeded from the seed), after a friction change if one is due."""
        if self.since_change >= self.change_time:
            self.index, self.since_change, self.changes = self.index + 1, 0, self.changes + 1
            self._apply_friction()
        if self._reset_before:
            obs, _ = self.env.reset()
        else:
            obs, _ = self.env.reset(seed=derive_seed(self.seed, _ENV) % 2**32)
            self._reset_before = True
        return np.asarray(obs, dtype=np.float32)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool]:
        obs, reward, terminated, truncated, _ = self.env.step(action)
        self.since_change += 1
        return np.asarray(obs, dtype=np.float32), float(reward), bool(terminated), bool(truncated)

    def state_dict(self) -> dict[str, Any]:
        inner = self.env.unwrapped
        return {
            # the whole mjData: positions and velocities, and what the next step reads from the last one (the
            # solver's warm start, the quantities computed before the last integration)
            "data": copy.deepcopy(inner.data),
            "np_random": copy.deepcopy(inner.np_random.bit_generator.state),
            "elapsed": int(self.env._elapsed_steps or 0) if hasattr(self.env, "_elapsed_steps") else 0,
            "index": self.index, "since_change": self.since_change, "changes": self.changes,
            "reset_before": self._reset_before,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index, self.since_change = int(state["index"]), int(state["since_change"])
        self.changes, self._reset_before = int(state["changes"]), bool(state["reset_before"])
        import mujoco

        self._apply_friction()
        if self._reset_before:
            self.env.reset()  # the wrappers' order checks need a reset once; the state below replaces it
        inner = self.env.unwrapped
        mujoco.mj_copyData(inner.data, inner.model, state["data"])
        inner.np_random.bit_generator.state = copy.deepcopy(state["np_random"])
        if hasattr(self.env, "_elapsed_steps"):
            self.env._elapsed_steps = int(state["elapsed"])

    def close(self) -> None:
        self.env.close()
