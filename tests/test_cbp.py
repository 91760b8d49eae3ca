"""Continual backpropagation, pinned on small hand-checkable nets: plain torch models (a population of one)
and population-layer models of several members."""

from importlib.metadata import entry_points

import numpy as np
import pytest
import torch
from torch import nn

import dst
from cbp import ContinualBackprop
from dst.masked import MaskedLinear
from dst.optim import ElementwiseAdam
from dst.population import forward, member_view, mse_per_member

W_IN = [[0.5, 0.5], [1.0, 1.0], [1.5, 1.5], [2.0, 2.0]]
W_OUT = [[1.0, -1.0, 0.1, 1.0], [1.0, 1.0, -0.1, -1.0]]


def _hand_net(orders=None):
    """x = [1, 1] -> h = relu(W x) = [1, 2, 3, 4]; |w_out| column means [1, 1, 0.1, 1]. Plain, or with
    ``orders`` a population whose member s has the units in order ``orders[s]``."""
    w_in, w_out = torch.tensor(W_IN), torch.tensor(W_OUT)
    if orders is None:
        net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
        weights = (w_in, torch.zeros(4), w_out, torch.tensor([0.5, -0.5]))
    else:
        members = len(orders)
        net = nn.Sequential(MaskedLinear(2, 4, members=members), nn.ReLU(), MaskedLinear(4, 2, members=members))
        weights = (torch.stack([w_in[order] for order in orders]), torch.zeros(members, 4),
                   torch.stack([w_out[:, order] for order in orders]), torch.tensor([[0.5, -0.5]] * members))
    with torch.no_grad():
        for param, value in zip((net[0].weight, net[0].bias, net[2].weight, net[2].bias), weights):
            param.copy_(value)
    return net


def _step(net, opt, strategy, x, y=None):
    """One step on member-first inputs (S, batch, in); returns the per-member (S,) counts of replaced units."""
    out = forward(net, x)
    loss = mse_per_member(out, torch.zeros_like(out) if y is None else y).sum()
    opt.zero_grad()
    loss.backward()
    strategy.before_step()
    opt.step()
    return np.broadcast_to(np.asarray(strategy.after_step().units_replaced), (strategy.members,))


def test_cbp_registers_through_the_entry_point_group_like_a_third_party_strategy():
    names = {point.name: point.value for point in entry_points(group="dst.strategies")}
    for name in ("cbp", "redo", "cbp-rigl", "cbp-set", "rigl-utility"):
        assert names.get(name) == "cbp"
    assert {"bp", "cbp", "redo", "cbp-rigl", "cbp-set", "rigl-utility"} <= set(dst.strategies.available())


@pytest.mark.parametrize("orders", [None, [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]]], ids=["plain", "population"])
def test_the_unit_with_the_lowest_corrected_utility_is_replaced(orders):
    net = _hand_net(orders)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    members = 1 if orders is None else len(orders)
    strategy = dst.strategies.build("cbp", net, opt, utility="contribution", maturity_threshold=0,
                                    replacement_rate=0.25, seed=list(range(members)))
    # contribution utility y = mean|w_out| * |h| = [1, 2, 0.3, 4]; after one step u_hat = y: unit 2 goes
    assert _step(net, opt, strategy, torch.ones(members, 1, 2)).tolist() == [1] * members
    outgoing = member_view(net[2], net[2].weight)
    for member, order in enumerate(orders or [[0, 1, 2, 3]]):
        unit = order.index(2)  # where this member keeps the low-utility unit
        assert outgoing[member, :, unit].abs().sum() == 0
        assert (outgoing[member, :, [i for i in range(4) if i != unit]] != 0).all()
        assert strategy.utilities[0].age[member].tolist() == [0 if i == unit else 1 for i in range(4)]


def test_adaptable_contribution_ranks_by_deviation_over_input_magnitude():
    net = _hand_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    strategy = dst.strategies.build("cbp", net, opt, maturity_threshold=0, replacement_rate=0.0, seed=0)
    x = torch.ones(1, 1, 2)
    _step(net, opt, strategy, x)
    _step(net, opt, strategy, 2 * x)  # h doubles: h - f_hat = h2 - (eta h1 + (1 - eta) h2) / (1 - eta^2)
    eta = 0.99
    h1 = torch.tensor([1.0, 2.0, 3.0, 4.0])
    h2 = 2 * h1
    out_mag = torch.tensor([1.0, 1.0, 0.1, 1.0])
    in_mag = torch.tensor([0.5, 1.0, 1.5, 2.0])
    y1 = out_mag * 0.0 / in_mag  # at step 1, f_hat = h1 exactly
    f_hat2 = ((1 - eta) * (eta * h1 + h2)) / (1 - eta**2)
    y2 = out_mag * (h2 - f_hat2).abs() / in_mag
    expected = ((1 - eta) * (eta * y1 + y2)) / (1 - eta**2)
    torch.testing.assert_close(strategy.utilities[0].corrected_utility(), expected[None])


