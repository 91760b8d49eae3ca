"""CBP, ReDo and the CBP compositions on populations: member s of a population runs exactly the experiment
of a population of one with seed s and its settings, and a plain torch model is a population of one."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import dst
from dst.population import forward, member_view, mse_per_member

SEEDS = (11, 22, 33)
IN, HIDDEN, OUT, BATCH = 5, (8, 6), 2, 3


def _model(seeds, *, plain=False, density=None):
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    if plain:
        model = dst.nets.mlp(IN, HIDDEN, OUT, generator=generators[0])
    else:
        model = dst.nets.mlp(IN, HIDDEN, OUT, generators=generators)
    if density is not None:
        dst.sparsify(model, density, "uniform", seed=list(seeds))
    return model


def _data(seeds, steps):
    """Member s's stream depends on its seed only: (steps, S, batch, features)."""
    xs, ys = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(1000 + seed)
        xs.append(torch.randn(steps, BATCH, IN, generator=g))
        ys.append(torch.randn(steps, BATCH, OUT, generator=g))
    return torch.stack(xs, 1), torch.stack(ys, 1)


def _train(model, strategy, optimizer, data):
    """Drive the protocol by hand; per-step (S,) counts of replaced units and regrown connections, (S,) losses."""
    members = strategy.members
    units, connections, losses = [], [], []
    for x, y in zip(*data):
        loss = mse_per_member(forward(model, x), y)
        optimizer.zero_grad()
        loss.sum().backward()
        strategy.before_step()
        optimizer.step()
        stats = strategy.after_step()
        units.append(np.broadcast_to(np.asarray(stats.units_replaced), (members,)).copy())
        connections.append(np.broadcast_to(np.asarray(stats.connections_regrown), (members,)).copy())
        losses.append(loss.detach().clone())
    return np.stack(units), np.stack(connections), torch.stack(losses)


def _weights(model):
    return [member_view(m, m.weight).detach() for m in model.modules() if isinstance(m, nn.Linear)]


def _run(name, seeds, configs, steps, *, plain=False, density=None):
    model = _model(seeds, plain=plain, density=density)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    strategy = dst.strategies.build(name, model, optimizer, config=list(configs), seed=list(seeds))
    data = _data(seeds, steps)
    return (*_train(model, strategy, optimizer, data), _weights(model))


def _assert_member_is_its_own_run(name, configs, steps, density=None):
    units, connections, losses, weights = _run(name, SEEDS, configs, steps, density=density)
    assert (units.sum(0) > 20).all(), "the test needs frequent replacements"
    for s, (seed, config) in enumerate(zip(SEEDS, configs)):
        alone = _run(name, (seed,), (config,), steps, density=density)
        np.testing.assert_array_equal(units[:, s], alone[0][:, 0], err_msg=f"member {s}: units replaced per step")
        np.testing.assert_array_equal(connections[:, s], alone[1][:, 0], err_msg=f"member {s}: connections")
        torch.testing.assert_close(losses[:, s], alone[2][:, 0], rtol=1e-5, atol=1e-6)
        for together, single in zip(weights, alone[3]):
            torch.testing.assert_close(together[s], single[0], rtol=1e-5, atol=1e-6)
    return units, connections


def _cbp(**settings):
    return dst.strategies.config("cbp", **settings)


CBP_MEMBERS = [
    _cbp(replacement_rate=0.02, maturity_threshold=5, decay_rate=0.9),
    _cbp(replacement_rate=0.05, maturity_threshold=2, decay_rate=0.99),
    _cbp(replacement_rate=0.03, maturity_threshold=9, decay_rate=0.95),
]


@pytest.mark.parametrize(
    "variant",
    [{}, {"utility": "contribution", "bias_correction": False}, {"utility": "random"}, {"accumulate": "probabilistic"}],
    ids=["adaptable", "contribution", "random", "probabilistic"],
)
def test_each_cbp_member_runs_the_experiment_of_a_population_of_one_with_its_seed_and_settings(variant):
    configs = [dataclasses.replace(config, **variant) for config in CBP_MEMBERS]
    units, _ = _assert_member_is_its_own_run("cbp", configs, 300)
    assert len({tuple(units[:, s]) for s in range(3)}) == 3  # the members' settings do differ in effect


