"""SNR: ages, inter-firing histograms, resets at the threshold and the threshold updates, by hand."""

import pytest
import torch
from torch import nn

import dst
from dst.errors import ConfigError, TopologyError
from dst.population import forward


def _net():
    """x > 0: unit 0 always fires (positive weight), unit 1 never does (negative weight and bias)."""
    net = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net[0].bias.copy_(torch.tensor([0.0, -1.0]))
        net[2].weight.fill_(0.5)
    return net


def _steps(net, strategy, count, batch=1):
    replaced = []
    for _ in range(count):
        forward(net, torch.ones(1, batch, 1))
        replaced.append(strategy.after_step().units_replaced)
    return replaced


def test_a_silent_unit_is_reset_when_its_age_reaches_the_threshold_and_ages_are_recorded():
    net = _net()
    strategy = dst.strategies.build("snr", net, None, threshold=3.0, seed=0)
    replaced = _steps(net, strategy, 2)
    assert strategy.ages[0].tolist() == [[0, 2]] and all(r == 0 for r in replaced)
    outgoing = net[2].weight.detach().clone()
    (third,) = _steps(net, strategy, 1)  # unit 1's age reaches 3: reset, its age 3 recorded
    assert third.tolist() == [1]
    histogram = strategy.histograms[0][0]
    assert histogram[0, 0].item() == 3 and histogram[0].sum().item() == 3  # unit 0 fired at age 0 three times
    assert histogram[1, 3].item() == 1 and histogram[1].sum().item() == 1
    assert strategy.ages[0].tolist() == [[0, 0]]
    assert net[2].weight[0, 1].item() == 0.0 and net[2].weight[0, 0].item() == outgoing[0, 0].item()
    assert net[0].bias[1].item() == 0.0 and net[0].weight[1, 0].item() != -1.0


def test_a_silent_batch_adds_the_batch_size_to_the_age():
    net = _net()
    strategy = dst.strategies.build("snr", net, None, threshold=100.0, seed=0)
    _steps(net, strategy, 3, batch=4)
    assert strategy.ages[0].tolist() == [[0, 12]]


def test_thresholds_move_to_each_units_quantile_or_expand_after_every_update_every_tasks():
    net = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
    strategy = dst.strategies.build("snr", net, None, threshold=1000.0, percentile=0.99, update_every=2,
                                    min_threshold=1.0, expansion=2.0, tau_max=3000, seed=0)
    histogram = strategy.histograms[0][0]
    histogram[0, 2], histogram[0, 5], histogram[0, 9] = 50, 49, 1  # CDF at age 5: 99/100 = 0.99 -> i = 5
    histogram[1, 0] = 7  # only firings at age 0 (not counted): nothing recorded -> i = 1
    histogram[2, 2000] = 100  # i = 2000 >= tau = 1000: expand to 2 x 1000
    histogram[3, 2999] = 1  # i = 2999 >= 1000: expand to 2000
    strategy.on_task_start(1)  # one task finished: no update yet
    assert strategy.thresholds[0].tolist() == [[1000.0] * 4]
    strategy.on_task_start(2)
    assert strategy.thresholds[0].tolist() == [[5.0, 1.0, 2000.0, 2000.0]]
    assert int(strategy.histograms[0].sum()) == 0
    strategy.histograms[0][0, 2, 2999] = 1  # 2999 >= 2000: expand to 4000, clipped to tau_max
    strategy.on_task_start(4)
    assert strategy.thresholds[0][0, 2].item() == 3000.0


def test_the_threshold_floor_is_the_released_codes_one_hundred():
    net = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1))
    strategy = dst.strategies.build("snr", net, None, update_every=1, seed=0)
    strategy.histograms[0][0, 0, 3] = 10
    strategy.on_task_start(1)
    assert strategy.thresholds[0].tolist() == [[100.0]]


def test_snr_refuses_units_that_never_fall_silent_and_histograms_that_do_not_fit():
    with pytest.raises(TopologyError, match="never fall silent"):
        dst.strategies.build("snr", dst.nets.mlp(2, [3], 1, "sigmoid"), None, seed=0)
    with pytest.raises(ConfigError, match="tau_max"):
        dst.strategies.build("snr", dst.nets.mlp(2, [20_000], 1), None, tau_max=20_000, seed=0)
