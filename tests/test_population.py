"""The population core: member random numbers, population layers and nets, views, surgery, strategy base.

Member s of a population must be exactly the run of a population of one with seed s, so most tests
compare a member against a model of its own built independently (plain torch layers, ``F.linear``,
torch's losses, loops over members and outputs written out by hand).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dst.strategies
from dst import nets
from dst.config import setting
from dst.errors import ConfigError, TopologyError
from dst.masked import MaskedLinear, mask_gradients, sparsify
from dst.population import (
    MemberRandom,
    check_seeds,
    cross_entropy_per_member,
    forward,
    is_population,
    members,
    mse_per_member,
)
from dst.population import _DRAW, _GOLDEN, _STEP
from dst.refresh import Backprop, BackpropConfig, RefreshStrategy, StrategyConfig
from dst.surgery import UnitSelection, replace_units
from dst.sparsity import layer_densities
from dst.topology import Topology

SEEDS = (5, 9, 2)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
INITS = ["kaiming", "lecun", "xavier", "default"]


def _population(seeds=SEEDS, hidden=(5, 4), in_features=6, out_features=3, activation="relu", init="kaiming"):
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return nets.mlp(in_features, list(hidden), out_features, activation, init=init, generators=generators)


def _plain(seed, hidden=(5, 4), in_features=6, out_features=3, activation="relu", init="kaiming"):
    generator = torch.Generator().manual_seed(seed)
    return nets.mlp(in_features, list(hidden), out_features, activation, init=init, generator=generator)


def _linears(model):
    return [module for module in model if isinstance(module, nn.Linear)]


# -- 1. MemberRandom ------------------------------------------------------------------------------


def _splitmix64(state: int, count: int) -> list[int]:
    """Vigna's reference splitmix64 on Python ints: the next ``count`` outputs from ``state``."""
    mask, out = (1 << 64) - 1, []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


def _kolmogorov_smirnov(sample: torch.Tensor, cdf) -> float:
    """sqrt(n) * sup |F_n - F|: above 1.95 with probability 1e-3 for a sample of the distribution."""
    n = sample.numel()
    values = cdf(sample.flatten().double().sort().values)
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    return math.sqrt(n) * max((ranks / n - values).max().item(), (values - (ranks - 1) / n).max().item())


def test_bits_are_the_splitmix64_stream_of_the_member_key_step_and_draw():
    key, step, draw = 123456789, 7, 3
    base = _splitmix64((step * _STEP + draw * _DRAW - 0x9E3779B97F4A7C15) % 2**64, 1)[0]
    start = _splitmix64((key ^ base) - 0x9E3779B97F4A7C15, 1)[0]  # mix(key ^ base)
    expected = [v - 2**64 if v >= 2**63 else v for v in _splitmix64(start, 12)]
    bits = MemberRandom([key]).bits((3, 4), step=step, draw=draw)
    assert bits.flatten().tolist() == expected
    assert _GOLDEN == 0x9E3779B97F4A7C15 - 2**64


@pytest.mark.parametrize("kind", ["bits", "uniform", "normal"])
def test_a_member_draws_the_same_numbers_in_any_population(kind):
    population, alone = MemberRandom.derived(SEEDS, 21), MemberRandom.derived((9,), 21)
    draw = lambda random, **kw: getattr(random, kind)((4, 6), step=11, draw=2, **kw)  # noqa: E731
    full = draw(population)
    assert full.shape == (3, 4, 6)
    assert torch.equal(full[1], draw(alone)[0])
    assert torch.equal(draw(population, members=torch.tensor([2, 0, 2])), full[[2, 0, 2]])
    assert torch.equal(draw(population), full)  # reproducible across calls


@pytest.mark.parametrize("kind", ["bits", "uniform", "normal"])
def test_rows_give_the_rows_of_the_full_draw_without_drawing_the_rest(kind):
    random = MemberRandom.derived(SEEDS, 21)
    full = getattr(random, kind)((5, 6), step=3, draw=1)
    chosen, rows = torch.tensor([0, 2, 2, 1]), torch.tensor([4, 0, 3, 4])
    partial = getattr(random, kind)((6,), step=3, draw=1, members=chosen, rows=rows)
    assert torch.equal(partial, full[chosen, rows])


