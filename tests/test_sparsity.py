"""Layer-density distributions, exact-count random masks and sparsify's global budget."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dst.errors import ConfigError
from dst.masked import MaskedConv2d, MaskedLinear, masked_layers, sparsify
from dst.sparsity import layer_densities, random_mask


DISTRIBUTIONS = ("uniform", "er", "erk")


def _weighted_density(shapes, densities) -> float:
    sizes = [math.prod(s) for s in shapes]
    return sum(d * n for d, n in zip(densities, sizes)) / sum(sizes)


def test_uniform_gives_every_layer_the_global_density():
    assert layer_densities([(10, 20), (5, 10), (8, 4, 3, 3)], 0.3, "uniform") == [0.3, 0.3, 0.3]


def test_er_on_two_linear_layers_matches_the_hand_computed_densities():
    # raw (n_in + n_out) / (n_in * n_out): 30/200 = 0.15 and 15/50 = 0.3.
    # budget 0.2 * 250 = 50 = eps * (0.15 * 200 + 0.3 * 50) = 45 eps  =>  eps = 10/9.
    densities = layer_densities([(10, 20), (5, 10)], 0.2, "er")
    assert densities == pytest.approx([1 / 6, 1 / 3], rel=1e-12)


def test_erk_counts_the_kernel_for_a_conv_and_er_does_not():
    shapes = [(8, 4, 3, 3), (10, 32)]  # 288 and 320 weights
    # ERK: eps * (4 + 8 + 3 + 3) / 288 and eps * 42 / 320; budget 0.25 * 608 = 152 = eps * (18 + 42).
    erk = layer_densities(shapes, 0.25, "erk")
    assert erk == pytest.approx([18 * 152 / 60 / 288, 42 * 152 / 60 / 320], rel=1e-12)
    # ER ignores the kernel: eps * 12 / 32 per weight of the conv; 152 = eps * (12 * 9 + 42).
    er = layer_densities(shapes, 0.25, "er")
    assert er == pytest.approx([12 / 32 * 152 / 150, 42 / 320 * 152 / 150], rel=1e-12)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("density", [0.01, 0.1, 0.5, 0.9])
def test_weighted_mean_of_layer_densities_equals_the_target(distribution, density):
    shapes = [(32, 3, 5, 5), (64, 32, 3, 3), (128, 256), (10, 128)]
    densities = layer_densities(shapes, density, distribution)
    assert all(0 < d <= 1 for d in densities)
    assert _weighted_density(shapes, densities) == pytest.approx(density, rel=1e-12)


def test_a_tiny_layer_is_capped_dense_and_the_others_absorb_its_budget():
    shapes = [(2, 3), (100, 100)]  # raw densities 5/6 and 0.02
    densities = layer_densities(shapes, 0.1, "er")
    # Uncapped, the tiny layer would need density 5/6 * 1000.6/205 > 1; it becomes dense and the big
    # layer takes the rest of the budget: 1000.6 - 6 = 994.6 of its 10,000 weights.
    assert densities == pytest.approx([1.0, 0.09946], rel=1e-12)
    assert _weighted_density(shapes, densities) == pytest.approx(0.1, rel=1e-12)


def test_capping_repeats_until_no_layer_exceeds_density_one():
    shapes = [(2, 2), (8, 8), (100, 100)]  # raw 1, 0.25, 0.02
    target = 870 / 10068
    # Round 1: eps = 870/220 = 3.95 caps only the first layer. Round 2: eps = 866/216 > 4 caps the
    # second. Round 3: eps = 802/200, so the last layer gets 0.0802.
    densities = layer_densities(shapes, target, "er")
    assert densities == pytest.approx([1.0, 1.0, 0.0802], rel=1e-12)
    assert _weighted_density(shapes, densities) == pytest.approx(target, rel=1e-12)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_zero_one_is_a_config_error_naming_the_range(density):
    with pytest.raises(ConfigError, match=r"density must be in \(0, 1\]"):
        layer_densities([(4, 4)], density, "erk")
    with pytest.raises(ConfigError, match=r"density must be in \(0, 1\]"):
        sparsify(nn.Sequential(nn.Linear(4, 4)), density)


def test_unknown_distribution_is_a_config_error_listing_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown density distribution 'erdos'; use one of uniform, er, erk"):
        layer_densities([(4, 4)], 0.5, "erdos")
    with pytest.raises(ConfigError, match="unknown density distribution 'erdos'"):
        sparsify(nn.Sequential(nn.Linear(4, 4)), 0.5, "erdos")


@pytest.mark.parametrize(
    "shape, density",
    [((10, 10), 0.3), ((7, 13), 0.25), ((4, 3, 3, 3), 0.1), ((5, 5), 0.99), ((50,), 0.5), ((3, 3), 1.0)],
)
def test_random_mask_has_exactly_round_density_times_numel_trues(shape, density):
    mask = random_mask(shape, density, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool
    assert tuple(mask.shape) == shape
    assert int(mask.sum()) == round(density * math.prod(shape))


def test_random_mask_keeps_at_least_one_connection():
    assert int(random_mask((10, 10), 1e-4, torch.Generator().manual_seed(0)).sum()) == 1


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("density", [0.05, 0.1, 0.3, 0.7])
def test_sparsify_global_active_count_is_within_one_weight_per_layer_of_the_target(distribution, density):
    model = sparsify(_model(), density, distribution, seed=0)
    layers = list(masked_layers(model))
    assert len(layers) == 4
    total = sum(layer.weight.numel() for layer in layers)
    active = sum(layer.active_connections for layer in layers)
    assert abs(active - density * total) <= len(layers)
    for layer in layers:
        assert torch.all(layer.weight[~layer.mask] == 0)
        assert int((layer.weight != 0).sum()) == layer.active_connections  # active weights kept


def test_sparsify_wraps_layers_in_their_masked_counterparts():
    model = sparsify(_model(), 0.2, seed=0)
    assert [type(m) for m in model if not isinstance(m, (nn.ReLU, nn.Flatten))] == [
        MaskedConv2d,
        MaskedConv2d,
        MaskedLinear,
        MaskedLinear,
    ]


@pytest.mark.parametrize(
    "kwargs, dense_names",
    [
        ({"dense_first": True}, {"0"}),
        ({"dense_last": True}, {"7"}),
        ({"dense_first": True, "dense_last": True}, {"0", "7"}),
        ({"skip": ("2",)}, {"2"}),
    ],
)
def test_layers_kept_dense_are_outside_the_budget(kwargs, dense_names):
    density = 0.1
    model = sparsify(_model(), density, "erk", seed=0, **kwargs)
    modules = dict(model.named_children())
    for name in dense_names:
        assert type(modules[name]) in (nn.Linear, nn.Conv2d), f"layer {name} should stay a plain layer"
    sparse = {name: m for name, m in modules.items() if isinstance(m, (MaskedLinear, MaskedConv2d))}
    assert set(sparse) == {"0", "2", "5", "7"} - dense_names
    total = sum(m.weight.numel() for m in sparse.values())
    active = sum(m.active_connections for m in sparse.values())
    # The target applies to the sparsified layers alone: the dense layers add nothing to the budget.
    assert abs(active - density * total) <= len(sparse)


def test_skip_of_an_unknown_layer_name_is_an_error_listing_the_layers():
    with pytest.raises(ConfigError, match=r"skip names \['fc9'\] are not layers of the model; layers: \['0', '2', '5', '7'\]"):
        sparsify(_model(), 0.1, skip=("fc9",))


def test_keeping_every_layer_dense_is_an_error():
    with pytest.raises(ConfigError, match="every layer is kept dense"):
        sparsify(nn.Sequential(nn.Linear(3, 3)), 0.5, dense_first=True)


def _masks(model):
    return [layer.mask.clone() for layer in masked_layers(model)]


def test_same_seed_gives_identical_masks_and_another_seed_different_ones():
    first = _masks(sparsify(_model(), 0.2, seed=7))
    again = _masks(sparsify(_model(), 0.2, seed=7))
    other = _masks(sparsify(_model(), 0.2, seed=8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert [int(m.sum()) for m in first] == [int(m.sum()) for m in other]  # same counts, other positions


def test_generator_argument_is_used_for_the_masks():
    first = _masks(sparsify(_model(), 0.2, generator=torch.Generator().manual_seed(3)))
    again = _masks(sparsify(_model(), 0.2, generator=torch.Generator().manual_seed(3)))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
