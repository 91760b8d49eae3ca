"""PPO in the CleanRL style, as the authors' continual-RL code runs it (``lop/algos/rl/ppo.py``).

The agent is two MLPs with LeCun-uniform weights and zero biases: a policy whose outputs are the means of a
diagonal Gaussian with one learned, state-independent log standard deviation per action dimension (0 at the
start), and a value function. One optimizer trains all their parameters (Adam, lr 1e-4; "NS Adam" is betas
(0.99, 0.99)). After every ``rollout`` (2,048) environment steps:

- advantages by GAE, delta_t = r_t + gamma (1 - d_t) V(o_{t+1}) - V(o_t) and
  A_t = delta_t + gamma lambda (1 - d_t) A_{t+1} (gamma 0.99, lambda 0.95), where d_t marks an episode end,
  a time limit included (as in the authors' code); value targets A_t + V(o_t); advantages standardised;
- ``epochs`` (10) passes over the rollout in ``minibatches`` (16) shuffled minibatches, each one update of
  the clipped objective plus the squared value error, unweighted:
  L = mean(max(-rho A, -clip(rho, 1 - eps, 1 + eps) A)) + mean((R - V(o))^2), rho = pi(a|o) / pi_old(a|o),
  eps 0.2.

Where the refresh strategy acts: every minibatch update is one optimizer step, and it runs as a supervised
step does, ``loss.backward()`` -> ``strategy.before_step()`` -> ``optimizer.step()`` ->
``strategy.after_step()`` (the authors run CBP's generate-and-test after each minibatch update too). The
strategy sees both networks through :meth:`ActorCritic.unit_graph`; the activations it captures are those of
the minibatch's forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Normal

from ..nets import mlp
from ..topology import HiddenLayer, Topology

__all__ = ["ActorCritic", "Rollout", "PPOSettings", "advantages", "ppo_update"]


class ActorCritic(nn.Module):
    """The policy's mean network, its log standard deviations, and the value network."""

    def __init__(self, observations: int, actions: int, hidden: tuple[int, ...] = (256, 256),
                 activation: str = "relu", *, init: str = "lecun", generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.policy = mlp(observations, hidden, actions, activation, init=init, generator=generator)
        self.value = mlp(observations, hidden, 1, activation, init=init, generator=generator)
        self.log_std = nn.Parameter(torch.zeros(actions))

    def unit_graph(self) -> list[HiddenLayer]:
        """The hidden layers of both networks (policy first), each network's own chain."""
        layers = []
        for prefix, net in (("policy", self.policy), ("value", self.value)):
            for layer in Topology.from_model(net).hidden_layers:
                layers.append(HiddenLayer(f"{prefix}.{layer.name}", layer.producer, layer.consumer,
                                          layer.activation, layer.block, layer.norm))
        return layers

    def distribution(self, observations: torch.Tensor) -> Normal:
        return Normal(self.policy(observations), self.log_std.exp())

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """The action means and the value side by side (what the probe passes observations through)."""
        return torch.cat((self.policy(observations), self.value(observations)), -1)


@dataclass
class Rollout:
    """``rollout`` steps: observations (T, obs), actions (T, act), log-probabilities under the acting policy
    (T,), rewards (T,), episode ends (T,), and the observation after the last step."""

    observations: torch.Tensor
    actions: torch.Tensor
    log_probs: torch.Tensor
    rewards: torch.Tensor
    dones: torch.Tensor
    last_observation: torch.Tensor


@dataclass(frozen=True)
class PPOSettings:
    gamma: float = 0.99
    lam: float = 0.95
    clip: float = 0.2
    epochs: int = 10
    minibatches: int = 16


@torch.no_grad()
def advantages(values: torch.Tensor, rewards: torch.Tensor, dones: torch.Tensor, gamma: float, lam: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE from ``values`` (T + 1,: V(o_0..o_T)); returns (advantages (T,), value targets (T,))."""
    steps = rewards.shape[0]
    result = torch.zeros(steps + 1, dtype=values.dtype, device=values.device)
    keep = 1.0 - dones
    for t in reversed(range(steps)):
        delta = rewards[t] + gamma * keep[t] * values[t + 1] - values[t]
        result[t] = delta + gamma * lam * keep[t] * result[t + 1]
    return result[:-1], result[:-1] + values[:-1]


def ppo_update(model: ActorCritic, optimizer: torch.optim.Optimizer, strategy, rollout: Rollout,
               settings: PPOSettings, generator: torch.Generator) -> dict[str, object]:
    """One PPO update on ``rollout``: its minibatch steps, each through the strategy's hooks. Returns the mean
    loss and the strategy's counts of units and connections refreshed."""
    with torch.no_grad():
        values = model.value(torch.cat((rollout.observations, rollout.last_observation[None]))).squeeze(-1)
    advantage, target = advantages(values, rollout.rewards, rollout.dones, settings.gamma, settings.lam)
    advantage = advantage - advantage.mean()
    spread = advantage.std()
    if spread > 0 and torch.isfinite(spread):
        advantage = advantage / spread
    count = rollout.rewards.shape[0]
    size = count // settings.minibatches
    losses, units, connections = [], 0, 0
    for _ in range(settings.epochs):
        order = torch.randperm(count, generator=generator).to(rollout.observations.device)
        for start in range(0, count, size):
            index = order[start : start + size]
            log_prob = model.distribution(rollout.observations[index]).log_prob(rollout.actions[index]).sum(-1)
            ratio = (log_prob - rollout.log_probs[index]).exp()
            gain = advantage[index]
            policy_loss = torch.max(-ratio * gain, -ratio.clamp(1 - settings.clip, 1 + settings.clip) * gain).mean()
            value_loss = (target[index] - model.value(rollout.observations[index]).squeeze(-1)).pow(2).mean()
            loss = policy_loss + value_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            strategy.before_step()
            optimizer.step()
            stats = strategy.after_step()
            units = units + stats.units_replaced
            connections = connections + stats.connections_regrown
            losses.append(loss.detach())
    return {"loss": float(torch.stack(losses).mean()), "units_replaced": units, "connections_regrown": connections}