def test_step_draw_and_key_each_change_every_value():
    random = MemberRandom([1, 2])
    reference = random.uniform((1000,), step=4, draw=0)
    for other in (random.uniform((1000,), step=5, draw=0), random.uniform((1000,), step=4, draw=1)):
        assert (other != reference).float().mean() > 0.99
    assert (reference[0] != reference[1]).float().mean() > 0.99


def test_uniform_is_uniform_on_the_half_open_unit_interval():
    u = MemberRandom([2024, 7]).uniform((100_000,), step=0).flatten()
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.003  # standard error 0.00065
    assert abs(u.var().item() - 1 / 12) < 0.002
    assert _kolmogorov_smirnov(u, lambda x: x) < 1.95


def test_float64_uniform_has_53_bits_and_starts_with_the_float32_bits():
    random = MemberRandom([31, 8])
    u64 = random.uniform((10_000,), step=2, draw=5, dtype=torch.float64)
    u32 = random.uniform((10_000,), step=2, draw=5)
    assert u64.dtype == torch.float64 and u64.min() >= 0 and u64.max() < 1
    assert torch.equal(torch.floor(u64 * 2**24).float() * 2**-24, u32)  # both take the top bits
    assert (u64 * 2**24 != torch.floor(u64 * 2**24)).float().mean() > 0.99  # more than 24 bits
    assert _kolmogorov_smirnov(u64, lambda x: x) < 1.95


def test_normal_is_standard_normal():
    z = MemberRandom([99, 3]).normal((100_000,), step=1, draw=4).flatten()
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert _kolmogorov_smirnov(z, torch.special.ndtr) < 1.95


def test_normal_is_box_muller_of_the_bits_across_blocks_of_positions():
    # 3 x 200,000 values: several of the blocks the CPU computes them in (checked against float64 math)
    random = MemberRandom([5, 6, 7])
    bits = random.bits((200_000,), step=2, draw=1).numpy().view(np.uint64)
    u1 = ((bits >> np.uint64(40)).astype(np.float64) + 1) / 2**24
    u2 = (bits & np.uint64(2**24 - 1)).astype(np.float64) / 2**24
    expected = np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)
    z = random.normal((200_000,), step=2, draw=1)
    assert z.shape == (3, 200_000)
    np.testing.assert_allclose(z.numpy(), expected, rtol=0, atol=2e-5)
    chosen, rows = torch.tensor([2, 0]), torch.tensor([1, 0])
    full = random.normal((2, 100_000), step=2, draw=1)
    assert torch.equal(random.normal((100_000,), step=2, draw=1, members=chosen, rows=rows), full[chosen, rows])


@pytest.mark.parametrize("device", DEVICES)
def test_draws_on_any_device_equal_the_cpu_draws(device):
    cpu = MemberRandom.derived(SEEDS, 21)
    there = cpu.to(device)
    rows = torch.tensor([1, 0], device=device)
    members_ = torch.tensor([2, 0], device=device)
    assert there.uniform((3,), step=1).device.type == device
    assert torch.equal(there.bits((7,), step=9, draw=2).cpu(), cpu.bits((7,), step=9, draw=2))
    assert torch.equal(
        there.uniform((7,), step=9, members=members_, rows=rows).cpu(),
        cpu.uniform((7,), step=9, members=members_.cpu(), rows=rows.cpu()),
    )


# -- 2. check_seeds -------------------------------------------------------------------------------


def test_check_seeds_accepts_an_int_or_a_sequence_of_distinct_ints():
    assert check_seeds(7) == (7,)
    assert check_seeds([5, 9, 2]) == (5, 9, 2)
    assert check_seeds(range(3)) == (0, 1, 2)


@pytest.mark.parametrize(
    "seeds, message",
    [
        ([], "at least one seed"),
        (True, "must be an integer, got True"),
        ([1, False], "must be integers, got False"),
        ([1, 2.0], "must be integers, got 2.0"),
        (["3"], "must be integers, got '3'"),
        (None, "an integer or a sequence of integers, got None"),
        ([4, 1, 4, 1, 2], "seeds [1, 4] appear twice"),
    ],
)
def test_check_seeds_names_the_problem(seeds, message):
    with pytest.raises(ConfigError) as error:
        check_seeds(seeds, distinct=True)
    assert message in str(error.value)


