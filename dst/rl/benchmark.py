"""The ``slippery-ant`` benchmark: PPO on Slippery Ant (Dohare et al. 2024), with any refresh strategy.

Registered with the other benchmarks, so ``python -m dst run``, comparisons and studies take it by name; its
loop is :class:`dst.rl.loop.PPOExperiment` (``make_experiment``). Its "stream" is the environment, its model
the actor-critic, its optimizer Adam over both networks. The defaults are the authors' (``lop/rl/cfg/sant``):
20M steps, friction changed every 2M, PPO with 2,048-step rollouts, 10 epochs of 16 minibatches, Adam lr
1e-4 (``betas=0.99,0.99`` is "NS Adam"), 256-256 ReLU networks with LeCun initialisation. Their L2 runs use
weight decay 1e-3, and their CBP runs NS Adam with weight decay 1e-4, replacement rate 1e-4, maturity 10,000
and the contribution utility (``--bench weight_decay=...``, ``--set ...``). A population of one per run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..benchmarks import Benchmark, BenchmarkConfig, register
from ..config import setting
from ..errors import ConfigError
from ..init import INIT_SCHEMES
from ..nets import ACTIVATION_MODULES
from .ant import SlipperyAnt, friction_schedule
from .loop import PPOExperiment
from .ppo import ActorCritic, PPOSettings

__all__ = ["SlipperyAntConfig", "SlipperyAntBenchmark"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlipperyAntConfig(BenchmarkConfig):
    optimizer: str = setting("adam", choices=("adam", "elementwise-adam"), help="Adam (the authors'), or with per-element step counts")
    lr: float = setting(1e-4, low=0.0, low_open=True, search=(1e-5, 1e-3), log=True, help="Adam step size")
    betas: tuple[float, ...] = setting((0.9, 0.999), low=0.0, high=1.0, high_open=True, help="Adam betas (NS Adam: 0.99,0.99)")
    change_time: int = setting(2_000_000, low=1, help="steps between friction changes (at the next episode end)")
    schedule: str = setting("log-uniform", choices=("log-uniform", "list"),
                            help="frictions drawn per seed, log-uniform in friction_range, or the frictions given")
    friction_range: tuple[float, ...] = setting((0.02, 2.0), low=0.0, low_open=True, help="log-uniform draws' range")
    frictions: tuple[float, ...] = setting((), help="schedule=list: the frictions in order (repeated when they run out)")
    total_steps: int = setting(20_000_000, low=1, help="environment steps when --steps is not given")
    episode_steps: int = setting(1000, low=1, help="the longest episode (Gymnasium's time limit)")
    rollout: int = setting(2048, low=2, help="environment steps per PPO update")
    epochs: int = setting(10, low=1, help="passes over each rollout")
    minibatches: int = setting(16, low=1, help="minibatches per pass")
    gamma: float = setting(0.99, low=0.0, high=1.0, help="discount")
    lam: float = setting(0.95, low=0.0, high=1.0, help="GAE lambda")
    clip: float = setting(0.2, low=0.0, low_open=True, help="PPO clip epsilon")
    hidden: tuple[int, ...] = setting((256, 256), low=1, help="hidden widths of the policy and the value network")
    activation: str = setting("relu", choices=tuple(ACTIVATION_MODULES), help="hidden activation")
    init: str = setting("lecun", choices=INIT_SCHEMES, help="weight initialisation (the authors': lecun)")
    bin_size: int = setting(10_000, low=1, help="environment steps per metrics row")
    probe_size: int = setting(1000, low=1, help="probe observations (a fixed batch from a random-action episode)")

    def validate(self) -> None:
        super().validate()
        if self.batch_size != 1:
            raise ConfigError(f"{self.owner}: PPO's batch is its rollout: set rollout= and minibatches=, not "
                              f"batch_size ({self.batch_size})")
        if self.rollout % self.minibatches:
            raise ConfigError(f"{self.owner}: a rollout of {self.rollout} steps does not split into "
                              f"{self.minibatches} equal minibatches")
        if self.schedule == "list" and not self.frictions:
            raise ConfigError(f"{self.owner}: schedule=list needs frictions, e.g. --bench frictions=1.0,0.1,2.0")
        if self.schedule != "list" and self.frictions:
            raise ConfigError(f"{self.owner}: frictions are given but schedule is {self.schedule!r}; add "
                              "--bench schedule=list to use them")
        if any(f <= 0 for f in self.frictions):
            raise ConfigError(f"{self.owner}: frictions must be positive, got {list(self.frictions)}")
        if len(self.friction_range) != 2 or self.friction_range[0] > self.friction_range[1]:
            raise ConfigError(f"{self.owner}: friction_range takes low,high with low <= high, got {self.friction_range}")


@register("slippery-ant")
class SlipperyAntBenchmark(Benchmark):
    """PPO on Gymnasium's Ant whose friction changes every ``change_time`` steps (the ``rl`` extra)."""

    Config = SlipperyAntConfig
    task_type = "reinforcement"
    batchable = False  # one MuJoCo simulation per run
    presets = {
        "paper": dict(total_steps=20_000_000, change_time=2_000_000),
        # found by experiment (docs/results.md): a 64-64 net at lr 3e-4 learns within 100k steps, so seven
        # friction periods fit in about 10 CPU-minutes per run
        "cpu": dict(total_steps=700_000, change_time=100_000, hidden=(64, 64), lr=3e-4),
        "smoke": dict(total_steps=600, change_time=200, episode_steps=50, rollout=64, epochs=2, minibatches=4,
                      hidden=(16, 16), bin_size=100, probe_size=50),
    }

    def _env(self, seed: int) -> SlipperyAnt:
        c = self.config
        frictions = c.frictions if c.schedule == "list" else friction_schedule(
            seed, max(1, c.total_steps // c.change_time + 1), *c.friction_range)
        return SlipperyAnt(frictions, c.change_time, seed, episode_steps=c.episode_steps)

    def build(self, seeds, device, lr=None):
        """As every benchmark's, but on the CPU: a MuJoCo step per action makes the simulation the cost, and
        the networks stay beside it (a warning says so when another device was asked for)."""
        if torch.device(device).type != "cpu":
            log.warning("slippery-ant runs on the CPU (one MuJoCo step per action; the networks stay beside "
                        "the simulation), not on %s", device)
        return super().build(seeds, "cpu", lr)

    def make_stream(self, seeds: tuple[int, ...], device: torch.device) -> SlipperyAnt:
        (seed,) = seeds  # not batchable: one member
        return self._env(seed)

    def make_model(self, generators: list[torch.Generator]) -> nn.Module:
        (generator,) = generators
        probe = self._env(0)  # the observation and action sizes of the environment
        sizes = probe.observation_size, probe.action_size
        probe.close()
        c = self.config
        return ActorCritic(*sizes, c.hidden, c.activation, init=c.init, generator=generator)

    def default_steps(self, stream: Any) -> int:
        return self.config.total_steps

    def bin_steps(self, stream: Any) -> int:
        return self.config.bin_size

    def make_experiment(self, stream, model: nn.Module, optimizer, strategy, **loop: Any) -> PPOExperiment:
        c = self.config
        settings = PPOSettings(c.gamma, c.lam, c.clip, c.epochs, c.minibatches)
        return PPOExperiment(stream, model, optimizer, strategy, settings=settings, rollout=c.rollout,
                             seed=stream.seed, probe_size=c.probe_size, make_probe_env=lambda: self._env(stream.seed),
                             **loop)