def test_redrawn_fan_in_on_a_sparse_population_matches_each_member_alone():
    configs = [dataclasses.replace(config, refresh_fan_in="redraw") for config in CBP_MEMBERS]
    _assert_member_is_its_own_run("cbp", configs, 300, density=0.5)


def test_each_redo_member_runs_the_experiment_of_a_population_of_one():
    settings = ((7, 0.5, 2), (5, 0.6, 1), (9, 0.4, 3))  # period, tau, window
    configs = [dst.strategies.config("redo", period=p, tau=t, window=w) for p, t, w in settings]
    units, _ = _assert_member_is_its_own_run("redo", configs, 500)
    assert units[:, 0][np.arange(500) % 7 != 6].sum() == 0  # member 0 checks only at steps 7, 14, ...


@pytest.mark.parametrize("name", ["cbp-set", "cbp-rigl"])
def test_each_member_of_a_composition_runs_the_experiment_of_a_population_of_one(name):
    settings = [dict(replacement_rate=0.03, maturity_threshold=4, update_interval=10, drop_fraction=0.3),
                dict(replacement_rate=0.05, maturity_threshold=2, update_interval=7, drop_fraction=0.2),
                dict(replacement_rate=0.02, maturity_threshold=6, update_interval=10, drop_fraction=0.4)]
    configs = [dst.strategies.config(name, schedule="constant", **item) for item in settings]
    _, connections = _assert_member_is_its_own_run(name, configs, 300, density=0.5)
    assert (connections.sum(0) > 0).all()


@pytest.mark.parametrize("name, config", [("cbp", CBP_MEMBERS[1]),
                                          ("redo", dst.strategies.config("redo", period=5, tau=0.6))])
def test_a_plain_sequential_model_runs_exactly_like_a_population_layer_model_of_one(name, config):
    plain = _run(name, SEEDS[:1], [config], 400, plain=True)
    population = _run(name, SEEDS[:1], [config], 400)
    assert plain[0].sum() > 20
    np.testing.assert_array_equal(plain[0], population[0])
    torch.testing.assert_close(plain[2], population[2], rtol=1e-5, atol=1e-6)
    for a, b in zip(plain[3], population[3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, change", [("cbp", dict(replacement_rate=0.1, maturity_threshold=1, decay_rate=0.5)),
                                          ("redo", dict(period=3, tau=0.9, window=2))])
def test_changing_one_members_settings_leaves_the_other_members_unchanged(name, change):
    if name == "cbp":
        base = list(CBP_MEMBERS)
    else:
        base = [dst.strategies.config("redo", period=6, tau=0.5)] * 3
    changed = list(base)
    changed[1] = dataclasses.replace(base[1], **change)
    first, second = _run(name, SEEDS, base, 300), _run(name, SEEDS, changed, 300)
    assert not np.array_equal(first[0][:, 1], second[0][:, 1])
    for s in (0, 2):
        np.testing.assert_array_equal(first[0][:, s], second[0][:, s])
        assert torch.equal(first[2][:, s], second[2][:, s])
        for a, b in zip(first[3], second[3]):
            assert torch.equal(a[s], b[s])


def test_members_that_differ_in_magnitude_every_are_refused():
    configs = [_cbp(magnitude_every=1), _cbp(magnitude_every=10), _cbp(magnitude_every=1)]
    model = _model(SEEDS)
    with pytest.raises(dst.ConfigError, match="magnitude_every"):
        dst.strategies.build("cbp", model, torch.optim.SGD(model.parameters(), lr=0.1), config=configs,
                             seed=list(SEEDS))