def test_a_population_may_hold_a_seed_twice_where_folders_are_not_named_by_seed():
    assert check_seeds([4, 1, 4]) == (4, 1, 4)


# -- 3. population layers and nets ----------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_population_layer_is_one_linear_per_member(bias):
    torch.manual_seed(0)
    layer = MaskedLinear(5, 4, bias=bias, members=3)
    assert layer.weight.shape == (3, 4, 5) and layer.mask is None
    assert (layer.bias is None) if not bias else layer.bias.shape == (3, 4)
    x = torch.randn(3, 2, 5)
    out = layer(x)
    assert out.shape == (3, 2, 4)
    for s in range(3):
        expected = F.linear(x[s], layer.weight[s], None if layer.bias is None else layer.bias[s])
        torch.testing.assert_close(out[s], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "shape", [(2, 2, 5), (3, 5), (3, 2, 4)]
)
def test_population_layer_names_the_input_shape_it_expects(shape):
    with pytest.raises(ConfigError, match=r"3 members takes inputs shaped \(members, batch, 5\)"):
        MaskedLinear(5, 4, members=3)(torch.zeros(shape))


@pytest.mark.parametrize("size", [0, -1, True, 2.0])
def test_population_layer_refuses_a_size_that_is_not_a_positive_int(size):
    with pytest.raises(ConfigError, match="members must be a positive integer"):
        MaskedLinear(5, 4, members=size)


@pytest.mark.parametrize("init", INITS)
def test_population_member_equals_a_population_of_one_from_its_generator(init):
    population = _population(init=init)
    for s, seed in enumerate(SEEDS):
        alone = _population(seeds=(seed,), init=init)
        for ours, theirs in zip(population.parameters(), alone.parameters()):
            assert torch.equal(ours[s], theirs[0])
    assert not torch.equal(population[0].weight[0], population[0].weight[1])


@pytest.mark.parametrize(
    "init", [*INITS[:3], "default"]
)
def test_population_member_equals_the_plain_mlp_from_its_generator(init):
    population = _population(init=init)
    x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1))
    out = forward(population, x)
    for s, seed in enumerate(SEEDS):
        plain = _plain(seed, init=init)
        for ours, theirs in zip(population.parameters(), plain.parameters()):
            assert torch.equal(ours[s], theirs)
        torch.testing.assert_close(out[s], plain(x[s]), rtol=0, atol=1e-6)


def test_sparsified_member_has_the_masks_of_the_plain_model_sparsified_with_its_seed():
    population = sparsify(_population(), 0.4, seed=list(SEEDS))
    for s, seed in enumerate(SEEDS):
        plain = sparsify(_plain(seed), 0.4, seed=seed)
        for ours, theirs in zip(_linears(population), _linears(plain)):
            assert torch.equal(ours.mask[s], theirs.mask)
            assert torch.equal(ours.weight[s], theirs.weight)
    assert not torch.equal(population[0].mask[0], population[0].mask[1])


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_every_member_gets_exactly_the_layer_budget_of_active_weights(distribution):
    model = sparsify(_population(hidden=(20, 10), in_features=12), 0.3, distribution, seed=list(SEEDS))
    shapes = [(20, 12), (10, 20), (3, 10)]
    if distribution == "uniform":
        counts = [72, 60, 9]  # round(0.3 * 240), round(0.3 * 200), round(0.3 * 30)
    else:
        counts = [round(d * math.prod(shape)) for d, shape in zip(layer_densities(shapes, 0.3, "erk"), shapes)]
    for layer, count in zip(_linears(model), counts):
        assert layer.mask.sum(dim=(1, 2)).tolist() == [count] * 3
        assert torch.all(layer.weight[~layer.mask] == 0)


def test_sparsify_needs_one_seed_per_member():
    with pytest.raises(ConfigError, match="2 seeds for a population of 3"):
        sparsify(_population(), 0.5, seed=[1, 2])


