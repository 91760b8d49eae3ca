"""The constant-fan-in layout: every unit of a layer has the same number of incoming connections."""

import pytest
import torch
from torch import nn

import dst
from dst.errors import ConfigError
from dst.nets import mlp
from dst.runner import RunSpec, prepare
from dst.sparsity import fan_in_mask, layer_densities, layer_fan_ins


def test_fan_ins_follow_erk_densities_computed_by_hand():
    # shapes (50, 20) and (1, 50) at density 0.3: ERK raw densities 70/1000 and 51/50; the second exceeds 1
    # and is made dense (50 weights), leaving 315 - 50 = 265 for the first: d = 0.265, fan-in round(5.3) = 5
    shapes = [(50, 20), (1, 50)]
    densities = layer_densities(shapes, 0.3, "constant-fan-in")
    assert densities == pytest.approx([0.265, 1.0])
    assert layer_fan_ins(shapes, densities) == [5, 50]


def test_every_unit_of_a_sparsified_population_has_the_layers_fan_in_and_members_match_their_seeds():
    seeds = [0, 1, 2]
    model = mlp(20, [50], 1, generators=[torch.Generator().manual_seed(s) for s in seeds])
    dst.sparsify(model, density=0.3, distribution="constant-fan-in", seed=seeds)
    assert model[0].mask.sum(-1).unique().tolist() == [5]
    assert bool(model[2].mask.all())
    for member, seed in enumerate(seeds):
        alone = mlp(20, [50], 1, generator=torch.Generator().manual_seed(seed))
        dst.sparsify(alone, density=0.3, distribution="constant-fan-in", seed=seed)
        assert torch.equal(model[0].mask[member], alone[0].mask)
    assert not torch.equal(model[0].mask[0], model[0].mask[1])


def test_a_conv_units_fan_in_counts_its_channels_and_kernel():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    dst.sparsify(model, density=0.2, distribution="constant-fan-in", seed=0)
    counts = model[0].mask.flatten(1).sum(1)  # per output channel, over 3 x 3 x 3 weights
    assert len(counts.unique()) == 1 and 1 <= int(counts[0]) <= 27


def test_fan_in_mask_has_exactly_k_per_row_and_refuses_a_fan_in_that_does_not_fit():
    mask = fan_in_mask((6, 10), 4, torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [4] * 6
    with pytest.raises(ConfigError, match=r"fan-in of 11 does not fit rows of 10 inputs"):
        fan_in_mask((6, 10), 11)


def test_a_run_on_a_constant_fan_in_net_keeps_its_fan_in_under_static_sparse_training():
    spec = RunSpec("bit-flipping", "bp", steps=300, seeds=(0, 1), device="cpu",
                   bench={"hidden": (40,), "density": 0.25, "distribution": "constant-fan-in", "probe": False,
                          "bin_size": 100})
    experiment = prepare(spec, progress=False)
    experiment.run()
    first = experiment.model[0]
    assert first.mask.sum(-1).unique().numel() == 1
    assert bool((first.weight[~first.mask] == 0).all())
