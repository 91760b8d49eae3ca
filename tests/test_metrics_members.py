"""Plasticity metrics and the probe per population member: one batched call gives every member the value
its own matrix (or its own population of one) gives, and the values match hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dst import metrics
from dst.errors import ConfigError
from dst.masked import MaskedLinear, sparsify
from dst.nets import mlp
from dst.population import cross_entropy_per_member, forward, mse_per_member
from dst.probe import Probe
from dst.topology import Topology

SEEDS = [3, 11, 25]
FEATURE_METRICS = ["effective_rank", "srank", "approximate_rank", "stable_rank", "dead_fraction",
                   "dormant_fraction", "inactive_fraction"]


def with_spectrum(s: list[float], rows: int = 8, seed: int = 0) -> torch.Tensor:
    """A (rows x len(s)) float64 matrix U diag(s) V^T with random orthonormal U, V: its singular values are s."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(len(s), len(s), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T


def population_features() -> torch.Tensor:
    """(4, 30, 6) ReLU-like features: member s has its first s units dead, member 3 is rank one."""
    g = torch.Generator().manual_seed(0)
    h = torch.relu(torch.randn(4, 30, 6, generator=g))
    for member in range(3):
        h[member, :, :member] = 0.0
    h[3] = torch.outer(torch.rand(30, generator=g), torch.rand(6, generator=g))
    return h


# --- feature metrics: batched == one member at a time == by hand --------------------------------------


@pytest.mark.parametrize("name", FEATURE_METRICS)
def test_each_members_batched_value_equals_the_metric_of_its_own_matrix(name):
    h = population_features()
    batched = getattr(metrics, name)(h)
    assert batched.shape == (4,)
    alone = torch.stack([getattr(metrics, name)(h[member]) for member in range(4)])
    assert alone.shape == (4,) and batched.dtype == alone.dtype
    torch.testing.assert_close(batched, alone, rtol=1e-12, atol=0)


def test_saturated_and_spectral_ranks_are_batched_per_member_too():
    h = torch.tanh(3 * population_features() - 1)
    batched = metrics.saturated_fraction(h, "tanh")
    assert batched.tolist() == [float(metrics.saturated_fraction(h[m], "tanh")) for m in range(4)]
    ranks = metrics.spectral_ranks(h)
    for name, values in ranks.items():
        assert values.shape == (4,)
        torch.testing.assert_close(values, getattr(metrics, name)(h), rtol=0, atol=0)


def erank_by_hand(s: list[float]) -> float:
    total = sum(s)
    return math.exp(-sum(x / total * math.log(x / total) for x in s if x > 0))


def test_batched_ranks_recover_each_members_planted_spectrum():
    spectra = [[3.0, 2.0, 1.0, 0.0, 0.0], [2.0] * 5, [0.0] * 5, [10.0, 1.0, 1.0, 0.0, 0.0]]
    h = torch.stack([with_spectrum(s, seed=m) for m, s in enumerate(spectra)])
    h[2] = 0.0  # the zero matrix
    torch.testing.assert_close(
        metrics.singular_values(h), torch.tensor(spectra, dtype=torch.float64), rtol=0, atol=1e-12
    )
    erank = metrics.effective_rank(h).tolist()
    assert erank == pytest.approx([erank_by_hand(s) if any(s) else 0.0 for s in spectra], rel=1e-9)
    # srank at 0.99 on [10, 1, 1]: 10/12, 11/12, 12/12 -> 3; approximate rank on 100, 1, 1 of 102 -> 2
    assert metrics.srank(h).tolist() == [3, 5, 0, 3]
    assert metrics.approximate_rank(h).tolist() == [3, 5, 0, 2]
    assert metrics.stable_rank(h).tolist() == pytest.approx([14 / 9, 5.0, 0.0, 102 / 100], rel=1e-9)


def test_dead_and_dormant_fractions_count_each_members_planted_units():
    h = population_features()
    assert metrics.dead_fraction(h).tolist() == [0.0, 1 / 6, 2 / 6, 0.0]
    silent = torch.ones(2, 2, 4)
    silent[0] = 0.0  # member 0 is silent: every unit dormant
    silent[1, :, 3] = 0.05  # member 1: E|h| = 1, 1, 1, 0.05 -> score of unit 3 is 0.05 / 0.7625
    assert metrics.dormant_fraction(silent, tau=0.1).tolist() == [1.0, 0.25]
    assert metrics.dormant_fraction(silent, tau=0.05).tolist() == [1.0, 0.0]