# -- 4. population helpers ------------------------------------------------------------------------


def test_members_and_is_population_tell_populations_from_plain_models():
    assert members(_population()) == 3 and is_population(_population())
    assert members(_population(seeds=(4,))) == 1 and is_population(_population(seeds=(4,)))
    assert members(_plain(4)) == 1 and not is_population(_plain(4))
    mixed = nn.Sequential(MaskedLinear(2, 3, members=2), MaskedLinear(3, 1, members=3))
    with pytest.raises(ConfigError, match=r"mixes population layers of sizes \[2, 3\]"):
        members(mixed)


def test_forward_runs_a_plain_model_on_its_one_member_and_refuses_more():
    plain, x = _plain(0), torch.randn(1, 4, 6)
    assert torch.equal(forward(plain, x), plain(x[0]).unsqueeze(0))
    with pytest.raises(ConfigError, match="population of one, but the inputs hold 2 members"):
        forward(plain, torch.randn(2, 4, 6))


def test_per_member_losses_equal_torch_losses_member_by_member():
    generator = torch.Generator().manual_seed(0)
    output, target = torch.randn(3, 5, 2, 2, generator=generator), torch.randn(3, 5, 2, 2, generator=generator)
    expected = torch.stack([F.mse_loss(output[s], target[s]) for s in range(3)])
    torch.testing.assert_close(mse_per_member(output, target), expected, rtol=1e-6, atol=0)
    logits, labels = torch.randn(3, 5, 4, generator=generator), torch.randint(0, 4, (3, 5), generator=generator)
    expected = torch.stack([F.cross_entropy(logits[s], labels[s]) for s in range(3)])
    torch.testing.assert_close(cross_entropy_per_member(logits, labels), expected, rtol=1e-6, atol=0)


def test_summed_member_losses_give_each_member_the_gradient_of_its_own_run():
    population = _population()
    x, y = torch.randn(3, 4, 6), torch.randn(3, 4, 3)
    mse_per_member(forward(population, x), y).sum().backward()
    for s, seed in enumerate(SEEDS):
        plain = _plain(seed)
        F.mse_loss(plain(x[s]), y[s]).backward()
        for ours, theirs in zip(population.parameters(), plain.parameters()):
            torch.testing.assert_close(ours.grad[s], theirs.grad, rtol=1e-5, atol=1e-6)


# -- 5. topology views ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [3, None])
def test_views_are_member_first_and_write_through(size):
    model = _population() if size else _plain(0)
    S = size or 1
    layer = Topology.from_model(model).hidden_layers[0]  # Linear(6, 5) -> ReLU -> Linear(5, 4)
    assert (layer.members, layer.n_units, layer.block) == (S, 5, 1)
    assert layer.incoming().shape == (S, 5, 6) and layer.incoming_bias().shape == (S, 5)
    assert layer.outgoing().shape == (S, 4, 5) and layer.consumer_bias().shape == (S, 4)
    assert layer.outgoing_weights().shape == (S, 4, 5, 1) and layer.incoming_mask() is None
    member = S - 1
    with torch.no_grad():
        layer.incoming()[member, 2, 3] = 7.0
        layer.incoming_bias()[member, 1] = 6.0
        layer.outgoing()[member, 0, 4] = 5.0
        layer.consumer_bias()[member, 3] = 4.0
        layer.outgoing_weights()[member, 1, 2, 0] = 3.0
    index = (member,) if size else ()
    assert model[0].weight[index + (2, 3)] == 7.0 and model[0].bias[index + (1,)] == 6.0
    assert model[2].weight[index + (0, 4)] == 5.0 and model[2].bias[index + (3,)] == 4.0
    assert model[2].weight[index + (1, 2)] == 3.0


@pytest.mark.parametrize("size", [3, None])
def test_incoming_mask_is_the_member_first_producer_mask(size):
    model = sparsify(_population() if size else _plain(0), 0.5, seed=list(SEEDS) if size else 1)
    layer = Topology.from_model(model).hidden_layers[1]
    mask = layer.incoming_mask()
    assert mask.shape == (size or 1, 4, 5)
    assert torch.equal(mask, model[2].mask if size else model[2].mask.unsqueeze(0))


