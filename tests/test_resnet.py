"""The CIFAR ResNet-18: architecture, unit graph over residual blocks, and BatchNorm-aware unit surgery."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dst import strategies
from dst.population import MemberRandom
from dst.resnet import ResNet18
from dst.surgery import UnitSelection, replace_units
from dst.topology import Topology


def _parameters_by_hand(width: int, classes: int) -> int:
    """The ResNet-18 parameter count from its description: 3x3 convs with biases, BN (2 per channel),
    a 1x1 conv + BN shortcut where a block changes width, a linear layer on 8 x width features."""
    def conv(inputs, outputs, kernel):
        return inputs * outputs * kernel * kernel + outputs

    total = conv(3, width, 3) + 2 * width
    inputs = width
    for outputs in (width, 2 * width, 4 * width, 8 * width):
        for block in range(2):
            block_in = inputs if block == 0 else outputs
            total += conv(block_in, outputs, 3) + 2 * outputs + conv(outputs, outputs, 3) + 2 * outputs
            if block_in != outputs:
                total += conv(block_in, outputs, 1) + 2 * outputs
        inputs = outputs
    return total + 8 * width * classes + classes


@pytest.mark.parametrize("width, classes", [(64, 100), (4, 10)])
def test_parameter_count_and_output_shape_match_the_architecture(width, classes):
    model = ResNet18(classes, width, generator=torch.Generator().manual_seed(0))
    assert sum(p.numel() for p in model.parameters()) == _parameters_by_hand(width, classes)
    if width == 4:
        assert model(torch.randn(3, 3, 32, 32)).shape == (3, classes)
    # no max-pool and a stride-1 stem: the last stage still sees 4 x 4 maps of a 32 x 32 image
    shapes = []
    model.stages[-1].register_forward_hook(lambda m, i, o: shapes.append(o.shape))
    model(torch.randn(1, 3, 32, 32))
    assert shapes[0][-2:] == (4, 4)


def test_initialisation_is_uniform_kaiming_with_zero_biases_and_unit_batchnorm():
    model = ResNet18(10, 8, generator=torch.Generator().manual_seed(1))
    conv = model.stages[1][0].conv1  # 8 -> 16 channels, 3x3
    bound = math.sqrt(2.0) * math.sqrt(3.0 / (8 * 9))
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
    assert conv.bias.abs().max() == 0 and model.fc.bias.abs().max() == 0
    assert model.fc.weight.abs().max() <= math.sqrt(3.0 / 64)
    bn = model.stages[1][0].bn1
    assert torch.equal(bn.weight, torch.ones(16)) and torch.equal(bn.bias, torch.zeros(16))
    same = ResNet18(10, 8, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))


def test_unit_graph_is_each_blocks_first_conv_with_its_batchnorm_feeding_the_second():
    model = ResNet18(10, 4)
    topology = Topology.from_model(model)
    assert len(topology) == 8
    for layer, block in zip(topology, model.blocks()):
        assert layer.producer is block.conv1 and layer.consumer is block.conv2
        assert layer.norm is block.bn1 and layer.activation is block.act1 and layer.block == 1
    assert [layer.n_units for layer in topology] == [4, 4, 8, 8, 16, 16, 32, 32]
    assert [layer.name for layer in topology][:2] == ["stages.0.0.conv1", "stages.0.1.conv1"]


def _trained(width=4, steps=3, seed=0):
    """A small ResNet after a few SGD steps with momentum (running statistics and momentum not trivial)."""
    torch.manual_seed(seed)
    model = ResNet18(10, width, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_surgery_keeps_the_function_when_the_units_outgoing_weights_are_zero(mode):
    model, optimizer = _trained()
    layer = Topology.from_model(model).hidden_layers[3]  # stage 1, block 1: 8 channels
    units = torch.tensor([1, 6])
    with torch.no_grad():
        layer.consumer.weight[:, units] = 0
    getattr(model, mode)()
    x = torch.randn(4, 3, 32, 32)
    before = model(x).detach()
    replace_units(layer, UnitSelection.of_member(units), optimizer, MemberRandom([5]), step=1)
    # in train mode BN statistics would move on a forward; compare on a fresh copy of the state
    assert torch.allclose(model(x), before, atol=1e-6)
    assert not torch.equal(layer.producer.weight[units], torch.zeros_like(layer.producer.weight[units]))


def test_replaced_channels_batchnorm_and_optimizer_state_are_reset_and_the_others_untouched():
    model, optimizer = _trained()
    layer = Topology.from_model(model).hidden_layers[2]  # stage 1, block 0: 8 channels, stride 2
    bn = layer.norm
    with torch.no_grad():  # make every entry distinguishable from a fresh one
        bn.weight.uniform_(2, 3)
        bn.bias.uniform_(2, 3)
    before = {name: tensor.clone() for name, tensor in bn.state_dict().items()}
    conv_before = layer.producer.weight.detach().clone()
    units = torch.tensor([0, 5])
    others = torch.tensor([i for i in range(8) if i not in (0, 5)])
    replace_units(layer, UnitSelection.of_member(units), optimizer, MemberRandom([3]), step=7)
    assert torch.equal(bn.weight[units], torch.ones(2)) and torch.equal(bn.bias[units], torch.zeros(2))
    assert torch.equal(bn.running_mean[units], torch.zeros(2)) and torch.equal(bn.running_var[units], torch.ones(2))
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(bn.state_dict()[name][others], before[name][others]), name
    assert int(bn.num_batches_tracked) == int(before["num_batches_tracked"])
    for param in (bn.weight, bn.bias, layer.producer.weight):
        momentum = optimizer.state[param]["momentum_buffer"]
        assert momentum[units].abs().max() == 0 and momentum[others].abs().max() > 0
    assert torch.equal(optimizer.state[layer.consumer.weight]["momentum_buffer"][:, units].abs().amax((0, 2, 3)),
                       torch.zeros(2))
    assert torch.equal(layer.producer.weight[others], conv_before[others])
    assert torch.equal(layer.consumer.weight[:, units], torch.zeros_like(layer.consumer.weight[:, units]))


def test_cbp_on_the_resnet_replaces_block_channels_with_fresh_batchnorm_and_zero_outgoing_weights():
    model, optimizer = _trained(steps=0)
    cbp = strategies.build("cbp", model, optimizer, replacement_rate=0.05, maturity_threshold=2)
    replaced = 0
    for step in range(12):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        cbp.before_step()
        optimizer.step()
        count = int(np.sum(cbp.after_step().units_replaced))
        # a unit replaced just now, and only such a unit, has exactly BN (1, 0) and no outgoing weight
        fresh = sum(int(((layer.norm.weight == 1) & (layer.norm.bias == 0)
                         & (layer.consumer.weight.abs().amax((0, 2, 3)) == 0)).sum()) for layer in cbp.topology)
        assert fresh == count, step
        replaced += count
    assert replaced > 0


def test_a_batchnorm_the_surgery_cannot_pair_with_the_units_is_refused():
    from dst.errors import TopologyError
    from dst.topology import HiddenLayer

    model = ResNet18(10, 4)
    block, wider = model.stages[0][0], model.stages[1][0]
    wrong = HiddenLayer("stages.0.0.conv1", block.conv1, block.conv2, block.act1, norm=wider.bn1)  # 8 channels, not 4
    with pytest.raises(TopologyError, match="one parameter set per unit"):
        Topology(model, [wrong]).hidden_layers
