"""Continual backpropagation, pinned on small hand-checkable nets."""

import itertools
from importlib.metadata import entry_points

import numpy as np
import pytest
import torch
from torch import nn

import dst
from cbp import ContinualBackprop
from dst.optim import ElementwiseAdam


def _net(weights_in, bias_in, weights_out, bias_out):
    net = nn.Sequential(nn.Linear(len(weights_in[0]), len(weights_in)), nn.ReLU(), nn.Linear(len(weights_in), len(weights_out)))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(weights_in))
        net[0].bias.copy_(torch.tensor(bias_in))
        net[2].weight.copy_(torch.tensor(weights_out))
        net[2].bias.copy_(torch.tensor(bias_out))
    return net


def _step(net, opt, strategy, x, y=None):
    out = net(x)
    loss = ((out - (torch.zeros_like(out) if y is None else y)) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    strategy.before_step()
    opt.step()
    return strategy.after_step()


def _hand_net():
    # x = [1, 1] -> h = relu(W x + b) = [1, 2, 3, 4]; w_out column magnitudes [1, 1, 0.1, 1]
    return _net(
        [[0.5, 0.5], [1.0, 1.0], [1.5, 1.5], [2.0, 2.0]],
        [0.0, 0.0, 0.0, 0.0],
        [[1.0, -1.0, 0.1, 1.0], [1.0, 1.0, -0.1, -1.0]],
        [0.5, -0.5],
    )


def test_cbp_registers_through_the_entry_point_group_like_a_third_party_strategy():
    names = {point.name: point.value for point in entry_points(group="dst.strategies")}
    for name in ("cbp", "redo", "cbp-rigl", "cbp-set", "rigl-utility"):
        assert names.get(name) == "cbp"
    assert {"bp", "cbp", "redo", "cbp-rigl", "cbp-set", "rigl-utility"} <= set(dst.strategies.available())


def test_the_unit_with_the_lowest_corrected_utility_is_replaced():
    net = _hand_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    strategy = dst.strategies.build(
        "cbp", net, opt, utility="contribution", maturity_threshold=0, replacement_rate=0.25, seed=0
    )
    # contribution utility y = mean|w_out| * |h| = [1, 2, 0.3, 4]; after one step u_hat = y
    stats = _step(net, opt, strategy, torch.ones(1, 2))
    assert stats.units_replaced == 1
    assert net[2].weight[:, 2].abs().sum() == 0
    assert (net[2].weight[:, [0, 1, 3]] != 0).all()
    assert strategy.utilities[0].age.tolist() == [1.0, 1.0, 0.0, 1.0]


def test_adaptable_contribution_ranks_by_deviation_over_input_magnitude():
    net = _hand_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    strategy = dst.strategies.build("cbp", net, opt, maturity_threshold=0, replacement_rate=0.0, seed=0)
    x = torch.ones(1, 2)
    _step(net, opt, strategy, x)
    _step(net, opt, strategy, 2 * x)  # h doubles: h - f_hat = h2 - (eta h1 + (1 - eta) h2) / (1 - eta^2)
    utility = strategy.utilities[0]
    eta = 0.99
    h1 = torch.tensor([1.0, 2.0, 3.0, 4.0])
    h2 = 2 * h1
    out_mag = torch.tensor([1.0, 1.0, 0.1, 1.0])
    in_mag = torch.tensor([0.5, 1.0, 1.5, 2.0])
    y1 = out_mag * 0.0 / in_mag  # at step 1, f_hat = h1 exactly
    f_hat2 = ((1 - eta) * (eta * h1 + h2)) / (1 - eta**2)
    y2 = out_mag * (h2 - f_hat2).abs() / in_mag
    expected = ((1 - eta) * (eta * y1 + y2)) / (1 - eta**2)
    torch.testing.assert_close(utility.corrected_utility(), expected)


def test_immature_units_are_never_replaced():
    torch.manual_seed(0)
    net = dst.nets.mlp(3, [6], 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    m = 7
    strategy = dst.strategies.build("cbp", net, opt, maturity_threshold=m, replacement_rate=0.3, seed=1)
    replaced_total = 0
    for step in range(1, 120):
        before = strategy.utilities[0].age.clone()
        stats = _step(net, opt, strategy, torch.randn(4, 3), torch.randn(4, 1))
        after = strategy.utilities[0].age
        chosen = torch.nonzero(after == 0).flatten()
        assert (before[chosen] + 1 > m).all(), f"step {step}: replaced a unit of age <= {m}"
        assert len(chosen) == stats.units_replaced
        if step <= m:
            assert stats.units_replaced == 0
        replaced_total += stats.units_replaced
    assert replaced_total > 20


def test_number_replaced_over_many_steps_matches_the_exact_accumulator():
    torch.manual_seed(0)
    net = dst.nets.mlp(3, [8], 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    # maturity 0: all 8 units are eligible at every step, so 8 / 64 = 0.125 units accrue per step
    strategy = dst.strategies.build("cbp", net, opt, maturity_threshold=0, replacement_rate=1 / 64, seed=0)
    counts = [_step(net, opt, strategy, torch.randn(2, 3), torch.randn(2, 1)).units_replaced for _ in range(100)]
    assert sum(counts) == 12  # floor(100 * 0.125)
    assert counts[:8] == [0] * 7 + [1]  # exactly one unit at every 8th step
    assert max(counts) == 1


def test_maturity_delays_eligibility_in_the_accumulator():
    torch.manual_seed(0)
    net = dst.nets.mlp(3, [4], 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    strategy = dst.strategies.build("cbp", net, opt, maturity_threshold=3, replacement_rate=0.25, seed=0)
    counts = [_step(net, opt, strategy, torch.randn(2, 3), torch.randn(2, 1)).units_replaced for _ in range(8)]
    # steps 1-3: no unit older than 3. Step 4: 4 eligible -> 1 replaced (matures at step 8);
    # steps 5, 6, 7: 3 eligible -> 0.75 each: acc 0.75, 1.5 -> 1, 1.25 -> 1; step 8 ...
    assert counts[:3] == [0, 0, 0]
    assert counts[3] == 1
    assert counts[4:7] == [0, 1, 1]


def test_consumer_bias_changes_by_exactly_w_out_times_the_mean_activation():
    net = _hand_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    strategy = dst.strategies.build(
        "cbp", net, opt, utility="contribution", maturity_threshold=3, replacement_rate=0.25, seed=0
    )
    x = torch.ones(1, 2)
    for _ in range(3):
        assert _step(net, opt, strategy, x).units_replaced == 0
    bias_before = net[2].bias.clone()
    w_out = net[2].weight[:, 2].clone()
    assert _step(net, opt, strategy, x).units_replaced == 1  # unit 2, h_2 = 3 at every step
    torch.testing.assert_close(net[2].bias - bias_before, w_out * 3.0)
    # the network's output on x is unchanged by the replacement: the unit's contribution moved to the bias
    assert net[2].weight[:, 2].abs().sum() == 0


def test_without_bias_correction_the_consumer_bias_is_untouched():
    net = _hand_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    strategy = dst.strategies.build("cbp", net, opt, utility="contribution", maturity_threshold=0,
                                    replacement_rate=0.25, bias_correction=False, seed=0)
    before = net[2].bias.clone()
    assert _step(net, opt, strategy, torch.ones(1, 2)).units_replaced == 1
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
def test_replaced_unit_has_zero_outgoing_weights_and_zero_optimizer_state(make_opt):
    torch.manual_seed(0)
    net = dst.nets.mlp(3, [5], 2)
    opt = make_opt(net.parameters())
    strategy = dst.strategies.build("cbp", net, opt, maturity_threshold=10, replacement_rate=0.1, seed=0)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    for _ in range(10):
        assert _step(net, opt, strategy, x, y).units_replaced == 0
    assert _step(net, opt, strategy, x, y).units_replaced == 0  # 5 * 0.1 = 0.5 accrued
    before = net[0].weight.clone()
    assert _step(net, opt, strategy, x, y).units_replaced == 1
    unit = int(torch.nonzero(strategy.utilities[0].age == 0)[0])
    assert (net[2].weight[:, unit] == 0).all()
    assert net[0].bias[unit] == 0
    assert not torch.equal(net[0].weight[unit], before[unit])
    bound = dst.nets.activation_gain("relu") * (3 / 3) ** 0.5
    assert net[0].weight[unit].abs().max() <= bound
    for param, index in ((net[0].weight, (unit,)), (net[0].bias, (unit,)), (net[2].weight, (slice(None), unit))):
        for value in opt.state[param].values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                assert (value[index] == 0).all()


def test_conv_channels_and_the_conv_to_linear_block_are_replaced_whole():
    torch.manual_seed(0)
    net = dst.nets.convnet(1, 10, 2, channels=(3, 4), kernel_sizes=(3, 3), hidden=(5,))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    strategy = dst.strategies.build("cbp", net, opt, maturity_threshold=0, replacement_rate=0.5, seed=0)
    x, y = torch.randn(2, 1, 10, 10), torch.randn(2, 2)
    stats = _step(net, opt, strategy, x, y)
    assert stats.units_replaced > 0
    conv_linear = strategy.layers[1]
    assert conv_linear.block == 1 * 1 and conv_linear.consumer is net[7]  # 10 -conv3-> 8 -pool-> 4 -conv3-> 2 -pool-> 1
    for layer, utility in zip(strategy.layers[:2], strategy.utilities[:2]):
        units = torch.nonzero(utility.age == 0).flatten()
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
    x = torch.rand(1, 1, 12, 12)
    with torch.no_grad():
        channel_means = net[1](net[0](x))[0].mean((1, 2))  # one step: f_hat is this step's mean
    assert _step(net, opt, strategy, x).units_replaced == 1
    unit = int(torch.nonzero(strategy.utilities[0].age == 0)[0])
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
def test_masked_invariants_hold_after_every_replacement_on_a_sparse_net(refresh_fan_in, optimizer):
    torch.manual_seed(0)
    net = dst.sparsify(dst.nets.mlp(10, [20, 20], 3), density=0.3, distribution="uniform", seed=0)
    opt = SPARSE_OPTIMIZERS[optimizer](net.parameters())
    strategy = dst.strategies.build("cbp", net, opt, maturity_threshold=2, replacement_rate=0.05,
                                    refresh_fan_in=refresh_fan_in, seed=0)
    layers = list(dst.masked_layers(net))
    counts = [layer.mask.sum(1) for layer in layers]
    replaced = 0
    for _ in range(60):
        replaced += _step(net, opt, strategy, torch.randn(8, 10), torch.randn(8, 3)).units_replaced
        for layer in layers:
            assert (layer.weight[~layer.mask] == 0).all()
            states = [v for v in opt.state[layer.weight].values()
                      if isinstance(v, torch.Tensor) and v.shape == layer.weight.shape]
            assert states, "the optimizer keeps state for the weight"
            for value in states:
                assert (value[~layer.mask] == 0).all()
    assert replaced > 20
    for layer, before in zip(layers, counts):
        assert torch.equal(layer.mask.sum(1), before)  # each unit keeps its fan-in size


def test_redraw_gives_replaced_units_a_new_incoming_pattern():
    torch.manual_seed(0)
    net = dst.sparsify(dst.nets.mlp(30, [10], 1), density=0.3, distribution="uniform", seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    strategy = dst.strategies.build("cbp", net, opt, maturity_threshold=0, replacement_rate=0.5,
                                    refresh_fan_in="redraw", seed=0)
    before = net[0].mask.clone()
    _step(net, opt, strategy, torch.randn(4, 30), torch.randn(4, 1))
    units = torch.nonzero(strategy.utilities[0].age == 0).flatten()
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[units] = False
    assert not torch.equal(net[0].mask[units], before[units])
    assert torch.equal(net[0].mask[untouched], before[untouched])


def test_state_dict_round_trips_mid_run_and_the_run_continues_identically(check_resume):
    def make():
        torch.manual_seed(0)
        net = dst.nets.mlp(4, [6, 6], 2)
        opt = ElementwiseAdam(net.parameters(), lr=1e-2)
        strategy = dst.strategies.build("cbp", net, opt, maturity_threshold=3, replacement_rate=0.05, seed=7)
        return net, opt, strategy

    data = [(torch.randn(3, 4, generator=torch.Generator().manual_seed(i)), torch.randn(3, 2)) for i in range(60)]
    stats, resumed = check_resume(make, data, 30)
    assert stats == resumed and sum(s.units_replaced for s in stats) > 0


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
    x = torch.randn(2, 3)
    counts = [_step(net, opt, strategy, x).units_replaced for _ in range(500)]
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


def test_magnitude_every_reuses_the_sums_of_large_weights_between_refreshes(monkeypatch):
    import cbp.weights

    torch.manual_seed(0)
    net = dst.nets.mlp(3, [50, 6], 1)  # 150, 300 and 6 weights
    monkeypatch.setattr(cbp.weights, "AMORTISE_FROM", 100)  # the first two are "large"
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    strategy = dst.strategies.build("cbp", net, opt, maturity_threshold=1000, magnitude_every=4, seed=0)
    sums = strategy._factors
    seen = []
    for _ in range(9):
        _step(net, opt, strategy, torch.randn(2, 3), torch.randn(2, 1))
        seen.append((sums.in_sums[0], sums.out_sums[0], sums.in_sums[1], sums.out_sums[1]))
    reused = [[now[k] is before[k] for k in range(4)] for before, now in itertools.pairwise(seen)]
    # layer 0's in (150) and out (300) sums and layer 1's in sums (300): taken at step 1, then at steps
    # 4 and 8 only; layer 1's outgoing sums come from the 6-weight output layer, taken every step
    refreshed = [False, False, True, False, False, False, True, False]  # steps 2..9
    assert reused == [[not r, not r, not r, False] for r in refreshed]
    exact = dst.strategies.build("cbp", net, opt, seed=0)._factors()
    torch.testing.assert_close(strategy._factors(True), exact)


@pytest.mark.parametrize("kind", ["adaptable_contribution", "adaptation", "contribution"])
@pytest.mark.parametrize("conv", [False, True])
def test_amortised_sums_follow_replacements_exactly(monkeypatch, kind, conv):
    import cbp.weights

    torch.manual_seed(0)
    if conv:  # conv -> conv -> the flatten block of the last channel layer
        net = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(), nn.Flatten(),
                            nn.Linear(5 * 2 * 2, 4), nn.ReLU(), nn.Linear(4, 1))
        x_shape = (2, 2, 6, 6)
    else:
        net = dst.nets.mlp(3, [6, 5, 4], 1)
        x_shape = (2, 3)
    monkeypatch.setattr(cbp.weights, "AMORTISE_FROM", 1)  # every matrix amortised
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # weights change only by replacement
    strategy = dst.strategies.build("cbp", net, opt, utility=kind, maturity_threshold=0, replacement_rate=0.2,
                                    magnitude_every=1000, seed=0)
    replaced = 0
    for _ in range(12):
        replaced += _step(net, opt, strategy, torch.randn(x_shape), torch.randn(2, 1)).units_replaced
    assert replaced >= 12
    cached = strategy._factors(False)  # no refresh: what the patched sums give
    exact = cbp.weights.weight_factors(strategy.layers, kind)
    for a, b in zip(cached, exact):
        torch.testing.assert_close(a, b)
    fresh = [i for i in range(6) if strategy.utilities[0].age[i] == 0]
    if kind != "adaptation":
        assert all(cached[0][i] == 0 for i in fresh)  # a replaced unit's zeroed outgoing column


def test_an_amortised_run_resumes_from_a_state_dict_mid_schedule(monkeypatch, check_resume):
    import cbp.weights

    monkeypatch.setattr(cbp.weights, "AMORTISE_FROM", 1)

    def make():
        torch.manual_seed(0)
        net = dst.nets.mlp(4, [6, 6], 2)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        strategy = dst.strategies.build("cbp", net, opt, maturity_threshold=3, replacement_rate=0.05,
                                        magnitude_every=7, seed=7)
        return net, opt, strategy

    data = [(torch.randn(3, 4, generator=torch.Generator().manual_seed(i)), torch.randn(3, 2)) for i in range(60)]
    stats, resumed = check_resume(make, data, 31)  # 31: four steps after a refresh of the sums
    assert stats == resumed and sum(s.units_replaced for s in stats) > 0


@pytest.mark.parametrize("kind", ["contribution", "adaptation", "adaptable_contribution", "zero_contribution", "weight"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("conv", [False, True])
def test_numpy_host_update_equals_the_torch_update(kind, batch, conv):
    from cbp.utility import UnitUtility
    from cbp.weights import HostWeightFactors, weight_factors

    torch.manual_seed(0)
    if conv:  # conv -> conv, then the flatten block of the last channel layer
        net = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * 2 * 2, 2))
        shapes = [(batch, 6, 4, 4), (batch, 4, 2, 2)]
    else:
        net = dst.nets.mlp(4, [6], 2)
        shapes = [(batch, 6)]
    layers = dst.Topology.from_model(net).hidden_layers
    factors = HostWeightFactors(layers, kind)
    host = [UnitUtility(layer, kind, 0.9, torch.device("cpu")) for layer in layers]
    device = [UnitUtility(layer, kind, 0.9, torch.device("cpu")) for layer in layers]
    for _ in range(20):
        for utility_h, utility_d, f_h, f_d, shape in zip(host, device, factors(), weight_factors(layers, kind),
                                                           shapes):
            h = torch.relu(torch.randn(shape))
            utility_h.update(h, f_h)
            utility_d.update(h, f_d)
        with torch.no_grad():
            net[0].weight.add_(0.01 * torch.randn_like(net[0].weight))
            net[-1].weight.add_(0.01 * torch.randn_like(net[-1].weight))
    for utility_h, utility_d in zip(host, device):
        torch.testing.assert_close(utility_h.corrected_utility(), utility_d.corrected_utility())
        torch.testing.assert_close(utility_h.corrected_mean(), utility_d.corrected_mean())


def test_host_weight_views_follow_a_weight_whose_memory_moved():
    from cbp.weights import HostWeightFactors, weight_factors

    net = dst.nets.mlp(4, [6], 2)
    layers = dst.Topology.from_model(net).hidden_layers
    factors = HostWeightFactors(layers, "adaptable_contribution")
    factors()
    net[0].weight.data = torch.randn(6, 4)  # new memory: cached numpy views would be stale
    np.testing.assert_allclose(factors()[0], weight_factors(layers, "adaptable_contribution")[0].numpy(), rtol=1e-6)


def test_a_unit_without_incoming_weights_has_zero_utility_not_nan():
    net = dst.sparsify(dst.nets.mlp(4, [3], 1), density=0.5, distribution="uniform", seed=0)
    with torch.no_grad():
        net[0].mask[1] = False
        net[0].apply_mask()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    strategy = dst.strategies.build("cbp", net, opt, replacement_rate=0.0, seed=0)
    for _ in range(5):
        _step(net, opt, strategy, torch.rand(2, 4), torch.rand(2, 1))
    utility = strategy.utilities[0].corrected_utility()
    assert torch.isfinite(utility).all() and utility[1] == 0


def test_running_statistics_are_the_papers_bias_corrected_averages_and_old_checkpoints_load():
    from cbp.utility import UnitUtility

    torch.manual_seed(0)
    net = dst.nets.mlp(4, [6], 2)
    layer = dst.Topology.from_model(net).hidden_layers[0]
    eta = 0.9
    utility = UnitUtility(layer, "zero_contribution", eta, torch.device("cpu"))
    f = torch.zeros(6)
    u = torch.zeros(6)
    factor = torch.rand(6)
    for t in range(1, 8):
        h = torch.relu(torch.randn(1, 6))
        utility.update(h, factor)
        f = eta * f + (1 - eta) * h[0]  # the paper's recursion, corrected by 1 - eta^t
        u = eta * u + (1 - eta) * factor * (h[0] - f / (1 - eta**t)).abs()
    torch.testing.assert_close(utility.corrected_mean(), f / (1 - eta**7))
    torch.testing.assert_close(utility.corrected_utility(), u / (1 - eta**7))
    torch.testing.assert_close(utility.mean, f)
    torch.testing.assert_close(utility.utility, u)
    torch.testing.assert_close(utility.decay_power, torch.full((6,), eta**7))
    # a state saved by the earlier (f, u, eta^age) layout loads into the same statistics
    old = {"steps": 7, "born": utility.born.clone(), "mean": f, "utility": u, "decay_power": torch.full((6,), eta**7)}
    fresh = UnitUtility(layer, "zero_contribution", eta, torch.device("cpu"))
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh.corrected_utility(), utility.corrected_utility())
    torch.testing.assert_close(fresh.corrected_mean(), utility.corrected_mean())


@pytest.mark.parametrize("kind", ["adaptable_contribution", "adaptation", "contribution"])
@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("chunk", [1000, 1 << 18])
def test_large_weights_sums_from_one_blocked_pass_match_the_formulas(monkeypatch, kind, conv, chunk):
    import cbp.weights
    from cbp.weights import WeightFactors, incoming_magnitude, outgoing_magnitude

    monkeypatch.setattr(cbp.weights, "_CHUNK", chunk)  # 1000: many blocks of rows per weight
    torch.manual_seed(0)
    if conv:  # 64 -> 128 -> 72 channels: 73,728 and 82,944 weights, then the flatten block
        net = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 128, 3), nn.ReLU(),
                            nn.Conv2d(128, 72, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72 * 4, 5))
    else:  # 90,000-weight hidden matrices
        net = dst.nets.mlp(300, [300, 300, 300], 10)
    layers = dst.Topology.from_model(net).hidden_layers
    assert max(layer.producer.weight.numel() for layer in layers) >= cbp.weights._FUSED_BELOW
    factors = WeightFactors(layers, kind)()
    for layer, factor in zip(layers, factors):
        incoming, outgoing = incoming_magnitude(layer), outgoing_magnitude(layer)
        expected = {"adaptation": 1 / incoming, "contribution": outgoing,
                    "adaptable_contribution": outgoing / incoming}[kind]
        torch.testing.assert_close(factor, expected.detach(), rtol=1e-5, atol=0)
