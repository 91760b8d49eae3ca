"""Slippery Ant: the friction schedule, friction changes at episode ends, exact state round trips, bad input."""

from __future__ import annotations

import builtins
import math

import numpy as np
import pytest

from dst.errors import ConfigError
from dst.rl.ant import FRICTION_RANGE, SlipperyAnt, friction_schedule, require_gymnasium

gymnasium = pytest.importorskip("gymnasium", reason='the rl extra (pip install -e ".[test,rl]") is not installed')


def test_frictions_are_log_uniform_in_the_authors_range_and_a_function_of_the_seed():
    draws = np.array(friction_schedule(3, 20_000))
    assert draws.min() >= FRICTION_RANGE[0] and draws.max() <= FRICTION_RANGE[1]
    logs = np.log(draws)
    low, high = math.log(FRICTION_RANGE[0]), math.log(FRICTION_RANGE[1])
    # uniform on the log scale: each quarter of [ln 0.02, ln 2] holds a quarter of the draws
    counts = np.histogram(logs, bins=4, range=(low, high))[0] / draws.size
    assert np.allclose(counts, 0.25, atol=0.015)
    assert friction_schedule(3, 5) == tuple(draws[:5]) and friction_schedule(4, 5) != friction_schedule(3, 5)


def _run(env, steps, seed=0):
    """Random actions of a fixed generator; the (obs, reward, friction) seen, resetting at episode ends."""
    rng = np.random.default_rng(seed)
    seen = []
    for _ in range(steps):
        obs, reward, terminated, truncated = env.step(rng.uniform(-1, 1, env.action_size))
        seen.append((obs, reward, env.friction))
        if terminated or truncated:
            env.reset()
    return seen


def test_every_geom_takes_the_friction_in_force_and_it_changes_only_at_an_episode_end():
    env = SlipperyAnt([0.5, 0.1], change_time=30, seed=0)
    env.reset()
    model = env.env.unwrapped.model
    assert np.all(model.geom_friction[:, 0] == 0.5) and np.all(model.geom_friction[:, 1:] == 0.5)
    _run(env, 40)  # past change_time, but the first episode has not ended
    assert env.friction == 0.5 and env.since_change == 40
    env.reset()  # an episode ends: the change is due
    assert env.friction == 0.1 and np.all(model.geom_friction[:, 0] == 0.1) and env.changes == 1
    for _ in range(2):  # a list that runs out starts again
        env.since_change = 30
        env.reset()
    assert env.friction == 0.1 and env.changes == 3


def test_a_restored_environment_continues_exactly():
    env = SlipperyAnt([1.0, 0.05], change_time=25, seed=1, episode_steps=20)
    env.reset()
    _run(env, 67, seed=2)  # mid-episode, mid-friction
    state = env.state_dict()
    after = _run(env, 80, seed=3)
    assert len({friction for _, _, friction in after}) == 2  # the rest crosses episode ends and friction changes
    other = SlipperyAnt([1.0, 0.05], change_time=25, seed=1, episode_steps=20)
    other.load_state_dict(state)
    again = _run(other, 80, seed=3)
    for (obs, reward, friction), (obs2, reward2, friction2) in zip(after, again):
        assert np.array_equal(obs, obs2) and reward == reward2 and friction == friction2


@pytest.mark.parametrize("frictions, change_time, message", [
    ([], 10, "friction list is empty"), ([1.0, 0.0], 10, "must be positive"), ([1.0, -2], 10, "must be positive"),
    ([1.0], 0, "change_time must be at least 1"),
])
def test_bad_frictions_and_change_times_are_clear_errors(frictions, change_time, message):
    with pytest.raises(ConfigError, match=message):
        SlipperyAnt(frictions, change_time, seed=0)


def test_missing_mujoco_names_the_extra_to_install(monkeypatch):
    real = builtins.__import__

    def without_mujoco(name, *args, **kwargs):
        if name == "mujoco":
            raise ImportError("No module named 'mujoco'", name="mujoco")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_mujoco)
    with pytest.raises(ConfigError, match=r'mujoco is missing.*pip install -e "\.\[rl\]"'):
        require_gymnasium()