@pytest.mark.parametrize("members", [1, 3])
def test_immature_units_are_never_replaced(members):
    torch.manual_seed(0)
    net = dst.nets.mlp(3, [6], 1, generators=[torch.Generator().manual_seed(s) for s in range(members)])
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    m = 7
    strategy = dst.strategies.build("cbp", net, opt, maturity_threshold=m, replacement_rate=0.3,
                                    seed=list(range(members)))
    replaced_total = 0
    for step in range(1, 120):
        before = strategy.utilities[0].age.clone()
        counts = _step(net, opt, strategy, torch.randn(members, 4, 3), torch.randn(members, 4, 1))
        chosen = strategy.utilities[0].age == 0
        assert (before[chosen] + 1 > m).all(), f"step {step}: replaced a unit of age <= {m}"
        assert chosen.sum(1).tolist() == counts.tolist()
        if step <= m:
            assert counts.sum() == 0
        replaced_total += counts.sum()
    assert replaced_total > 20 * members


def test_number_replaced_over_many_steps_matches_the_exact_accumulator():
    torch.manual_seed(0)
    net = dst.nets.mlp(3, [8], 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    # maturity 0: all 8 units are eligible at every step, so 8 / 64 = 0.125 units accrue per step
    strategy = dst.strategies.build("cbp", net, opt, maturity_threshold=0, replacement_rate=1 / 64, seed=0)
    counts = [int(_step(net, opt, strategy, torch.randn(1, 2, 3), torch.randn(1, 2, 1))[0]) for _ in range(100)]
    assert sum(counts) == 12  # floor(100 * 0.125)
    assert counts[:8] == [0] * 7 + [1]  # exactly one unit at every 8th step
    assert max(counts) == 1


def test_maturity_delays_eligibility_in_the_accumulator_of_each_member():
    net = dst.nets.mlp(3, [4], 1, generators=[torch.Generator().manual_seed(s) for s in range(2)])
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    configs = [dst.strategies.config("cbp", maturity_threshold=m, replacement_rate=0.25) for m in (3, 1)]
    strategy = dst.strategies.build("cbp", net, opt, config=configs, seed=[0, 1])
    counts = np.stack([_step(net, opt, strategy, torch.randn(2, 2, 3), torch.randn(2, 2, 1)) for _ in range(8)])
    # maturity 3: steps 1-3 no unit is older than 3. Step 4: 4 eligible -> 1 replaced (eligible again at
    # step 8); steps 5, 6, 7: 3 eligible -> 0.75 each: acc 0.75, 1.5 -> 1, 1.25 -> 1
    assert counts[:7, 0].tolist() == [0, 0, 0, 1, 0, 1, 1]
    # maturity 1: step 2: 1 replaced (back at step 4); step 3: 3 x 0.25 -> 0.75; step 4: 4 -> 1.75 -> 1 ...
    assert counts[:4, 1].tolist() == [0, 1, 0, 1]


def test_consumer_bias_changes_by_exactly_w_out_times_the_mean_activation():
    net = _hand_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    strategy = dst.strategies.build(
        "cbp", net, opt, utility="contribution", maturity_threshold=3, replacement_rate=0.25, seed=0
    )
    x = torch.ones(1, 1, 2)
    for _ in range(3):
        assert _step(net, opt, strategy, x)[0] == 0
    bias_before = net[2].bias.clone()
    w_out = net[2].weight[:, 2].clone()
    assert _step(net, opt, strategy, x)[0] == 1  # unit 2, h_2 = 3 at every step
    torch.testing.assert_close(net[2].bias - bias_before, w_out * 3.0)
    # the network's output on x is unchanged by the replacement: the unit's contribution moved to the bias
    assert net[2].weight[:, 2].abs().sum() == 0


def test_without_bias_correction_the_consumer_bias_is_untouched():
    net = _hand_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    strategy = dst.strategies.build("cbp", net, opt, utility="contribution", maturity_threshold=0,
                                    replacement_rate=0.25, bias_correction=False, seed=0)
    before = net[2].bias.clone()
    assert _step(net, opt, strategy, torch.ones(1, 1, 2))[0] == 1
    assert torch.equal(net[2].bias, before)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=1e-3),
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
        lambda p: ElementwiseAdam(p, lr=1e-3),
    ],
    ids=["sgd-momentum", "adam", "adamw", "elementwise-adam"],
)
@pytest.mark.parametrize("members", [1, 2])
def test_replaced_unit_has_zero_outgoing_weights_and_zero_optimizer_state(make_opt, members):
    torch.manual_seed(0)
    generators = [torch.Generator().manual_seed(s) for s in range(members)]
    net = dst.nets.mlp(3, [5], 2, generators=generators) if members > 1 else dst.nets.mlp(3, [5], 2)
    opt = make_opt(net.parameters())
    strategy = dst.strategies.build("cbp", net, opt, maturity_threshold=10, replacement_rate=0.1,
                                    seed=list(range(members)))
    x, y = torch.randn(members, 4, 3), torch.randn(members, 4, 2)
    for _ in range(11):  # 5 * 0.1 = 0.5 accrued after step 11
        assert _step(net, opt, strategy, x, y).sum() == 0
    before = member_view(net[0], net[0].weight).clone()
    assert _step(net, opt, strategy, x, y).tolist() == [1] * members
    bound = dst.nets.activation_gain("relu") * (3 / 3) ** 0.5
    views = lambda t, module: member_view(module, t)  # noqa: E731
    for member in range(members):
        unit = int(torch.nonzero(strategy.utilities[0].age[member] == 0)[0])
        assert (views(net[2].weight, net[2])[member, :, unit] == 0).all()
        assert views(net[0].bias, net[0])[member, unit] == 0
        fresh = views(net[0].weight, net[0])[member, unit]
        assert not torch.equal(fresh, before[member, unit]) and fresh.abs().max() <= bound
        for param, module, index in ((net[0].weight, net[0], (member, unit)), (net[0].bias, net[0], (member, unit)),
                                     (net[2].weight, net[2], (member, slice(None), unit))):
            states = [v for v in opt.state[param].values() if isinstance(v, torch.Tensor) and v.shape == param.shape]
            assert states
            for value in states:
                assert (views(value, module)[index] == 0).all()


