"""Small shared fixtures: tiny, seeded networks that train in milliseconds."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from dst import nets


@pytest.fixture
def tiny_mlp() -> Callable[..., nn.Sequential]:
    """Factory for ``6 -> 5 -> 4 -> 3`` ReLU MLPs (hidden sizes overridable), seeded for repeatability."""

    def make(
        hidden=(5, 4), in_features: int = 6, out_features: int = 3, activation: str = "relu", seed: int = 0
    ) -> nn.Sequential:
        return nets.mlp(
            in_features,
            list(hidden),
            out_features,
            activation,
            generator=torch.Generator().manual_seed(seed),
        )

    return make


@pytest.fixture
def tiny_convnet() -> Callable[..., nn.Sequential]:
    """Factory for a two-conv net on 2x14x14 images.

    Layout: conv(2->4, 3) relu pool | conv(4->6, 3) relu pool | flatten (6 * 2 * 2 = 24) |
    linear(24->8) relu | linear(8->3). So the conv->conv unit block is 1 and the conv->linear block is 4.
    """

    def make(seed: int = 0) -> nn.Sequential:
        return nets.convnet(
            2,
            14,
            3,
            channels=(4, 6),
            kernel_sizes=(3, 3),
            hidden=(8,),
            generator=torch.Generator().manual_seed(seed),
        )

    return make


@pytest.fixture(autouse=True)
def single_thread():
    """Every test runs on one intra-op thread: for tensors this small, thread hand-offs cost more than the math,
    and on a busy two-core machine spinning OpenMP workers make tiny tests tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_step(net: nn.Module, opt: torch.optim.Optimizer, strategy, x: torch.Tensor, y: torch.Tensor):
    """One step of the strategy protocol on an MSE loss; returns the strategy's RefreshStats."""
    loss = ((net(x) - y) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    strategy.before_step()
    opt.step()
    return strategy.after_step()


@pytest.fixture
def check_resume():
    """``check(make, data, split)``: a run snapshotted at ``split`` and resumed in fresh objects ends
    exactly where an uninterrupted run ends. ``make()`` returns (net, optimizer, strategy). Returns the
    RefreshStats of the resumed part, uninterrupted and resumed."""
    import copy

    def check(make, data, split):
        net_a, opt_a, strat_a = make()
        for x, y in data[:split]:
            train_step(net_a, opt_a, strat_a, x, y)
        saved = copy.deepcopy((net_a.state_dict(), opt_a.state_dict(), strat_a.state_dict()))
        stats_a = [train_step(net_a, opt_a, strat_a, x, y) for x, y in data[split:]]
        net_b, opt_b, strat_b = make()
        net_b.load_state_dict(saved[0])
        opt_b.load_state_dict(saved[1])
        strat_b.load_state_dict(saved[2])
        stats_b = [train_step(net_b, opt_b, strat_b, x, y) for x, y in data[split:]]
        for (name, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values()):
            assert torch.equal(a, b), name
        return stats_a, stats_b

    return check