def test_more_leading_dims_give_one_value_per_matrix():
    h = population_features().view(2, 2, 30, 6)
    assert metrics.dead_fraction(h).tolist() == [[0.0, 1 / 6], [2 / 6, 0.0]]
    assert metrics.srank(h).shape == (2, 2)


# --- model metrics per member ----------------------------------------------------------------------------


def generators(seeds=SEEDS):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def test_weight_magnitude_of_member_s_is_that_of_the_plain_model_with_seed_s():
    population = mlp(6, [5, 4], 3, generators=generators())
    result = metrics.weight_magnitude(population)
    assert set(result) == {"0", "2", "4", "overall"}
    for member, seed in enumerate(SEEDS):
        plain = metrics.weight_magnitude(mlp(6, [5, 4], 3, generator=torch.Generator().manual_seed(seed)))
        for name, values in result.items():
            assert values.shape == (3,)
            assert float(values[member]) == pytest.approx(float(plain[name]), rel=1e-12)


def test_weight_magnitude_active_only_counts_each_members_own_mask():
    population = sparsify(mlp(6, [5, 4], 3, generators=generators()), 0.5, seed=SEEDS)
    active = metrics.weight_magnitude(population, active_only=True)
    for member in range(3):
        total_sum, total_kept = 0.0, 0
        for name in ["0", "2", "4"]:
            layer = population.get_submodule(name)
            weight, mask = layer.weight[member].detach(), layer.mask[member]
            layer_sum, kept = float((weight.abs() * mask).sum()), int(mask.sum())
            assert float(active[name][member]) == pytest.approx(layer_sum / kept)
            total_sum, total_kept = total_sum + layer_sum, total_kept + kept
        assert float(active["overall"][member]) == pytest.approx(total_sum / total_kept)


def test_gradient_norm_of_member_s_is_the_norm_of_its_own_gradient():
    population = mlp(6, [5, 4], 3, generators=generators())
    assert metrics.gradient_norm(population).tolist() == [0.0, 0.0, 0.0]
    x = torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randn(3, 8, 3, generator=torch.Generator().manual_seed(2))
    mse_per_member(forward(population, x), y).sum().backward()
    value = metrics.gradient_norm(population)
    assert value.shape == (3,)
    for member, seed in enumerate(SEEDS):
        plain = mlp(6, [5, 4], 3, generator=torch.Generator().manual_seed(seed))
        F.mse_loss(plain(x[member]), y[member]).backward()
        expected = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in plain.parameters()))
        assert float(value[member]) == pytest.approx(expected, rel=1e-5)


def test_model_metrics_refuse_layers_of_different_population_sizes():
    model = nn.Sequential(MaskedLinear(2, 3, members=2), nn.ReLU(), nn.Linear(3, 1))
    with pytest.raises(ConfigError, match="members"):
        metrics.weight_magnitude(model)


# --- the probe ---------------------------------------------------------------------------------------


