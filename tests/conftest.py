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


def assert_same_state(a, b, path: str = "state") -> None:
    """Two state_dicts (nested dicts, lists, tensors, arrays, RNG states) are exactly equal; names the first
    difference by its path."""
    import numpy as np

    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=path)
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)) or type(a).__name__ == "deque":
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{index}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


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
    exactly where an uninterrupted run ends: model, optimizer and strategy state. ``make()`` returns
    (net, optimizer, strategy). Returns the RefreshStats of the resumed part, uninterrupted and resumed."""
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
        assert_same_state(net_a.state_dict(), net_b.state_dict(), "model")
        assert_same_state(opt_a.state_dict(), opt_b.state_dict(), "optimizer")
        assert_same_state(strat_a.state_dict(), strat_b.state_dict(), "strategy")
        return stats_a, stats_b

    return check
