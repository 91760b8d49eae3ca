"""Normalisation layers in the unit graph: a unit's BatchNorm/LayerNorm/GroupNorm entries are reset with it,
and layouts whose statistics a reset would leave stale are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import dst
from dst.errors import TopologyError
from dst.population import MemberRandom
from dst.surgery import UnitSelection, replace_units
from dst.topology import HiddenLayer, Topology

RANDOM = MemberRandom([12345])


def _replace(layer: HiddenLayer, units: list[int], optimizer) -> None:
    """Replace ``units`` of a plain model (a population of one)."""
    replace_units(layer, UnitSelection.of_member(torch.tensor(units)), optimizer, RANDOM, step=1)


def _mlp(norm: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), norm, nn.ReLU(), nn.Linear(4, 3))


def _convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Flatten(), nn.Linear(3 * 4 * 4, 2),
    )


def _train(model: nn.Module, x: torch.Tensor, steps: int = 5) -> torch.optim.Optimizer:
    """A few momentum-SGD steps so norm parameters, running statistics and momentum are all non-trivial."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        loss = model(x).pow(2).mean() + model(x).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


@pytest.mark.parametrize("norm", [nn.BatchNorm1d(4), nn.LayerNorm(4), nn.GroupNorm(2, 4)], ids=type)
def test_discovery_puts_a_norm_between_producer_and_activation_into_the_unit(norm):
    model = _mlp(norm)
    (layer,) = Topology.from_model(model).hidden_layers
    assert (layer.producer, layer.norm, layer.activation, layer.consumer) == (model[0], model[1], model[2], model[3])


def test_a_replaced_units_batchnorm_entries_and_their_momentum_start_afresh():
    model = _mlp(nn.BatchNorm1d(4))
    opt = _train(model, torch.randn(8, 6))
    bn = model[1]
    before = {name: t.clone() for name, t in [("weight", bn.weight), ("bias", bn.bias),
                                               ("mean", bn.running_mean), ("var", bn.running_var)]}
    assert not torch.equal(before["weight"], torch.ones(4)) and not torch.equal(before["mean"], torch.zeros(4))
    (layer,) = Topology.from_model(model).hidden_layers
    _replace(layer, [1, 3], opt)
    for index in (1, 3):
        assert (bn.weight[index], bn.bias[index]) == (1.0, 0.0)
        assert (bn.running_mean[index], bn.running_var[index]) == (0.0, 1.0)
        assert opt.state[bn.weight]["momentum_buffer"][index] == 0
        assert opt.state[bn.bias]["momentum_buffer"][index] == 0
    for index in (0, 2):  # the other units keep everything
        assert bn.weight[index] == before["weight"][index] and bn.bias[index] == before["bias"][index]
        assert bn.running_mean[index] == before["mean"][index] and bn.running_var[index] == before["var"][index]
        assert opt.state[bn.weight]["momentum_buffer"][index] != 0


def test_a_replaced_units_layernorm_scale_and_shift_start_afresh():
    model = _mlp(nn.LayerNorm(4))
    opt = _train(model, torch.randn(8, 6))
    ln = model[1]
    kept_weight = ln.weight[0].item()
    (layer,) = Topology.from_model(model).hidden_layers
    _replace(layer, [2], opt)
    assert (ln.weight[2], ln.bias[2]) == (1.0, 0.0)
    assert ln.weight[0] == kept_weight != 1.0


def test_a_replaced_channels_batchnorm2d_entries_start_afresh_in_a_convnet():
    model = _convnet()
    opt = _train(model, torch.randn(4, 2, 8, 8))
    topology = Topology.from_model(model)
    first, second = topology.hidden_layers
    assert (first.norm, second.norm) == (model[1], model[4]) and second.block == 16
    _replace(second, [0], opt)
    bn = model[4]
    assert (bn.weight[0], bn.bias[0], bn.running_mean[0], bn.running_var[0]) == (1.0, 0.0, 0.0, 1.0)
    assert bn.running_mean[1] != 0 and model[1].running_mean.ne(0).all()  # other channels, other layer


