"""ReDo: dormant units are recycled with the same surgery as CBP."""

import torch
from torch import nn

import dst


def _net():
    # x >= 0 in the tests. Unit 0 is dead: negative weights and bias, ReLU output 0 on every input.
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[-1.0, -1.0, -1.0], [1.0, 0.5, 0.2], [0.3, 1.0, 0.7], [0.6, 0.4, 1.0]]))
        net[0].bias.copy_(torch.tensor([-1.0, 0.1, 0.1, 0.1]))
        net[2].weight.fill_(0.5)
    return net


def _step(net, opt, strategy, x):
    loss = net(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    strategy.before_step()
    opt.step()
    return strategy.after_step()


def test_a_planted_dead_unit_is_reset_and_healthy_units_are_not():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9)
    strategy = dst.strategies.build("redo", net, opt, period=5, tau=0.1, seed=0)
    healthy_before = net[0].weight[1:].clone()
    dead_before = net[0].weight[0].clone()
    x = torch.rand(8, 3)
    counts = [_step(net, opt, strategy, x).units_replaced for _ in range(5)]
    assert counts == [0, 0, 0, 0, 1]  # checked only at step 5
    assert not torch.equal(net[0].weight[0], dead_before)
    assert net[0].bias[0] == 0
    assert (net[2].weight[:, 0] == 0).all()
    assert (opt.state[net[2].weight]["momentum_buffer"][:, 0] == 0).all()
    assert torch.equal(net[0].weight[1:], healthy_before)
    assert (net[2].weight[:, 1:] == 0.5).all()


def test_scores_are_activity_over_the_layer_mean():
    scores = dst.strategies.get("redo").cls.scores(torch.tensor([0.0, 1.0, 2.0, 5.0]))
    torch.testing.assert_close(scores, torch.tensor([0.0, 0.5, 1.0, 2.5]))


def test_window_averages_activity_over_the_last_steps_and_captures_only_then():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    strategy = dst.strategies.build("redo", net, opt, period=10, window=3, tau=0.1, seed=0)
    capturing = []
    for _ in range(10):
        _step(net, opt, strategy, torch.rand(2, 3))
        capturing.append(strategy.topology.capturing)
    # hooks are on only for the forward passes of steps 8, 9, 10 (armed after steps 7, 8, 9)
    assert capturing == [False] * 6 + [True, True, True, False]
    assert (net[2].weight[:, 0] == 0).all()


def test_a_fixed_probe_batch_decides_dormancy_when_set():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    strategy = dst.strategies.build("redo", net, opt, period=2, tau=0.1, seed=0)
    # on this probe unit 0 is active and units 1-3 are silent
    strategy.set_probe(-torch.ones(4, 3))
    assert not strategy.topology.capturing
    _step(net, opt, strategy, torch.rand(2, 3))
    assert _step(net, opt, strategy, torch.rand(2, 3)).units_replaced == 3  # units 1, 2, 3 silent on the probe
    assert (net[2].weight[:, 0] == 0.5).all()


def test_the_fixed_probe_batch_survives_a_checkpoint():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    strategy = dst.strategies.build("redo", net, opt, period=2, tau=0.1, seed=0)
    strategy.set_probe(-torch.ones(4, 3))
    _step(net, opt, strategy, torch.rand(2, 3))
    saved = strategy.state_dict()
    fresh_net = _net()
    fresh_net.load_state_dict(net.state_dict())
    resumed = dst.strategies.build("redo", fresh_net, torch.optim.SGD(fresh_net.parameters(), lr=0.0), period=2,
                                   tau=0.1, seed=0)
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.probe, -torch.ones(4, 3))
    assert not resumed.topology.capturing
    # the check at step 2 scores on the restored probe: units 1, 2, 3 are silent there
    assert _step(fresh_net, resumed.optimizer, resumed, torch.rand(2, 3)).units_replaced == 3