def test_conv_channels_and_the_conv_to_linear_block_are_replaced_whole():
    torch.manual_seed(0)
    net = dst.nets.convnet(1, 10, 2, channels=(3, 4), kernel_sizes=(3, 3), hidden=(5,))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    strategy = dst.strategies.build("cbp", net, opt, maturity_threshold=0, replacement_rate=0.5, seed=0)
    x, y = torch.randn(1, 2, 1, 10, 10), torch.randn(1, 2, 2)
    assert _step(net, opt, strategy, x, y)[0] > 0
    conv_linear = strategy.layers[1]
    assert conv_linear.block == 1 * 1 and conv_linear.consumer is net[7]  # 10 -conv3-> 8 -pool-> 4 -conv3-> 2 -pool-> 1
    for layer, utility in zip(strategy.layers[:2], strategy.utilities[:2]):
        units = torch.nonzero(utility.age[0] == 0).flatten()
        assert len(units) > 0
        columns = layer.consumer_columns(units)
        assert (layer.consumer.weight[:, columns] == 0).all()
        assert (opt.state[layer.consumer.weight]["momentum_buffer"][:, columns] == 0).all()


def test_conv_to_linear_block_of_several_columns_is_zeroed_and_folded():
    torch.manual_seed(0)
    net = dst.nets.convnet(1, 12, 2, channels=(3,), kernel_sizes=(3,), hidden=())  # 12 -> 10 -> pool 5: block 25
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    strategy = dst.strategies.build("cbp", net, opt, maturity_threshold=0, replacement_rate=1 / 3,
                                    utility="random", seed=0)
    layer = strategy.layers[0]
    assert layer.block == 25
    bias_before = layer.consumer.bias.clone()
    weight_before = layer.consumer.weight.clone()
    x = torch.rand(1, 1, 1, 12, 12)
    with torch.no_grad():
        channel_means = net[1](net[0](x[0]))[0].mean((1, 2))  # one step: f_hat is this step's mean
    assert _step(net, opt, strategy, x)[0] == 1
    unit = int(torch.nonzero(strategy.utilities[0].age[0] == 0)[0])
    block = slice(unit * 25, (unit + 1) * 25)
    assert (layer.consumer.weight[:, block] == 0).all()
    others = torch.ones(75, dtype=torch.bool)
    others[block] = False
    assert torch.equal(layer.consumer.weight[:, others], weight_before[:, others])
    expected = weight_before[:, block].sum(1) * channel_means[unit]
    torch.testing.assert_close(layer.consumer.bias - bias_before, expected)


SPARSE_OPTIMIZERS = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
    "elementwise-adam": lambda p: ElementwiseAdam(p, lr=1e-2, weight_decay=1e-3),
}