def test_stats_count_units_per_member():
    model = _model(SEEDS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    configs = [_cbp(maturity_threshold=0, replacement_rate=rate) for rate in (1 / 8, 1 / 16, 0.0)]
    strategy = dst.strategies.build("cbp", model, optimizer, config=configs, seed=list(SEEDS))
    units, _, _ = _train(model, strategy, optimizer, _data(SEEDS, 16))
    # 14 units (8 + 6) eligible from the first step: 14/8 and 14/16 units accrue per step
    assert units.sum(0).tolist() == [28, 14, 0]
    assert units.dtype == np.int64


@pytest.mark.parametrize("path", ["numpy", "torch"])
def test_population_steps_that_replace_nothing_never_synchronise_with_the_device(monkeypatch, path):
    import dst.arrays

    if path == "torch":  # the path a GPU takes: nothing may leave the device either
        monkeypatch.setattr(dst.arrays, "HOST_MAX_WEIGHTS", 0)
    model = _model(SEEDS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    strategy = dst.strategies.build("cbp", model, optimizer, config=CBP_MEMBERS, seed=list(SEEDS))
    assert strategy.arrays.host == (path == "numpy")
    x, y = (item[0] for item in _data(SEEDS, 1))
    mse_per_member(forward(model, x), y).sum().backward()
    optimizer.step()

    def forbidden(*args, **kwargs):
        raise AssertionError("device synchronisation on a step that replaced nothing")

    names = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"]
    for name in names + (["numpy", "cpu"] if path == "torch" else []):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for _ in range(2):  # steps 1 and 2: no unit is older than the lowest maturity threshold (2)
        assert strategy.after_step() is dst.refresh.NO_REFRESH
        forward(model, x)  # the next forward feeds the capture hooks


def test_a_population_resumes_from_its_state_dict_exactly(check_resume):
    def make():
        model = _model(SEEDS)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, optimizer, dst.strategies.build("cbp", model, optimizer, config=CBP_MEMBERS, seed=list(SEEDS))

    x, y = _data(SEEDS, 60)
    stats, resumed = check_resume(make, list(zip(x, y)), 25)  # a population model takes (S, batch, in) as is
    replaced = [np.asarray(item.units_replaced) for item in stats]
    assert all(np.array_equal(a, np.asarray(b.units_replaced)) for a, b in zip(replaced, resumed))
    assert sum(item.sum() for item in replaced) > 0


# -- utilities and weight sums, per member ------------------------------------------------------------


def _generators(members):
    return [torch.Generator().manual_seed(s) for s in range(members)]


def _step(model, optimizer, strategy, x, y):
    loss = mse_per_member(forward(model, x), y).sum()
    optimizer.zero_grad()
    loss.backward()
    strategy.before_step()
    optimizer.step()
    return np.asarray(strategy.after_step().units_replaced)


@pytest.mark.parametrize("host", [True, False], ids=["numpy", "torch"])
@pytest.mark.parametrize("kind", ["zero_contribution", "contribution", "adaptable_contribution"])
def test_running_statistics_are_the_papers_bias_corrected_averages_for_each_members_eta(host, kind):
    from dst.arrays import Arrays
    from cbp.utility import UnitUtility

    layer = dst.Topology.from_model(dst.nets.mlp(4, [6], 2, generators=_generators(2))).hidden_layers[0]
    eta = torch.tensor([[0.9], [0.5]])
    utility = UnitUtility(layer, kind, eta.flatten().tolist(), arrays=Arrays(host=host))
    g = torch.Generator().manual_seed(0)
    f, u, factor = torch.zeros(2, 6), torch.zeros(2, 6), torch.rand(2, 6, generator=g)
    for t in range(1, 8):
        h = torch.relu(torch.randn(2, 3, 6, generator=g))  # batch 3
        utility.update(h.numpy() if host else h, factor.numpy() if host else factor)
        f = eta * f + (1 - eta) * h.mean(1)  # the paper's recursions, corrected by 1 - eta^t
        y = {"zero_contribution": (h - f[:, None] / (1 - eta[:, None] ** t)).abs().mean(1),
             "contribution": h.abs().mean(1)}.get(kind, (h - f[:, None] / (1 - eta[:, None] ** t)).abs().mean(1))
        u = eta * u + (1 - eta) * factor * y
    torch.testing.assert_close(utility.corrected_mean(), f / (1 - eta**7))
    torch.testing.assert_close(utility.corrected_utility(), u / (1 - eta**7))
    torch.testing.assert_close(utility.mean, f)
    torch.testing.assert_close(utility.decay_power, (eta**7).expand(2, 6))


@pytest.mark.parametrize("members", [1, 2])
def test_a_unit_without_incoming_weights_has_zero_utility_not_nan(members):
    net = dst.sparsify(dst.nets.mlp(4, [3], 1, generators=_generators(members)), density=0.5,
                       distribution="uniform", seed=list(range(members)))
    with torch.no_grad():
        member_view(net[0], net[0].mask)[-1, 1] = False
        net[0].apply_mask()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    strategy = dst.strategies.build("cbp", net, opt, replacement_rate=0.0, seed=list(range(members)))
    for _ in range(5):
        _step(net, opt, strategy, torch.rand(members, 2, 4), torch.rand(members, 2, 1))
    utility = strategy.utilities[0].corrected_utility()
    assert torch.isfinite(utility).all() and utility[-1, 1] == 0


@pytest.mark.parametrize("members", [1, 2])
def test_magnitude_every_reuses_the_sums_of_large_weights_between_refreshes(monkeypatch, members):
    import cbp.weights

    net = dst.nets.mlp(3, [50, 6], 1, generators=_generators(members))  # 150, 300 and 6 weights per member
    monkeypatch.setattr(cbp.weights, "AMORTISE_FROM", 100)  # the first two are "large"
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    strategy = dst.strategies.build("cbp", net, opt, maturity_threshold=1000, magnitude_every=4,
                                    seed=list(range(members)))
    sums = strategy.factors
    seen = []
    for _ in range(9):
        _step(net, opt, strategy, torch.randn(members, 2, 3), torch.randn(members, 2, 1))
        seen.append((sums.in_sums[0], sums.out_sums[0], sums.in_sums[1], sums.out_sums[1]))
    reused = [[now[k] is before[k] for k in range(4)] for before, now in itertools.pairwise(seen)]
    # layer 0's in (150) and out (300) sums and layer 1's in sums (300): taken at step 1, then at steps
    # 4 and 8 only; layer 1's outgoing sums come from the 6-weight output layer, taken every step
    refreshed = [False, False, True, False, False, False, True, False]  # steps 2..9
    assert reused == [[not r, not r, not r, False] for r in refreshed]
    exact = cbp.weights.weight_factors(strategy.layers, "adaptable_contribution")
    for a, b in zip(strategy.factors(True), exact):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["adaptable_contribution", "adaptation", "contribution"])
@pytest.mark.parametrize("net", ["mlp", "conv", "population"])
def test_amortised_sums_follow_replacements_exactly(monkeypatch, kind, net):
    import cbp.weights

    torch.manual_seed(0)
    members = 3 if net == "population" else 1
    if net == "conv":  # conv -> conv -> the flatten block of the last channel layer
        model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(), nn.Flatten(),
                              nn.Linear(5 * 2 * 2, 4), nn.ReLU(), nn.Linear(4, 1))
        x_shape = (1, 2, 2, 6, 6)
    else:
        model = dst.nets.mlp(3, [6, 5, 4], 1, generators=_generators(members))
        x_shape = (members, 2, 3)
    monkeypatch.setattr(cbp.weights, "AMORTISE_FROM", 1)  # every matrix amortised
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights change only by replacement
    strategy = dst.strategies.build("cbp", model, opt, utility=kind, maturity_threshold=0, replacement_rate=0.2,
                                    magnitude_every=1000, seed=list(range(members)))
    replaced = sum(_step(model, opt, strategy, torch.randn(x_shape), torch.randn(members, 2, 1)).sum()
                   for _ in range(12))
    assert replaced >= 12 * members
    cached = strategy.factors(False)  # no refresh: what the patched sums give
    exact = cbp.weights.WeightFactors(strategy.layers, kind)
    exact()
    # patched sums: float32 rounding only (compared as sums: 1 / mean|w_in| of a row the replacements emptied
    # magnifies a 1e-8 rounding residue without bound)
    for a, b in zip(strategy.factors.in_sums + strategy.factors.out_sums, exact.in_sums + exact.out_sums):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    fresh = strategy.utilities[0].age == 0
    assert fresh.any()
    if kind != "adaptation":
        assert (cached[0][fresh] == 0).all()  # a replaced unit's zeroed outgoing column


