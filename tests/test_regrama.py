"""ReGraMa: ReDo's schedule and surgery with a unit's mean |incoming gradient| as its score."""

import pytest
import torch
from torch import nn

import dst
from dst.errors import ConfigError
from dst.masked import MaskedLinear

HIDDEN = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]


def _net(members=None):
    if members is None:
        net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    else:
        net = nn.Sequential(MaskedLinear(2, 3, members=members), nn.ReLU(), MaskedLinear(3, 1, members=members))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(HIDDEN))
        net[2].weight.fill_(0.5)
    return net


def _check(net, strategy, hidden_grad):
    """One step whose hidden weight gradient is ``hidden_grad`` (no optimizer step): units replaced."""
    for param in net.parameters():
        param.grad = torch.zeros_like(param)
    net[0].weight.grad.copy_(torch.tensor(hidden_grad))
    strategy.before_step()
    return strategy.after_step().units_replaced


@pytest.mark.parametrize("outgoing", ["zero", "keep"])
def test_the_unit_with_the_smallest_gradient_score_is_reset(outgoing):
    # mean |g| per unit: 1, 0.25, 1.75 -> layer mean 1 -> scores 1, 0.25, 1.75: tau 0.3 resets unit 1 only
    net = _net()
    strategy = dst.strategies.build("regrama", net, None, period=1, tau=0.3, outgoing=outgoing, seed=0)
    replaced = _check(net, strategy, [[1.0, -1.0], [0.5, 0.0], [-1.5, 2.0]])
    assert replaced.tolist() == [1]
    weight = net[0].weight.detach()
    assert weight[0].tolist() == HIDDEN[0] and weight[2].tolist() == HIDDEN[2]
    bound = (2 ** 0.5) * (3 / 2) ** 0.5  # kaiming at fan-in 2 with ReLU's gain
    assert weight[1].tolist() != HIDDEN[1] and bool((weight[1].abs() <= bound).all())
    outgoing_weights = net[2].weight.detach()[0]
    assert outgoing_weights[1].item() == (0.0 if outgoing == "zero" else 0.5)
    assert outgoing_weights[0].item() == 0.5 and outgoing_weights[2].item() == 0.5


def test_tau_zero_resets_exactly_the_units_without_gradient_and_checks_follow_the_period():
    net = _net()
    strategy = dst.strategies.build("regrama", net, None, period=2, seed=0)  # tau 0: the released code's default
    assert _check(net, strategy, [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]) == 0  # step 1: no check
    assert _check(net, strategy, [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]).tolist() == [1]  # step 2: unit 1 reset


def test_a_sparse_unit_is_scored_over_its_active_connections_and_members_score_their_own():
    net = _net(members=2)
    mask = torch.ones(2, 3, 2, dtype=torch.bool)
    mask[0, 0, 1] = False  # member 0's unit 0 keeps one connection; member 1 is dense
    net[0].set_mask(mask)
    configs = [dst.strategies.config("regrama", period=1, tau=0.5) for _ in range(2)]
    strategy = dst.strategies.build("regrama", net, None, config=configs, seed=[0, 1])
    # member 0: G = 0.2 (its one active connection; the 9.0 is masked), 1, 1; mean 0.733: scores 0.27,
    # 1.36, 1.36: unit 0 reset. Member 1 (dense): G = 4.6, 1, 1; mean 2.2: scores 2.09, 0.45, 0.45: units 1, 2
    grad = [[[0.2, 9.0], [1.0, 1.0], [1.0, 1.0]], [[0.2, 9.0], [1.0, 1.0], [1.0, 1.0]]]
    replaced = _check(net, strategy, grad)
    assert replaced.tolist() == [1, 2]


def test_regrama_takes_no_probe_batch():
    net = _net()
    strategy = dst.strategies.build("regrama", net, None, seed=0)
    with pytest.raises(ConfigError, match="no probe"):
        strategy.set_probe(torch.zeros(1, 4, 2))