@pytest.mark.parametrize("optimizer", sorted(SPARSE_OPTIMIZERS))
@pytest.mark.parametrize("refresh_fan_in", ["keep", "redraw"])
@pytest.mark.parametrize("members", [1, 2])
def test_masked_invariants_hold_after_every_replacement_on_a_sparse_net(refresh_fan_in, optimizer, members):
    generators = [torch.Generator().manual_seed(s) for s in range(members)]
    net = dst.sparsify(dst.nets.mlp(10, [20, 20], 3, generators=generators), density=0.3, distribution="uniform",
                       seed=list(range(members)))
    opt = SPARSE_OPTIMIZERS[optimizer](net.parameters())
    strategy = dst.strategies.build("cbp", net, opt, maturity_threshold=2, replacement_rate=0.05,
                                    refresh_fan_in=refresh_fan_in, seed=list(range(members)))
    layers = list(dst.masked_layers(net))
    counts = [layer.mask.sum(-1) for layer in layers]
    replaced = 0
    for _ in range(60):
        replaced += _step(net, opt, strategy, torch.randn(members, 8, 10), torch.randn(members, 8, 3)).sum()
        for layer in layers:
            assert (layer.weight[~layer.mask] == 0).all()
            states = [v for v in opt.state[layer.weight].values()
                      if isinstance(v, torch.Tensor) and v.shape == layer.weight.shape]
            assert states, "the optimizer keeps state for the weight"
            for value in states:
                assert (value[~layer.mask] == 0).all()
    assert replaced > 20 * members
    for layer, before in zip(layers, counts):
        assert torch.equal(layer.mask.sum(-1), before)  # each unit keeps its fan-in size


def test_redraw_gives_replaced_units_a_new_incoming_pattern():
    torch.manual_seed(0)
    net = dst.sparsify(dst.nets.mlp(30, [10], 1), density=0.3, distribution="uniform", seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    strategy = dst.strategies.build("cbp", net, opt, maturity_threshold=0, replacement_rate=0.5,
                                    refresh_fan_in="redraw", seed=0)
    before = net[0].mask.clone()
    _step(net, opt, strategy, torch.randn(1, 4, 30), torch.randn(1, 4, 1))
    fresh = strategy.utilities[0].age[0] == 0
    assert fresh.sum() == 5
    assert not torch.equal(net[0].mask[fresh], before[fresh])
    assert torch.equal(net[0].mask[~fresh], before[~fresh])


def test_state_dict_round_trips_mid_run_and_the_run_continues_identically(check_resume):
    def make():
        torch.manual_seed(0)
        net = dst.nets.mlp(4, [6, 6], 2)
        opt = ElementwiseAdam(net.parameters(), lr=1e-2)
        strategy = dst.strategies.build("cbp", net, opt, maturity_threshold=3, replacement_rate=0.05, seed=7)
        return net, opt, strategy

    data = [(torch.randn(3, 4, generator=torch.Generator().manual_seed(i)), torch.randn(3, 2)) for i in range(60)]
    stats, resumed = check_resume(make, data, 30)
    assert stats == resumed and sum(int(np.sum(s.units_replaced)) for s in stats) > 0


def test_steps_that_replace_nothing_never_synchronise_with_the_device(monkeypatch):
    torch.manual_seed(0)
    net = dst.nets.mlp(3, [6], 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    strategy = dst.strategies.build("cbp", net, opt, maturity_threshold=5, replacement_rate=1e-3, seed=0)
    x, y = torch.randn(2, 3), torch.randn(2, 1)
    loss = ((net(x) - y) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()

    def forbidden(*args, **kwargs):
        raise AssertionError("device synchronisation on a step that replaced nothing")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for _ in range(20):
        assert strategy.after_step().units_replaced == 0
        net(x)  # next forward feeds the capture hooks


def test_probabilistic_rounding_replaces_at_the_configured_rate_on_average():
    torch.manual_seed(0)
    net = dst.nets.mlp(3, [10], 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    strategy = dst.strategies.build("cbp", net, opt, maturity_threshold=0, replacement_rate=0.02,
                                    accumulate="probabilistic", seed=3)
    x = torch.randn(1, 2, 3)
    counts = [int(_step(net, opt, strategy, x)[0]) for _ in range(500)]
    assert set(counts) <= {0, 1}
    assert 60 <= sum(counts) <= 140  # 500 steps * 10 units * 0.02 = 100 expected


def test_cbp_without_hidden_layers_is_a_clear_error():
    net = nn.Sequential(nn.Linear(3, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(dst.TopologyError, match="hidden layers"):
        dst.strategies.build("cbp", net, opt)


def test_out_of_range_cbp_settings_name_the_range():
    net = dst.nets.mlp(3, [4], 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(dst.ConfigError, match=r"decay_rate=1.0 is out of range; it must be \[0.0, 1.0\)"):
        dst.strategies.build("cbp", net, opt, decay_rate=1.0)
    with pytest.raises(dst.ConfigError, match="unknown setting 'replacment_rate'.*replacement_rate"):
        dst.strategies.build("cbp", net, opt, replacment_rate=1e-4)
    assert isinstance(dst.strategies.build("cbp", net, opt), ContinualBackprop)
