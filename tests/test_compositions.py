"""Strategies built from shared pieces: CBP on RigL/SET, RigL with a utility drop score."""

import numpy as np
import pytest
import torch

import dst
from dst.population import forward, member_view, mse_per_member
from dst.refresh import CompositeStrategy, compose


def _sparse_net(seed=0, members=None):
    """A plain sparse MLP, or a population of ``members`` with seeds seed, seed + 1, ..."""
    torch.manual_seed(seed)
    if members is None:
        return dst.sparsify(dst.nets.mlp(10, [24, 24], 2), density=0.3, distribution="erk", seed=seed)
    generators = [torch.Generator().manual_seed(seed + s) for s in range(members)]
    return dst.sparsify(dst.nets.mlp(10, [24, 24], 2, generators=generators), density=0.3, distribution="erk",
                        seed=[seed + s for s in range(members)])


def _step(net, opt, strategy, x, y):
    loss = mse_per_member(forward(net, x), y).sum()
    opt.zero_grad()
    loss.backward()
    strategy.before_step()
    opt.step()
    return strategy.after_step()


def _data(n, seed=0, members=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(members, 4, 10, generator=g), torch.randn(members, 4, 2, generator=g)) for _ in range(n)]


@pytest.mark.parametrize("members", [None, 2])
@pytest.mark.parametrize("name", ["cbp-rigl", "cbp-set"])
def test_cbp_on_a_sparse_refreshing_net_refreshes_units_and_connections_and_keeps_invariants(name, members):
    net = _sparse_net(members=members)
    size = members or 1
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    strategy = dst.strategies.build(name, net, opt, update_interval=10, schedule="constant",
                                    replacement_rate=0.01, maturity_threshold=5, seed=list(range(size)))
    assert isinstance(strategy, CompositeStrategy)
    counts = [member_view(layer, layer.mask).flatten(1).sum(1) for layer in strategy.masked]
    units = connections = np.zeros(size, np.int64)
    for x, y in _data(80, members=size):
        stats = _step(net, opt, strategy, x, y)
        units = units + stats.units_replaced
        connections = connections + stats.connections_regrown
        for layer, count in zip(strategy.masked, counts):
            assert torch.equal(member_view(layer, layer.mask).flatten(1).sum(1), count)  # per member
            assert (layer.weight[~layer.mask] == 0).all()
            for value in opt.state[layer.weight].values():
                if value.shape == layer.weight.shape:
                    assert (value[~layer.mask] == 0).all()
    assert (units > 0).all() and (connections > 0).all()


def test_composite_settings_reach_each_part_by_their_usual_names():
    net = _sparse_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    strategy = dst.strategies.build("cbp-rigl", net, opt, drop_fraction=0.1, replacement_rate=1e-3)
    rigl, cbp = strategy.parts
    assert rigl.config.drop_fraction == 0.1 and cbp.config.replacement_rate == 1e-3
    with pytest.raises(dst.ConfigError, match="unknown setting 'nope'"):
        dst.strategies.build("cbp-rigl", net, opt, nope=1)


def test_composing_parts_whose_settings_clash_is_an_error():
    with pytest.raises(dst.ConfigError, match="belongs to both"):
        compose("set-rigl-test", "set", "rigl")
    assert "set-rigl-test" not in dst.strategies.available()


def test_composite_state_dict_round_trips(check_resume):
    def make():
        net = _sparse_net(seed=2)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        strategy = dst.strategies.build("cbp-rigl", net, opt, update_interval=6, schedule="constant",
                                        replacement_rate=0.02, maturity_threshold=3, seed=4)
        return net, opt, strategy

    data = [(x[0], y[0]) for x, y in _data(40, seed=1)]  # check_resume calls the plain model itself
    stats, resumed = check_resume(make, data, 19)
    assert stats == resumed and sum(np.sum(item.units_replaced) for item in stats) > 0


@pytest.mark.parametrize("members", [None, 2])
def test_rigl_utility_scores_a_connection_by_its_share_of_the_source_units_utility(members):
    net = _sparse_net(members=members)
    size = members or 1
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    strategy = dst.strategies.build("rigl-utility", net, opt, update_interval=1000, schedule="constant",
                                    seed=list(range(size)))
    x, y = _data(1, members=size)[0]
    _step(net, opt, strategy, x, y)
    everyone = np.arange(size)
    consumer = strategy.layers[0].consumer  # net[2]: its columns are the first hidden layer's units
    scores = strategy.drop_scores(strategy.masked.index(consumer), consumer, everyone)
    utility = strategy.utilities[0].corrected_utility()  # (S, 24)
    magnitude = member_view(consumer, consumer.weight).detach().abs()
    expected = magnitude / magnitude.sum(1, keepdim=True) * utility[:, None, :]
    torch.testing.assert_close(scores, expected)
    assert torch.equal(strategy.drop_scores(strategy.masked.index(consumer), consumer, everyone[-1:]), expected[-1:])
    # the first layer's rows are hidden units: share of the destination unit's utility
    rows = member_view(net[0], net[0].weight).detach().abs()
    expected_rows = rows / rows.sum(2, keepdim=True) * utility[:, :, None]
    torch.testing.assert_close(strategy.drop_scores(strategy.masked.index(net[0]), net[0], everyone), expected_rows)


def test_rigl_utility_keeps_counts_exact_over_updates():
    net = _sparse_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    strategy = dst.strategies.build("rigl-utility", net, opt, update_interval=5, schedule="constant", seed=0)
    counts = [int(layer.mask.sum()) for layer in strategy.masked]
    regrown = sum(int(np.sum(_step(net, opt, strategy, x, y).connections_regrown)) for x, y in _data(30))
    assert regrown > 0
    assert [int(layer.mask.sum()) for layer in strategy.masked] == counts