@pytest.mark.parametrize("size", [3, None])
def test_member_output_is_each_members_activation(size):
    model = _population() if size else _plain(0)
    S = size or 1
    x = torch.randn(S, 2, 6)
    topology = Topology.from_model(model)
    with topology.capture():
        forward(model, x)
    output = topology.hidden_layers[0].member_output
    weight, bias = topology.hidden_layers[0].incoming(), topology.hidden_layers[0].incoming_bias()
    assert output.shape == (S, 2, 5)
    for s in range(S):
        torch.testing.assert_close(output[s], torch.relu(x[s] @ weight[s].T + bias[s]), rtol=0, atol=1e-6)


def test_population_layer_followed_by_a_norm_is_refused_with_the_fix():
    model = nn.Sequential(MaskedLinear(4, 5, members=2), nn.LayerNorm(5), nn.ReLU(), MaskedLinear(5, 2, members=2))
    with pytest.raises(TopologyError, match="one parameter set for all members.*MemberLayerNorm"):
        Topology.from_model(model).hidden_layers


@pytest.mark.parametrize(
    "producer, consumer, message",
    [
        (MaskedLinear(4, 5, members=2), nn.Linear(5, 2), "producer has members=2 but its consumer has members=None"),
        (nn.Linear(4, 5), MaskedLinear(5, 2, members=2), "producer has members=None but its consumer has members=2"),
        (MaskedLinear(4, 5, members=2), MaskedLinear(5, 2, members=3), "members=2 but its consumer has members=3"),
    ],
)
def test_population_and_plain_layers_do_not_mix_in_a_hidden_layer(producer, consumer, message):
    with pytest.raises(TopologyError, match=message):
        Topology.from_model(nn.Sequential(producer, nn.ReLU(), consumer)).hidden_layers


# -- 6. surgery on a population of three ----------------------------------------------------------

# Units 1 and 4 of member 0 (slots 0, 1) and unit 3 of member 2 (slot 0); member 1 is left alone.
CHOSEN, UNITS, SLOTS = [0, 0, 2], [1, 4, 3], [0, 1, 0]
MEAN = torch.tensor([0.3, -0.7, 1.1])
GAIN, STEP, DRAW = 0.5, 7, 2
OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
}


def test_from_ranked_keeps_the_first_count_candidates_of_each_member():
    ranked = torch.tensor([[1, 4, 0], [5, 5, 5], [3, 5, 2]])
    selection = UnitSelection.from_ranked(torch.tensor([0, 1, 2]), ranked, torch.tensor([2, 0, 1]))
    assert (selection.members.tolist(), selection.units.tolist(), selection.slots.tolist()) == (CHOSEN, UNITS, SLOTS)
    assert len(selection) == 3
    single = UnitSelection.of_member(torch.tensor([[6], [2]]), member=1)
    assert (single.members.tolist(), single.units.tolist(), single.slots.tolist()) == ([1, 1], [6, 2], [0, 1])


def _stepped(make_optimizer, seeds=SEEDS, sparse=False, plain=False):
    """40 -> 6 -> 4 -> 3 tanh after one optimizer step, with non-zero biases: every state entry is non-zero."""
    shape = dict(hidden=(6, 4), in_features=40, activation="tanh")
    model = _plain(seeds[0], **shape) if plain else _population(seeds, **shape)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for linear in _linears(model):
            linear.bias.uniform_(0.5, 1.0, generator=generator)
    if sparse:
        sparsify(model, 0.5, seed=seeds[0] if plain else list(seeds))
    optimizer = make_optimizer(model.parameters())
    S = len(seeds)
    x, y = torch.randn(S, 8, 40, generator=generator), torch.randn(S, 8, 3, generator=generator)
    mse_per_member(forward(model, x), y).sum().backward()
    mask_gradients(model)
    optimizer.step()
    return model, optimizer


def _replace(model, optimizer, seeds, selection, mean=None):
    layer = Topology.from_model(model).hidden_layers[0]
    random = MemberRandom.derived(seeds, 21)
    replace_units(layer, selection, optimizer, random, step=STEP, draw=DRAW, gain=GAIN, mean_activation=mean)


