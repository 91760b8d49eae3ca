"""SET and RigL: exact counts, masked invariants, schedules, regrowth values, determinism."""

import math

import numpy as np
import pytest
import torch

import dst
from dst.optim import ElementwiseAdam
from dst.prune_regrow import DropSchedule


def _sparse_net(seed=0, density=0.3):
    torch.manual_seed(seed)
    return dst.sparsify(dst.nets.mlp(12, [16, 16], 3), density=density, distribution="erk", seed=seed)


def _step(net, opt, strategy, x, y):
    loss = ((net(x) - y) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    strategy.before_step()
    opt.step()
    return strategy.after_step()


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 12, generator=g), torch.randn(4, 3, generator=g)) for _ in range(n)]


OPTIMIZERS = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
    "elementwise-adam": lambda p: ElementwiseAdam(p, lr=1e-2),
}


@pytest.mark.parametrize("name", ["set", "rigl"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_active_counts_are_unchanged_and_masked_state_stays_zero_over_many_refreshes(name, optimizer):
    net = _sparse_net()
    opt = OPTIMIZERS[optimizer](net.parameters())
    strategy = dst.strategies.build(name, net, opt, update_interval=5, schedule="constant", seed=0)
    counts = [int(layer.mask.sum()) for layer in strategy.masked]
    regrown = 0
    for x, y in _data(60):
        loss = ((net(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        strategy.before_step()
        for layer in strategy.masked:  # the gradient handed to the optimizer
            assert (layer.weight.grad[~layer.mask] == 0).all()
        opt.step()
        regrown += strategy.after_step().connections_regrown
        for layer, count in zip(strategy.masked, counts):
            assert int(layer.mask.sum()) == count
            assert (layer.weight[~layer.mask] == 0).all()
            for value in opt.state[layer.weight].values():
                if isinstance(value, torch.Tensor) and value.shape == layer.weight.shape:
                    assert (value[~layer.mask] == 0).all()
    assert regrown == 12 * sum(round(0.3 * c) for c in counts)


def test_set_drops_exactly_the_smallest_magnitudes_and_regrows_as_many():
    net = _sparse_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    strategy = dst.strategies.build("set", net, opt, update_interval=1, drop_fraction=0.25, seed=0)
    layer = strategy.masked[0]
    magnitude = layer.weight.detach().abs().flatten()
    active = layer.mask.flatten().clone()
    positions, counts = strategy.drop_indices(0, layer, np.array([0]), np.array([0.25]))
    dropped = positions[0, : counts[0]]
    assert dropped.numel() == round(0.25 * int(active.sum())) == dropped.unique().numel()
    assert active[dropped].all()
    kept = active.clone()
    kept[dropped] = False
    assert magnitude[dropped].max() <= magnitude[kept].min()
    x, y = _data(1)[0]
    before = layer.mask.clone()
    stats = _step(net, opt, strategy, x, y)
    assert int((layer.mask & ~before).sum()) <= dropped.numel()  # regrown among free positions
    assert int(layer.mask.sum()) == int(before.sum())
    assert stats.connections_regrown.tolist() == [sum(round(0.25 * int(c[0])) for c in strategy.active)]


def test_rigl_grows_where_the_dense_gradient_is_largest_and_grown_weights_start_at_zero():
    net = _sparse_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    strategy = dst.strategies.build("rigl", net, opt, update_interval=1, schedule="constant", drop_fraction=0.2,
                                    seed=0)
    layer = strategy.masked[0]
    x, y = _data(1)[0]
    before = layer.mask.clone()
    loss = ((net(x) - y) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    dense = layer.weight.grad.clone()  # dense gradient: nonzero at inactive positions too
    assert (dense[~before] != 0).any()
    strategy.before_step()
    opt.step()
    strategy.after_step()
    grown = layer.mask & ~before
    k = int(grown.sum())
    assert k > 0
    assert (layer.weight[grown] == 0).all()
    # grown positions are the top-|grad| candidates among positions inactive after the drop
    candidates = ~layer.mask | grown
    cutoff = dense.abs()[candidates].sort(descending=True).values[k - 1]
    assert (dense.abs()[grown] >= cutoff).all()


def test_grow_init_random_gives_small_nonzero_values_and_zero_optimizer_state():
    net = _sparse_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    strategy = dst.strategies.build("set", net, opt, update_interval=3, grow_init="random", grow_scale=0.1, seed=0)
    layer = strategy.masked[0]
    data = _data(3)
    for x, y in data[:2]:
        _step(net, opt, strategy, x, y)
    before = layer.mask.clone()
    _step(net, opt, strategy, *data[2])
    grown = layer.mask & ~before
    bound = 0.1 / math.sqrt(12)
    assert grown.any()
    assert (layer.weight[grown] != 0).all() and (layer.weight[grown].abs() <= bound).all()
    assert (opt.state[layer.weight]["momentum_buffer"][grown] == 0).all()


def test_a_just_dropped_position_regrown_at_once_restarts_at_the_grow_value():
    torch.manual_seed(0)
    # uniform 75%: the output layer has 36 of 48 positions active and only 12 free, so dropping all 36
    # and regrowing 36 must reuse at least 36 - 12 = 24 of the positions just dropped
    net = dst.sparsify(dst.nets.mlp(12, [16, 16], 3), density=0.75, distribution="uniform", seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    strategy = dst.strategies.build("rigl", net, opt, update_interval=2, schedule="constant", drop_fraction=1.0,
                                    seed=0)
    layer = strategy.masked[-1]
    assert (int(layer.mask.sum()), layer.mask.numel()) == (36, 48)
    data = _data(2)
    _step(net, opt, strategy, *data[0])
    before_mask, before_weight = layer.mask.clone(), layer.weight.clone()
    _step(net, opt, strategy, *data[1])
    kept = before_mask & layer.mask  # dropped and regrown in the same update
    assert int(kept.sum()) >= 24 and int(layer.mask.sum()) == 36
    assert (before_weight[kept] != 0).all()
    assert (layer.weight[kept] == 0).all()
    assert (opt.state[layer.weight]["momentum_buffer"][kept] == 0).all()


def test_drop_fraction_follows_the_cosine_schedule():
    schedule = DropSchedule("cosine", 0.3, 100, end_step=1000)
    assert schedule(50, 50) is None  # not an update step
    assert schedule(100, 100) == pytest.approx([0.15 * (1 + math.cos(math.pi * 0.1))])
    assert schedule(500, 500) == pytest.approx([0.15])
    assert schedule(1000, 1000) is None  # f = 0 at T_end
    assert schedule(1100, 1100) is None


def test_cosine_per_task_restarts_at_every_task_boundary():
    schedule = DropSchedule("cosine-per-task", 0.3, 10, end_step=0)
    # 0.75 x a 100-step task = 75
    assert schedule(110, 10, task_steps=100) == pytest.approx(schedule(10, 10, task_steps=100))
    assert schedule(180, 80, task_steps=100) is None
    assert schedule(210, 10, task_steps=100) == pytest.approx([0.15 * (1 + math.cos(math.pi * 10 / 75))])


def test_stop_and_constant_schedules():
    assert DropSchedule("constant", 0.3, 10)(10_000, 0).tolist() == [0.3]
    stop = DropSchedule("stop", 0.3, 10, end_step=100)
    assert stop(100, 0).tolist() == [0.3] and stop(110, 0) is None


def test_each_member_has_its_own_fraction_interval_and_end():
    schedule = DropSchedule("cosine", [0.3, 0.2, 0.4], [10, 20, 10], end_step=[100, 100, 0])
    # step 20: everyone updates; member 2's T_end is 0.75 x 200 = 150
    expected = [0.15 * (1 + math.cos(math.pi * 0.2)), 0.1 * (1 + math.cos(math.pi * 0.2)),
                0.2 * (1 + math.cos(math.pi * 20 / 150))]
    assert schedule(20, 20, total_steps=200) == pytest.approx(expected)
    # step 30: member 1 waits for step 40
    assert schedule(30, 30, total_steps=200)[1] == 0
    # step 120: past T_end = 100 for members 0 and 1, not for member 2
    fractions = schedule(120, 120, total_steps=200)
    assert fractions[:2].tolist() == [0, 0] and fractions[2] == pytest.approx(0.2 * (1 + math.cos(math.pi * 0.8)))
    assert schedule(160, 160, total_steps=200) is None


def test_default_end_step_is_three_quarters_of_the_run_from_the_horizon():
    net = _sparse_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    strategy = dst.strategies.build("rigl", net, opt, update_interval=10, seed=0)
    with pytest.raises(dst.ConfigError, match="set_horizon"):
        strategy.fractions(10)
    strategy.set_horizon(1000)
    assert strategy.fractions(750) is None and strategy.fractions(740)[0] > 0


def test_rigl_per_task_schedule_restarts_in_the_experiment_loop():
    df = dst.runner.run(
        dst.RunSpec(steps=2000, bench={"hidden": (30,), "density": 0.2, "change_every": 500, "bin_size": 250},
                    strategy="rigl", settings={"schedule": "cosine-per-task", "update_interval": 50}),
        progress=False,
    )
    regrown = df["connections_regrown"].tolist()
    assert regrown[0] > regrown[1] > 0  # decays within the task ...
    assert regrown[2] == regrown[0] and regrown[4] == regrown[0]  # ... and restarts at each boundary


def test_set_split_sign_drops_within_each_sign():
    net = _sparse_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    strategy = dst.strategies.build("set", net, opt, update_interval=1, split_sign=True, drop_fraction=0.5, seed=0)
    layer = strategy.masked[0]
    weight = layer.weight.detach()
    positives, negatives = layer.mask & (weight > 0), layer.mask & (weight < 0)
    positions, counts = strategy.drop_indices(0, layer, np.array([0]), np.array([0.5]))
    dropped = positions[0, : counts[0]]
    assert counts[0] == round(0.5 * int(positives.sum())) + round(0.5 * int(negatives.sum()))
    flat_pos, flat_neg = positives.flatten()[dropped], negatives.flatten()[dropped]
    assert int(flat_pos.sum()) == round(0.5 * int(positives.sum()))
    assert int(flat_neg.sum()) == round(0.5 * int(negatives.sum()))
    largest_dropped_positive = weight.flatten()[dropped][flat_pos].max()
    kept_positive = weight[positives].sort().values[round(0.5 * int(positives.sum())):]
    assert (kept_positive >= largest_dropped_positive).all()


@pytest.mark.parametrize("name", ["set", "rigl"])
def test_results_are_deterministic_for_a_seed_and_state_dict_round_trips(name, check_resume):
    def make():
        net = _sparse_net(seed=1)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        strategy = dst.strategies.build(name, net, opt, update_interval=4, schedule="constant", seed=5)
        return net, opt, strategy

    data = _data(40, seed=2)
    check_resume(make, data, 21)
    first, second = make(), make()
    for x, y in data:
        _step(*first, x, y)
        _step(*second, x, y)
    for a, b in zip(first[0].state_dict().values(), second[0].state_dict().values()):
        assert torch.equal(a, b)


def test_connection_strategies_on_a_dense_model_are_a_clear_error():
    net = dst.nets.mlp(4, [8], 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(dst.TopologyError, match="sparsify"):
        dst.strategies.build("rigl", net, opt)


def _reference_ranking(scores, largest):
    """Each row's positions best first, ties to the lower position: a stable sort."""
    keys = -scores if largest else scores
    return keys.sort(dim=1, stable=True).indices


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("n", [1000, 400_000])  # ranked in full; narrowed by a sampled threshold first
def test_ranked_picks_each_rows_best_with_ties_to_the_lower_position(n, largest):
    from dst.ranking import ranked

    g = torch.Generator().manual_seed(n)
    scores = torch.rand(3, n, generator=g)
    scores[torch.rand(3, n, generator=g) < 0.5] = -torch.inf if largest else torch.inf  # e.g. masked out
    scores[:, : n // 100] = 0.5  # a block of ties
    scores[1, n // 2 :] = 0.25  # a row with ties straddling every cut
    reference = _reference_ranking(scores, largest)
    for counts in ([1, 1, 1], [n // 40, n // 40, n // 40], [n // 10, 3, n // 40], [0, n // 25, 7]):
        chosen = ranked(scores, np.array(counts), largest=largest)
        assert chosen.shape == (3, max(counts))
        for row, count in enumerate(counts):
            assert sorted(chosen[row, :count].tolist()) == sorted(reference[row, :count].tolist())


def test_set_random_growth_is_a_uniform_subset_of_inactive_positions():
    from scipy.stats import chisquare

    net = dst.sparsify(dst.nets.mlp(10, [8], 2), density=0.2, distribution="uniform", seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    strategy = dst.strategies.build("set", net, opt, seed=0)
    layer = strategy.masked[0]
    mask = layer.mask.view(1, -1).clone()
    active = int(mask.sum())
    counts = torch.zeros(mask.numel())
    draws, count = 1000, 4
    for step in range(draws):
        strategy.step = step  # each step draws afresh
        grown = strategy.grow_indices(0, layer, np.array([0]), np.array([count]), mask)[0]
        assert grown.numel() == count and grown.unique().numel() == count  # exact count, no repeats
        assert not mask[0, grown].any()  # only inactive positions
        counts[grown] += 1
    assert int(layer.mask.sum()) == active
    inactive = counts[~mask[0]]
    assert chisquare(inactive.numpy()).pvalue > 1e-3  # each inactive position equally likely


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # packed int64 keys; the selection path
def test_ranked_over_many_rows_with_ties_signed_zeros_and_infinities_is_a_stable_sort(largest, dtype):
    from dst.ranking import ranked

    g = torch.Generator().manual_seed(7)
    rows, n = 200, 300
    scores = torch.randn(rows, n, generator=g).to(dtype)
    scores[torch.rand(rows, n, generator=g) < 0.3] = 0.0
    scores[torch.rand(rows, n, generator=g) < 0.1] = -0.0  # ties with 0.0
    scores[torch.rand(rows, n, generator=g) < 0.1] = torch.inf
    scores[torch.rand(rows, n, generator=g) < 0.1] = -torch.inf
    scores[::4] = 0.0  # whole rows of ties: a unit whose gradient is 0
    reference = _reference_ranking(scores, largest)
    for counts in (np.full(rows, 17), np.arange(rows) % n + 1):
        chosen = ranked(scores, counts, largest=largest)
        for row, count in enumerate(counts):
            assert sorted(chosen[row, :count].tolist()) == sorted(reference[row, :count].tolist()), row
