"""Strategies built from shared pieces: CBP on RigL/SET, RigL with a utility drop score."""

import pytest
import torch

import dst
from dst.refresh import CompositeStrategy, compose


def _sparse_net(seed=0):
    torch.manual_seed(seed)
    return dst.sparsify(dst.nets.mlp(10, [24, 24], 2), density=0.3, distribution="erk", seed=seed)


def _step(net, opt, strategy, x, y):
    loss = ((net(x) - y) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    strategy.before_step()
    opt.step()
    return strategy.after_step()


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 10, generator=g), torch.randn(4, 2, generator=g)) for _ in range(n)]


@pytest.mark.parametrize("name", ["cbp-rigl", "cbp-set"])
def test_cbp_on_a_sparse_refreshing_net_refreshes_units_and_connections_and_keeps_invariants(name):
    net = _sparse_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    strategy = dst.strategies.build(name, net, opt, update_interval=10, schedule="constant",
                                    replacement_rate=0.01, maturity_threshold=5, seed=0)
    assert isinstance(strategy, CompositeStrategy)
    counts = [int(layer.mask.sum()) for layer in strategy.masked]
    units = connections = 0
    for x, y in _data(80):
        stats = _step(net, opt, strategy, x, y)
        units += stats.units_replaced
        connections += stats.connections_regrown
        for layer, count in zip(strategy.masked, counts):
            assert int(layer.mask.sum()) == count
            assert (layer.weight[~layer.mask] == 0).all()
            for value in opt.state[layer.weight].values():
                if value.shape == layer.weight.shape:
                    assert (value[~layer.mask] == 0).all()
    assert units > 0 and connections > 0


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

    stats, resumed = check_resume(make, _data(40, seed=1), 19)
    assert stats == resumed


def test_rigl_utility_scores_a_connection_by_its_share_of_the_source_units_utility():
    net = _sparse_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    strategy = dst.strategies.build("rigl-utility", net, opt, update_interval=1000, schedule="constant", seed=0)
    x, y = _data(1)[0]
    _step(net, opt, strategy, x, y)
    consumer = strategy.layers[0].consumer  # net[2]: its columns are the first hidden layer's units
    index = strategy.masked.index(consumer)
    scores = strategy.drop_scores(index, consumer)
    utility = strategy.utilities[0].corrected_utility()
    magnitude = consumer.weight.detach().abs()
    expected = magnitude / magnitude.sum(0, keepdim=True) * utility
    torch.testing.assert_close(scores, expected)
    # the first layer's rows are hidden units: share of the destination unit's utility
    first = strategy.masked.index(net[0])
    rows = net[0].weight.detach().abs()
    expected_rows = rows / rows.sum(1, keepdim=True) * utility.view(-1, 1)
    torch.testing.assert_close(strategy.drop_scores(first, net[0]), expected_rows)


def test_rigl_utility_keeps_counts_exact_over_updates():
    net = _sparse_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    strategy = dst.strategies.build("rigl-utility", net, opt, update_interval=5, schedule="constant", seed=0)
    counts = [int(layer.mask.sum()) for layer in strategy.masked]
    regrown = sum(_step(net, opt, strategy, x, y).connections_regrown for x, y in _data(30))
    assert regrown > 0
    assert [int(layer.mask.sum()) for layer in strategy.masked] == counts
