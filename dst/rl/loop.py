"""The PPO loop: act, collect a rollout, update through the strategy, log, checkpoint; resumes exactly.

It gives what :class:`dst.experiment.Experiment` gives a supervised run: one ``metrics.csv`` row per
``bin_size`` environment steps (``step``, ``task``: the friction period, ``friction``, ``episodic_return``:
the mean return of the episodes that ended in the bin, ``episodes``, ``loss``: the mean PPO loss of the bin's
minibatch updates, the units and connections the strategy refreshed, timing), the plasticity probe at every
friction change (and every ``probe_every`` steps) on a fixed batch of observations, a progress bar,
``config.json`` checks on resume, ``failure.json`` on a non-finite loss, and checkpoints at rollout
boundaries that hold the networks, optimizer, strategy, the environment's whole state, every random state
and the bin in progress, so that a resumed run writes the rows of an uninterrupted one. A run that ends
inside a rollout or a bin keeps its last checkpoint before that point, so running it longer recomputes the
rest exactly.

Actions are drawn as mean + std * z with z from the run's own generator, which also shuffles the
minibatches. The probe batch is drawn once, from a separate copy of the environment under uniformly random
actions (its own seed), so probing never touches the training trajectory.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, NonFiniteLossError
from ..rundir import CHECKPOINT, FAILURE, METRICS, append_metrics, check_config, check_output_dir, write_failure, write_metrics
from ..streams.base import derive_seed
from .ant import SlipperyAnt
from .ppo import ActorCritic, PPOSettings, Rollout, ppo_update

__all__ = ["PPOExperiment"]

_ACTIONS, _PROBE = 81, 82  # seed-derivation keys


class PPOExperiment:
    """PPO on a :class:`SlipperyAnt` with a refresh strategy; ``run(resume)`` returns the member's rows."""

    def __init__(self, env: SlipperyAnt, model: ActorCritic, optimizer: torch.optim.Optimizer, strategy, *,
                 steps: int, settings: PPOSettings, rollout: int, bin_size: int, seed: int, probe_size: int = 1000,
                 make_probe_env=None, out_dir=None, member_dirs=None, checkpoint_every: int | None = None,
                 metadata: dict[str, Any] | list[dict[str, Any]] | None = None, progress: bool = True, probe=None, on_row=None) -> None:
        if rollout % settings.minibatches:
            raise ConfigError(f"the rollout ({rollout} steps) must split into {settings.minibatches} equal minibatches")
        if env.change_time >= steps:
            raise ConfigError(f"change_time ({env.change_time}) is not less than the run's {steps} steps: the "
                              "friction would never change; shorten change_time or run longer")
        self.env, self.model, self.optimizer, self.strategy = env, model, optimizer, strategy
        self.steps, self.settings, self.rollout, self.bin_size = steps, settings, rollout, bin_size
        self.members, self.failed, self.rows = 1, {}, [[]]
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.member_dirs = [Path(d) for d in member_dirs] if member_dirs else ([self.out_dir] if self.out_dir else None)
        self.checkpoint_every = checkpoint_every or 0
        if isinstance(metadata, (list, tuple)):  # the runner gives one per member; this is a population of one
            (metadata,) = metadata
        self.metadata, self.progress, self.probe, self.on_row = metadata, progress, probe, on_row
        self.generator = torch.Generator().manual_seed(derive_seed(seed, _ACTIONS))
        self.probe_batch = self._probe_batch(make_probe_env, seed, probe_size) if probe is not None else None
        self.steps_done = 0

    def _probe_batch(self, make_env, seed: int, size: int) -> torch.Tensor:
        env = make_env()
        rng = np.random.default_rng(derive_seed(seed, _PROBE))
        observations, obs = [], env.reset()
        for _ in range(size):
            observations.append(obs)
            obs, _, terminated, truncated = env.step(rng.uniform(-1, 1, env.action_size))
            if terminated or truncated:
                obs = env.reset()
        env.close()
        return torch.as_tensor(np.stack(observations))[None]  # (1, size, obs): a population of one

    # -- state --------------------------------------------------------------------------------------
    def _state(self, obs: np.ndarray, episode: list[float], pending: dict[str, Any]) -> dict[str, Any]:
        return {"step": self.steps_done, "rows": len(self.rows[0]), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "strategy": self.strategy.state_dict(),
                "env": self.env.state_dict(), "obs": obs, "episode": list(episode), "pending": dict(pending),
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state()}

    def _save(self, obs, episode, pending) -> None:
        tmp = self.out_dir / (CHECKPOINT + ".tmp")
        torch.save(self._state(obs, episode, pending), tmp)
        os.replace(tmp, self.out_dir / CHECKPOINT)

    def _load(self) -> tuple[np.ndarray, list[float], dict[str, Any]] | None:
        path = self.out_dir / CHECKPOINT
        if not path.exists():
            return None
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.strategy.load_state_dict(state["strategy"])
        self.env.load_state_dict(state["env"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.steps_done = int(state["step"])
        written = self.member_dirs[0] / METRICS
        rows = pd.read_csv(written).to_dict("records") if written.exists() and written.stat().st_size else []
        self.rows[0] = rows[: state["rows"]]
        return state["obs"], list(state["episode"]), dict(state["pending"])

    # -- the loop -------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> list[pd.DataFrame]:
        if self.out_dir is not None:
            check_output_dir(self.out_dir, resume=resume)
            if self.metadata is not None:
                check_config(self.out_dir, self.metadata, resume=resume)
        elif resume:
            raise ConfigError("resume needs an out_dir holding a checkpoint")
        restored = self._load() if resume else None
        if restored is None:
            obs, episode = self.env.reset(), [0.0, 0]
            pending = self._fresh_bin()
            self.strategy.on_task_start(0)
            self._run_probe(pending)
        else:
            obs, episode, pending = restored
        if self.member_dirs is not None:
            write_metrics(self.member_dirs[0], self.rows[0])
            (self.member_dirs[0] / FAILURE).unlink(missing_ok=True)
        self.strategy.set_horizon(None)
        bar = tqdm(total=self.steps, initial=self.steps_done, disable=not self.progress, unit="step", leave=False)
        try:
            while self.steps_done < self.steps:
                obs = self._rollout_and_update(obs, episode, pending, bar)
                if self.checkpoint_every and self.out_dir is not None and self.steps_done < self.steps and (
                        self.steps_done // self.checkpoint_every > (self.steps_done - self.rollout) // self.checkpoint_every):
                    self._save(obs, episode, pending)
        finally:
            bar.close()
        if self.out_dir is not None and self.steps_done % self.rollout == 0 and self.steps_done % self.bin_size == 0:
            self._save(obs, episode, pending)  # else the last checkpoint stays: a longer run resumes from there
        return [pd.DataFrame(self.rows[0])]

    def _fresh_bin(self) -> dict[str, Any]:
        return {"returns": [], "losses": [], "units": 0, "connections": 0, "start": time.perf_counter(), "probe": {}}

    def _rollout_and_update(self, obs: np.ndarray, episode: list, pending: dict, bar) -> np.ndarray:
        size = min(self.rollout, self.steps - self.steps_done)
        observations, actions, log_probs, rewards, dones = [], [], [], [], []
        for _ in range(size):
            x = torch.as_tensor(obs)
            with torch.no_grad():
                distribution = self.model.distribution(x)
                action = distribution.mean + distribution.stddev * torch.randn(
                    distribution.mean.shape, generator=self.generator)
                log_prob = distribution.log_prob(action).sum()
            next_obs, reward, terminated, truncated = self.env.step(action.numpy())
            observations.append(x)
            actions.append(action)
            log_probs.append(log_prob)
            rewards.append(reward)
            dones.append(float(terminated or truncated))
            episode[0] += reward
            episode[1] += 1
            self.steps_done += 1
            if terminated or truncated:
                pending["returns"].append(episode[0])
                episode[0], episode[1] = 0.0, 0
                before = self.env.changes
                obs = self.env.reset()
                if self.env.changes != before:  # a new friction: a new task
                    self.strategy.on_task_start(self.env.changes)
                    self._run_probe(pending)
            else:
                obs = next_obs
            if self.steps_done % self.bin_size == 0 or self.steps_done == self.steps:
                self._emit(pending)
                pending.clear()
                pending.update(self._fresh_bin())
                if self.probe is not None and self.probe.every and self.steps_done % self.probe.every == 0:
                    self._run_probe(pending)
            bar.update(1)
        if size == self.rollout:  # a whole rollout: one PPO update
            rollout = Rollout(torch.stack(observations), torch.stack(actions), torch.stack(log_probs),
                              torch.tensor(rewards), torch.tensor(dones), torch.as_tensor(obs))
            result = ppo_update(self.model, self.optimizer, self.strategy, rollout, self.settings, self.generator)
            if not math.isfinite(result["loss"]):
                self._fail(result["loss"])
            # the bin in progress takes the update (when the rollout ended a bin, the next one)
            pending["losses"].append(result["loss"])
            pending["units"] += int(np.sum(result["units_replaced"]))
            pending["connections"] += int(np.sum(result["connections_regrown"]))
        return obs

    def _run_probe(self, pending: dict) -> None:
        if self.probe is not None:
            pending["probe"] = self.probe(self.model, self.strategy.topology, self.probe_batch)[0]

    def _emit(self, pending: dict) -> None:
        seconds = time.perf_counter() - pending["start"]
        steps_in_bin = self.steps_done - (self.rows[0][-1]["step"] if self.rows[0] else 0)
        returns = pending["returns"]
        row = {"step": self.steps_done, "task": self.env.changes, "friction": self.env.friction,
               "episodic_return": float(np.mean(returns)) if returns else math.nan, "episodes": len(returns),
               "loss": float(np.mean(pending["losses"])) if pending["losses"] else math.nan,
               "units_replaced": pending["units"], "connections_regrown": pending["connections"],
               "seconds": seconds, "seconds_per_step": seconds / max(1, steps_in_bin), **pending["probe"]}
        self.rows[0].append(row)
        if self.member_dirs is not None:
            append_metrics(self.member_dirs[0], row, list(self.rows[0][0]))
        if self.on_row is not None:
            self.on_row([row])

    def _fail(self, value: float) -> None:
        error = NonFiniteLossError(self.steps_done, value, "")
        self.failed[0] = (self.steps_done, str(error))
        if self.member_dirs is not None:
            write_failure(self.member_dirs[0], "non-finite-loss", str(error), self.steps_done)
        raise error