def test_an_amortised_population_resumes_from_a_state_dict_mid_schedule(monkeypatch, check_resume):
    import cbp.weights

    monkeypatch.setattr(cbp.weights, "AMORTISE_FROM", 1)

    def make():
        model = dst.nets.mlp(4, [6, 6], 2, generators=_generators(2))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        strategy = dst.strategies.build("cbp", model, opt, maturity_threshold=3, replacement_rate=0.05,
                                        magnitude_every=7, seed=[7, 8])
        return model, opt, strategy

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 2, generator=g)) for _ in range(60)]
    stats, resumed = check_resume(make, data, 31)  # 31: four steps after a refresh of the sums
    for a, b in zip(stats, resumed):
        np.testing.assert_array_equal(np.asarray(a.units_replaced), np.asarray(b.units_replaced))
    assert sum(np.sum(item.units_replaced) for item in stats) > 0


@pytest.mark.parametrize("kind", ["adaptable_contribution", "adaptation", "contribution"])
@pytest.mark.parametrize("net", ["mlp", "conv"])
@pytest.mark.parametrize("chunk", [1000, 1 << 18])
def test_large_weights_sums_from_one_blocked_pass_match_the_formulas(monkeypatch, kind, net, chunk):
    import cbp.weights
    from cbp.weights import WeightFactors

    monkeypatch.setattr(cbp.weights, "_CHUNK", chunk)  # 1000: many blocks of rows per weight
    torch.manual_seed(0)
    if net == "conv":  # 64 -> 128 -> 72 channels: 73,728 and 82,944 weights, then the flatten block
        model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 128, 3), nn.ReLU(),
                              nn.Conv2d(128, 72, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72 * 4, 5))
    else:  # a population of two, 90,000-weight hidden matrices per member
        model = dst.nets.mlp(300, [300, 300, 300], 10, generators=_generators(2))
    layers = dst.Topology.from_model(model).hidden_layers
    assert max(layer.incoming()[0].numel() for layer in layers) >= cbp.weights._FUSED_BELOW
    for layer, factor in zip(layers, WeightFactors(layers, kind)()):
        members, units = layer.incoming().shape[:2]
        incoming = layer.incoming().detach().abs().reshape(members, units, -1).mean(2)  # mean |w_in| per unit
        outgoing = layer.outgoing().detach().abs().reshape(members, layer.outgoing().shape[1], units, -1)
        outgoing = outgoing.mean((1, 3))  # mean |w_out| over the consumer rows and the unit's block / taps
        expected = {"adaptation": 1 / incoming, "contribution": outgoing,
                    "adaptable_contribution": outgoing / incoming}[kind]
        torch.testing.assert_close(factor, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("rate", [(1 / 8, 3 / 16, 1 / 64, 0.0, 5 / 32), (0.01, 0.007, 0.3, 1e-4, 0.05)],
                         ids=["dyadic", "decimal"])
def test_turnover_replaces_what_the_papers_running_accumulator_replaces_for_each_member(rate):
    from cbp.turnover import Turnover

    units, steps = 6, 400
    rate = np.array(rate)
    maturity = np.array([3, 0, 10, 2, 7])
    turnover = Turnover(units, rate, maturity)
    taken = np.stack([np.zeros(5, np.int64) if (c := turnover.take(t)) is None else c for t in range(1, steps + 1)])
    for s in range(5):  # the per-step rule, member by member: acc += r * eligible, replace floor(acc)
        unit_steps, replaced, ages, counts = 0, 0, [0] * units, []
        for _ in range(steps):
            ages = [age + 1 for age in ages]
            eligible = [i for i, age in enumerate(ages) if age > maturity[s]]
            unit_steps += len(eligible)  # acc = r * unit_steps - replaced, in exact arithmetic
            count = min(int(np.floor(rate[s] * unit_steps)) - replaced, len(eligible))
            replaced += count
            for i in eligible[:count]:
                ages[i] = 0
            counts.append(count)
        np.testing.assert_array_equal(taken[:, s], counts, err_msg=f"member {s}")
    assert taken.sum(0)[0] > 10