def test_cbp_resets_the_norm_of_the_units_it_replaces():
    model = _mlp(nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    strategy = dst.strategies.build("cbp", model, opt, replacement_rate=0.5, maturity_threshold=2, seed=0)
    bn = model[1]
    g = torch.Generator().manual_seed(0)
    replaced = 0
    for _ in range(6):
        x = torch.randn(8, 6, generator=g)
        before = bn.running_mean.clone()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        strategy.before_step()
        opt.step()
        replaced += int(np.sum(strategy.after_step().units_replaced))
        fresh = (bn.running_mean == 0) & (before != 0)
        assert ((bn.weight[fresh] == 1) & (bn.bias[fresh] == 0) & (bn.running_var[fresh] == 1)).all()
    assert replaced > 0
    assert (bn.running_mean == 0).any()


def test_a_norm_after_the_activation_is_refused_with_a_clear_error():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 3))
    with pytest.raises(TopologyError, match="after their activation"):
        Topology.from_model(model).hidden_layers


def test_a_norm_that_does_not_act_per_unit_is_refused():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.LayerNorm([4, 6, 6]), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    with pytest.raises(TopologyError, match="one parameter set per unit"):
        Topology.from_model(model).hidden_layers
    with pytest.raises(TopologyError, match="one parameter set per unit"):
        Topology(model, [HiddenLayer("0", model[0], model[4], model[2], norm=model[1])]).hidden_layers


def test_member_layer_norm_normalises_each_member_with_its_own_scale_and_shift():
    norm = dst.population.MemberLayerNorm(3, members=2)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]]))
        norm.bias.copy_(torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]]))
    x = torch.tensor([[[1.0, 2.0, 3.0]], [[0.0, 0.0, 6.0]]])  # (S=2, batch 1, units 3)
    out = norm(x)
    # member 0: mean 2, biased var 2/3; member 1: mean 2, var 8
    z0 = [(v - 2) / (2 / 3 + 1e-5) ** 0.5 for v in (1.0, 2.0, 3.0)]
    z1 = [(v - 2) / (8 + 1e-5) ** 0.5 for v in (0.0, 0.0, 6.0)]
    expected = [[[z0[0] * 1, z0[1] * 2, z0[2] * 3 + 1]], [[z1[0] * 0.5 - 1, z1[1] * 0.5, z1[2] * 0.5]]]
    torch.testing.assert_close(out, torch.tensor(expected))


def test_a_population_unit_reset_restores_only_that_members_layer_norm_entries_and_their_state():
    members = 2
    model = dst.nets.mlp(3, [4], 2, norm="layer", generators=[torch.Generator().manual_seed(s) for s in range(members)])
    layer = Topology.from_model(model).hidden_layers[0]
    norm = layer.norm
    assert isinstance(norm, dst.population.MemberLayerNorm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with torch.no_grad():
        norm.weight.fill_(5.0)
        norm.bias.fill_(3.0)
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()  # momentum buffers of 1 everywhere
    selection = UnitSelection(torch.tensor([1]), torch.tensor([2]), torch.tensor([0]))
    replace_units(layer, selection, optimizer, MemberRandom([1, 2]), step=1)
    weight, bias = norm.weight.detach(), norm.bias.detach()
    assert weight[1, 2].item() == 1.0 and bias[1, 2].item() == 0.0
    changed = torch.zeros(2, 4, dtype=torch.bool)
    changed[1, 2] = True
    assert torch.all(weight[~changed] == 5.0 - 0.1) and torch.all(bias[~changed] == 3.0 - 0.1)
    for param in (norm.weight, norm.bias):
        buffer = optimizer.state[param]["momentum_buffer"]
        assert buffer[1, 2].item() == 0.0 and torch.all(buffer[~changed] == 1.0)


def test_the_benchmarks_build_layer_norm_nets_on_request():
    bench = dst.benchmarks.build("bit-flipping", norm="layer", hidden=[7])
    _, model, _ = bench.build([0, 1], "cpu")
    assert isinstance(model[1], dst.population.MemberLayerNorm) and model[1].weight.shape == (2, 7)
    with pytest.raises(dst.ConfigError, match="norm"):
        dst.benchmarks.build("bit-flipping", norm="batch")