def _state(optimizer, param):
    return {key: value.clone() for key, value in optimizer.state[param].items() if value.shape == param.shape}


@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
def test_replace_units_touches_exactly_the_selected_units_of_the_selected_members(optimizer_name):
    model, optimizer = _stepped(OPTIMIZERS[optimizer_name])
    producer, consumer = model[0], model[2]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    states = {param: _state(optimizer, param) for param in (producer.weight, producer.bias, consumer.weight)}
    _replace(model, optimizer, SEEDS, UnitSelection(*map(torch.tensor, (CHOSEN, UNITS, SLOTS))), MEAN)

    for name, param in model.named_parameters():
        assert torch.equal(param[1], before[name][1]), f"member 1's {name} changed"
    chosen = torch.zeros(3, 6, dtype=torch.bool)  # (member, unit)
    chosen[CHOSEN, UNITS] = True
    bound = GAIN * math.sqrt(3 / 40)
    fresh = producer.weight[chosen]
    assert fresh.abs().max() <= bound and fresh.abs().max() > 0.8 * bound
    assert torch.all(fresh != before["0.weight"][chosen])
    assert torch.equal(producer.weight[~chosen], before["0.weight"][~chosen])
    assert torch.all(producer.bias[chosen] == 0)
    assert torch.equal(producer.bias[~chosen], before["0.bias"][~chosen])
    columns = consumer.weight.detach().transpose(1, 2)  # (member, unit, consumer output)
    assert torch.all(columns[chosen] == 0)
    assert torch.equal(columns[~chosen], before["2.weight"].transpose(1, 2)[~chosen])
    expected = before["2.bias"].clone()
    for p, (m, u) in enumerate(zip(CHOSEN, UNITS)):
        for o in range(4):
            expected[m, o] += before["2.weight"][m, o, u] * MEAN[p]
    torch.testing.assert_close(consumer.bias.detach(), expected, rtol=0, atol=1e-6)

    per_unit = {producer.weight: lambda t: t, producer.bias: lambda t: t, consumer.weight: lambda t: t.transpose(1, 2)}
    for param, old in states.items():
        assert old, "the optimizer kept no state shaped like the parameter"
        view = per_unit[param]  # (member, unit, ...)
        for key, value in old.items():
            new, value = view(optimizer.state[param][key]), view(value)
            assert torch.all(value[chosen] != 0), f"{key} was zero before: the test could not see a reset"
            assert torch.all(new[chosen] == 0), f"{key} not reset at the selected units"
            assert torch.equal(new[~chosen], value[~chosen]), f"{key} changed elsewhere"


def test_replace_units_keeps_masked_incoming_weights_zero():
    model, optimizer = _stepped(OPTIMIZERS["adam"], sparse=True)
    _replace(model, optimizer, SEEDS, UnitSelection(*map(torch.tensor, (CHOSEN, UNITS, SLOTS))))
    weight, mask = model[0].weight.detach(), model[0].mask
    rows = weight[CHOSEN, UNITS]
    assert torch.all(rows[~mask[CHOSEN, UNITS]] == 0)
    assert torch.all(rows[mask[CHOSEN, UNITS]] != 0)
    assert torch.all(weight[~mask] == 0)


@pytest.mark.parametrize("plain", [False, True])
def test_a_members_fresh_weights_are_those_it_gets_in_a_population_of_one(plain):
    model, optimizer = _stepped(OPTIMIZERS["adam"])
    _replace(model, optimizer, SEEDS, UnitSelection(*map(torch.tensor, (CHOSEN, UNITS, SLOTS))))
    for member, units in ((0, [1, 4]), (2, [3])):
        seeds = (SEEDS[member],)
        alone, alone_optimizer = _stepped(OPTIMIZERS["adam"], seeds=seeds, plain=plain)
        _replace(alone, alone_optimizer, seeds, UnitSelection.of_member(torch.tensor(units)))
        weight = alone[0].weight if plain else alone[0].weight[0]
        assert torch.equal(model[0].weight[member, units], weight[units])
    # The draws depend on the slot, not on the unit: member 2's unit 3 in slot 1 gets other numbers.
    alone, _ = _stepped(OPTIMIZERS["adam"], seeds=(SEEDS[2],))
    _replace(alone, None, (SEEDS[2],), UnitSelection.of_member(torch.tensor([0, 3])))
    assert not torch.equal(alone[0].weight[0, 3], model[0].weight[2, 3])


