"""ReDo: dormant units are recycled with the same surgery as CBP, on plain models and on populations."""

import numpy as np
import pytest
import torch
from torch import nn

import dst
from dst.masked import MaskedLinear
from dst.population import forward, member_view, mse_per_member

# x >= 0 in the tests. Unit 0 is dead: negative weights and bias, ReLU output 0 on every input.
W_IN = [[-1.0, -1.0, -1.0], [1.0, 0.5, 0.2], [0.3, 1.0, 0.7], [0.6, 0.4, 1.0]]
B_IN = [-1.0, 0.1, 0.1, 0.1]


def _net(orders=None):
    """Plain, or with ``orders`` a population whose member s keeps the units in order ``orders[s]``."""
    w_in, b_in = torch.tensor(W_IN), torch.tensor(B_IN)
    if orders is None:
        net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        values = (w_in, b_in)
    else:
        net = nn.Sequential(MaskedLinear(3, 4, members=len(orders)), nn.ReLU(), MaskedLinear(4, 2, members=len(orders)))
        values = (torch.stack([w_in[order] for order in orders]), torch.stack([b_in[order] for order in orders]))
    with torch.no_grad():
        net[0].weight.copy_(values[0])
        net[0].bias.copy_(values[1])
        net[2].weight.fill_(0.5)
    return net


def _step(net, opt, strategy, x):
    out = forward(net, x)
    loss = mse_per_member(out, torch.zeros_like(out)).sum()
    opt.zero_grad()
    loss.backward()
    strategy.before_step()
    opt.step()
    return np.broadcast_to(np.asarray(strategy.after_step().units_replaced), (strategy.members,)).tolist()


@pytest.mark.parametrize("orders", [None, [[0, 1, 2, 3], [2, 3, 0, 1]]], ids=["plain", "population"])
def test_a_planted_dead_unit_is_reset_and_healthy_units_are_not(orders):
    net = _net(orders)
    members = 1 if orders is None else len(orders)
    opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9)
    strategy = dst.strategies.build("redo", net, opt, period=5, tau=0.1, seed=list(range(members)))
    incoming, outgoing = member_view(net[0], net[0].weight), member_view(net[2], net[2].weight)
    before = incoming.clone()
    x = torch.rand(members, 8, 3)
    counts = [_step(net, opt, strategy, x) for _ in range(5)]
    assert counts == [[0] * members] * 4 + [[1] * members]  # checked only at step 5
    momentum = member_view(net[2], opt.state[net[2].weight]["momentum_buffer"])
    for member, order in enumerate(orders or [[0, 1, 2, 3]]):
        dead = order.index(0)
        healthy = [unit for unit in range(4) if unit != dead]
        assert not torch.equal(incoming[member, dead], before[member, dead])
        assert member_view(net[0], net[0].bias)[member, dead] == 0
        assert (outgoing[member, :, dead] == 0).all() and (momentum[member, :, dead] == 0).all()
        assert torch.equal(incoming[member, healthy], before[member, healthy])
        assert (outgoing[member, :, healthy] == 0.5).all()


def test_scores_are_activity_over_each_members_layer_mean():
    scores = dst.strategies.get("redo").cls.scores(torch.tensor([[0.0, 1.0, 2.0, 5.0], [1.0, 1.0, 1.0, 5.0]]))
    torch.testing.assert_close(scores, torch.tensor([[0.0, 0.5, 1.0, 2.5], [0.5, 0.5, 0.5, 2.5]]))


def test_window_averages_activity_over_the_last_steps_and_captures_only_then():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    strategy = dst.strategies.build("redo", net, opt, period=10, window=3, tau=0.1, seed=0)
    capturing = []
    for _ in range(10):
        _step(net, opt, strategy, torch.rand(1, 2, 3))
        capturing.append(strategy.topology.capturing)
    # hooks are on only for the forward passes of steps 8, 9, 10 (armed after steps 7, 8, 9)
    assert capturing == [False] * 6 + [True, True, True, False]
    assert (net[2].weight[:, 0] == 0).all()


def test_members_check_at_their_own_periods_and_average_their_own_windows():
    net = _net([[0, 1, 2, 3], [0, 1, 2, 3]])
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    configs = [dst.strategies.config("redo", period=p, window=w, tau=0.1) for p, w in ((4, 1), (3, 2))]
    strategy = dst.strategies.build("redo", net, opt, config=configs, seed=[0, 1])
    counts, capturing = [], []
    for _ in range(6):
        counts.append(_step(net, opt, strategy, torch.rand(2, 2, 3)))
        capturing.append(strategy.topology.capturing)
    # member 0 checks at step 4 (window: step 4), member 1 at steps 3 and 6 (windows: steps 2-3, 5-6);
    # the unit replaced at a check is dead again at once (its fresh weights are not trained, lr 0) or not
    assert [c[0] > 0 for c in counts] == [False, False, False, True, False, False]
    assert [c[1] > 0 for c in counts[:3]] == [False, False, True]
    assert counts[3][1] == counts[4][1] == 0
    # capture is on for the forward of step t when some member's window holds t: 2, 3, 4, 5, 6 (armed after 1..5)
    assert capturing == [True, True, True, True, True, False]


def test_a_fixed_probe_batch_decides_dormancy_when_set():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    strategy = dst.strategies.build("redo", net, opt, period=2, tau=0.1, seed=0)
    # on this member-first probe unit 0 is active and units 1-3 are silent
    strategy.set_probe(-torch.ones(1, 4, 3))
    assert not strategy.topology.capturing
    _step(net, opt, strategy, torch.rand(1, 2, 3))
    assert _step(net, opt, strategy, torch.rand(1, 2, 3)) == [3]  # units 1, 2, 3 silent on the probe
    assert (net[2].weight[:, 0] == 0.5).all()


def test_the_fixed_probe_batch_survives_a_checkpoint():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    strategy = dst.strategies.build("redo", net, opt, period=2, tau=0.1, seed=0)
    strategy.set_probe(-torch.ones(1, 4, 3))
    _step(net, opt, strategy, torch.rand(1, 2, 3))
    saved = strategy.state_dict()
    fresh_net = _net()
    fresh_net.load_state_dict(net.state_dict())
    resumed = dst.strategies.build("redo", fresh_net, torch.optim.SGD(fresh_net.parameters(), lr=0.0), period=2,
                                   tau=0.1, seed=0)
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.probe, -torch.ones(1, 4, 3))
    assert not resumed.topology.capturing
    # the check at step 2 scores on the restored probe: units 1, 2, 3 are silent there
    assert _step(fresh_net, resumed.optimizer, resumed, torch.rand(1, 2, 3)) == [3]
