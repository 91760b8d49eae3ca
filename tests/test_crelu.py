"""CReLU: each unit's two outputs, the unit graph's two columns per unit, surgery, capture and the probe."""

import pytest
import torch

import dst
from dst.errors import TopologyError
from dst.nets import CReLU
from dst.population import MemberRandom, forward
from dst.probe import Probe
from dst.surgery import UnitSelection, replace_units
from dst.topology import Topology


def test_crelu_gives_each_unit_relu_of_x_and_of_minus_x_side_by_side():
    x = torch.tensor([[1.0, -2.0, 0.0]])
    assert CReLU()(x).tolist() == [[1.0, 0.0, 0.0, 2.0, 0.0, 0.0]]
    maps = torch.tensor([[[[3.0]], [[-1.0]]]])  # (batch 1, 2 channels, 1 x 1)
    assert CReLU(-3)(maps).flatten().tolist() == [3.0, 0.0, 0.0, 1.0]


def test_an_mlp_with_crelu_doubles_the_consumer_inputs_and_its_units_own_two_columns():
    model = dst.nets.mlp(3, [4], 2, "crelu", generators=[torch.Generator().manual_seed(s) for s in range(2)])
    assert model[2].weight.shape == (2, 2, 8)
    (layer,) = Topology.from_model(model).hidden_layers
    assert layer.block == 2 and layer.consumer_columns(torch.tensor([1, 3])).tolist() == [2, 3, 6, 7]
    with torch.no_grad():
        model[2].weight.fill_(1.0)
    replace_units(layer, UnitSelection(torch.tensor([1]), torch.tensor([1]), torch.tensor([0])), None,
                  MemberRandom([1, 2]), step=1)
    weight = model[2].weight.detach()
    assert weight[1, :, 2:4].abs().sum() == 0 and torch.all(weight[1, :, [0, 1, 4, 5, 6, 7]] == 1)
    assert torch.all(weight[0] == 1)


def test_capture_gives_each_unit_its_pair_and_the_probe_counts_a_unit_dead_only_if_both_halves_are():
    model = dst.nets.mlp(2, [3], 1, "crelu", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # unit 0 is exactly 0 on every input: both halves silent; units 1, 2 always fire once
        model[0].weight[0].zero_()
        model[0].bias[0] = 0.0
    topology = Topology.from_model(model)
    x = torch.randn(1, 16, 2)
    with topology.capture() as layers:
        forward(model, x)
        captured = layers[0].member_output
    h = model[0](x[0])
    assert captured.shape == (1, 16, 3, 2)
    torch.testing.assert_close(captured[0, :, :, 0], h.clamp(min=0))
    torch.testing.assert_close(captured[0, :, :, 1], (-h).clamp(min=0))
    (row,) = Probe()(model, topology, x)
    assert row["dead_fraction"] == pytest.approx(1 / 3)


def test_cbp_refuses_its_bias_correction_on_crelu_units_with_the_fix():
    model = dst.nets.mlp(2, [3], 1, "crelu")
    with pytest.raises(TopologyError, match="bias_correction=false"):
        dst.strategies.build("cbp", model, None, seed=0)
    dst.strategies.build("cbp", model, None, bias_correction=False, seed=0)