# -- 7. strategy base -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _ToyConfig(StrategyConfig):
    mode: str = setting("fast", choices=("fast", "slow"))
    rate: float = setting(0.5, low=0.0, high=1.0)
    count: int = setting(3, low=0)
    limit: int | None = setting(None)


class _Toy(RefreshStrategy):
    name = "toy"
    Config = _ToyConfig


def test_strategy_needs_one_seed_per_member():
    model = _population()
    with pytest.raises(ConfigError, match="2 seeds for a population of 3 members"):
        Backprop(model, None, seed=[1, 2])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = dst.strategies.build("bp", model, optimizer, config=[BackpropConfig()] * 3, seed=list(SEEDS))
    assert (strategy.members, strategy.seeds, strategy.state_dict()) == (3, SEEDS, {"step": 0})


def test_strategy_random_draws_a_members_numbers_whatever_the_population():
    population = Backprop(_population(), None, seed=list(SEEDS))
    alone = Backprop(_plain(9), None, seed=9)
    draw = dict(step=4, draw=1)
    assert torch.equal(population.random.uniform((8,), **draw)[1], alone.random.uniform((8,), **draw)[0])


def test_strategy_needs_one_config_per_member_of_its_own_type():
    with pytest.raises(ConfigError, match="2 configs for a population of 3 members"):
        Backprop(_population(), None, [BackpropConfig()] * 2, seed=list(SEEDS))
    with pytest.raises(ConfigError, match="takes a BackpropConfig, got _ToyConfig"):
        Backprop(_population(), None, [_ToyConfig()] * 3, seed=list(SEEDS))


def test_members_may_not_differ_in_a_non_numeric_setting():
    configs = [_ToyConfig(mode="fast"), _ToyConfig(mode="slow"), _ToyConfig(mode="fast")]
    with pytest.raises(ConfigError, match="members differ in 'mode'.*not numeric"):
        _Toy(_population(), None, configs, seed=list(SEEDS))


def test_members_may_differ_in_numeric_settings_read_per_member():
    configs = [_ToyConfig(rate=0.1, count=1), _ToyConfig(rate=0.2, count=2), _ToyConfig(rate=0.3, count=3)]
    strategy = _Toy(_population(), None, configs, seed=list(SEEDS))
    rate, count = strategy.per_member("rate"), strategy.per_member("count")
    assert rate.dtype == np.float64 and rate.tolist() == [0.1, 0.2, 0.3]
    assert count.dtype == np.int64 and count.tolist() == [1, 2, 3]
    assert strategy.config is configs[0] and strategy.configs == tuple(configs)
    assert strategy.shared("mode") and not strategy.shared("rate")
    one = _Toy(_population(), None, _ToyConfig(rate=0.7), seed=list(SEEDS))
    assert one.per_member("rate").tolist() == [0.7] * 3 and one.shared("rate")


def test_members_may_not_differ_between_a_number_and_none():
    configs = [_ToyConfig(limit=3), _ToyConfig(limit=None), _ToyConfig(limit=5)]
    with pytest.raises(ConfigError, match="members differ in 'limit'"):
        _Toy(_population(), None, configs, seed=list(SEEDS))


def test_the_splitmix_finaliser_gives_the_same_bits_on_numpy_in_place_and_on_torch():
    from dst.population import _mix

    z = np.random.default_rng(0).integers(-(2**63), 2**63 - 1, size=10_000, dtype=np.int64)
    on_torch = _mix(torch.from_numpy(z.copy())).numpy()
    assert np.array_equal(_mix(z.copy()), on_torch)
    mask = (1 << 64) - 1  # and both equal splitmix64's reference on Python ints
    for value, mixed in zip(z[:50].tolist(), on_torch[:50].tolist()):
        x = value & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        assert (x ^ (x >> 31)) == mixed & mask