def probe_batch(members: int = 3, examples: int = 40):
    x = torch.rand(members, examples, 6, generator=torch.Generator().manual_seed(5))
    y = torch.randint(0, 3, (members, examples), generator=torch.Generator().manual_seed(6))
    return x, y


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_probe_row_of_member_s_equals_the_probe_of_member_s_alone_as_population_or_plain_model(activation):
    population = mlp(6, [5, 4], 3, activation, generators=generators())
    with torch.no_grad():  # member 1's unit 2 of layer 0 never fires on inputs in [0, 1)
        population[0].weight[1, 2] = -1.0
        population[0].bias[1, 2] = -1.0
    x, y = probe_batch()
    probe = Probe()
    rows = probe(population, Topology.from_model(population), x, y, cross_entropy_per_member)
    assert len(rows) == 3
    for member, seed in enumerate(SEEDS):
        alone = mlp(6, [5, 4], 3, activation, generators=generators([seed]))
        plain = mlp(6, [5, 4], 3, activation, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            alone[0].weight.copy_(population[0].weight[member : member + 1])
            alone[0].bias.copy_(population[0].bias[member : member + 1])
            plain[0].weight.copy_(population[0].weight[member])
            plain[0].bias.copy_(population[0].bias[member])
        for model in (alone, plain):
            row = probe(model, Topology.from_model(model), x[member : member + 1], y[member : member + 1],
                        cross_entropy_per_member)[0]
            assert rows[member].keys() == row.keys()
            assert ("saturated_fraction_0" in row) == (activation == "tanh")
            for name, value in row.items():
                if name != "probe_seconds":
                    assert rows[member][name] == pytest.approx(value, rel=1e-5, abs=1e-12), name
    if activation == "relu":  # by hand: units of layer 0 that are 0 on all 40 examples, per member
        hidden = torch.relu(x @ population[0].weight.detach().mT + population[0].bias.detach()[:, None])
        dead = (hidden == 0).all(1).double().mean(1).tolist()
        assert [row["dead_fraction_0"] for row in rows] == dead
        assert dead[1] >= 0.2 and len(set(dead)) > 1


def test_probe_reports_a_planted_dead_unit_weight_magnitudes_and_the_gradient_norm_of_a_plain_model():
    net = mlp(5, [4], 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # on inputs in [0, 1) unit 1 never fires and the others always do
        net[0].weight.abs_()
        net[0].bias.fill_(0.1)
        net[0].weight[1] = -1.0
        net[0].bias[1] = -1.0
    x = torch.rand(1, 50, 5, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 2, (1, 50), generator=torch.Generator().manual_seed(2))
    (row,) = Probe()(net, Topology.from_model(net), x, y, cross_entropy_per_member)
    assert row["dead_fraction_0"] == 0.25 and row["dead_fraction"] == 0.25
    assert row["effective_rank_0"] <= 3 + 1e-9
    assert row["weight_magnitude_0"] == pytest.approx(net[0].weight.abs().mean().item())
    grads = torch.autograd.grad(F.cross_entropy(net(x[0]), y[0]), list(net.parameters()))
    assert row["gradient_norm"] == pytest.approx(math.sqrt(sum(float(g.pow(2).sum()) for g in grads)), rel=1e-6)
    assert net[0].weight.grad is None  # the probe's gradient is computed aside
    assert all(isinstance(value, float) for value in row.values())


def test_probe_treats_a_conv_channel_as_one_unit_and_ranks_whole_maps(tiny_convnet):
    net = tiny_convnet()
    with torch.no_grad():  # channel 0 of the first conv never fires on inputs in [0, 1)
        net[0].weight[0] = -1.0
        net[0].bias[0] = -1.0
    x = torch.rand(1, 12, 2, 14, 14, generator=torch.Generator().manual_seed(3))
    (row,) = Probe()(net, Topology.from_model(net), x)
    assert row["dead_fraction_0"] == 0.25  # 1 of 4 channels
    # overall: the 4 + 6 + 8 hidden units side by side, a conv channel as one unit
    dead = 4 * row["dead_fraction_0"] + 6 * row["dead_fraction_1"] + 8 * row["dead_fraction_2"]
    assert row["dead_fraction"] == pytest.approx(dead / 18)
    first = torch.relu(net[0](x[0])).detach()  # (12, 4, 12, 12)
    assert row["srank_0"] == float(metrics.srank(first.reshape(12, -1)))
    assert "gradient_norm" not in row


def test_probe_of_one_hidden_layer_reports_that_layers_values_as_the_overall_ones():
    population = mlp(6, [5], 3, "tanh", generators=generators())
    x, y = probe_batch()
    rows = Probe()(population, Topology.from_model(population), x, y, cross_entropy_per_member)
    hidden = torch.tanh(x @ population[0].weight.detach().mT + population[0].bias.detach()[:, None])
    expected = metrics.spectral_ranks(hidden)
    for member, row in enumerate(rows):
        for name, values in expected.items():
            assert row[name] == row[f"{name}_0"] == pytest.approx(float(values[member]), rel=1e-9)
        assert row["saturated_fraction_0"] == float(metrics.saturated_fraction(hidden[member], "tanh"))
        assert "saturated_fraction" not in row  # overall values have no activation of their own
