"""The unit graph: discovery, explicit declaration, conv->linear blocks and activation capture."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dst.errors import TopologyError
from dst.masked import sparsify
from dst.topology import HiddenLayer, Topology



def _no_hooks(model: nn.Module) -> bool:
    return all(len(module._forward_hooks) == 0 for module in model.modules())


def test_mlp_discovery_finds_producer_activation_consumer_triples(tiny_mlp):
    model = tiny_mlp()  # 0 Linear(6,5) 1 ReLU 2 Linear(5,4) 3 ReLU 4 Linear(4,3)
    layers = Topology.from_model(model).hidden_layers
    assert [layer.name for layer in layers] == ["0", "2"]
    assert [(layer.producer, layer.activation, layer.consumer) for layer in layers] == [
        (model[0], model[1], model[2]),
        (model[2], model[3], model[4]),
    ]
    assert [layer.n_units for layer in layers] == [5, 4]
    assert [layer.block for layer in layers] == [1, 1]
    assert not any(layer.is_conv for layer in layers)


def test_discovery_works_on_a_sparsified_mlp(tiny_mlp):
    model = sparsify(tiny_mlp(), 0.5, seed=0)
    topology = Topology.from_model(model)
    assert [layer.producer for layer in topology] == [model[0], model[2]]
    assert len(topology.masked_layers()) == 3
    assert topology.weight_layers() == [model[0], model[2], model[4]]


def test_convnet_discovery_gives_block_one_for_conv_to_conv_and_spatial_size_for_conv_to_linear(tiny_convnet):
    model = tiny_convnet()
    # 0 conv 1 relu 2 pool 3 conv 4 relu 5 pool 6 flatten 7 linear(24,8) 8 relu 9 linear(8,3)
    layers = Topology.from_model(model).hidden_layers
    assert [(layer.name, layer.producer, layer.activation, layer.consumer) for layer in layers] == [
        ("0", model[0], model[1], model[3]),
        ("3", model[3], model[4], model[7]),
        ("7", model[7], model[8], model[9]),
    ]
    assert [layer.n_units for layer in layers] == [4, 6, 8]
    assert [layer.is_conv for layer in layers] == [True, True, False]
    # conv -> conv: one input channel per unit; conv -> linear: in_features / channels = 24 / 6.
    assert [layer.block for layer in layers] == [1, model[7].in_features // model[3].out_channels, 1]
    assert layers[1].block == 4


def test_conv_to_linear_consumer_columns_are_the_channel_major_block():
    layer = HiddenLayer("conv", nn.Conv2d(1, 3, 1), nn.Linear(12, 2), block=4)
    assert layer.consumer_columns(torch.tensor([1])).tolist() == [4, 5, 6, 7]
    assert layer.consumer_columns(torch.tensor([2, 0])).tolist() == [8, 9, 10, 11, 0, 1, 2, 3]


@pytest.mark.parametrize("channel", [0, 2, 5])
def test_consumer_columns_match_what_flatten_actually_feeds(tiny_convnet, channel):
    model = tiny_convnet()
    layer = Topology.from_model(model).hidden_layers[1]
    x = torch.randn(3, 2, 14, 14, generator=torch.Generator().manual_seed(0))
    seen = []
    model[7].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    model(x)

    def bump(module, inputs, output):
        output = output.clone()
        output[:, channel] += 1.0  # changes every pooled value of this channel and nothing else
        return output

    handle = model[4].register_forward_hook(bump)
    model(x)
    handle.remove()
    changed = (seen[0] != seen[1]).any(dim=0).nonzero().flatten()
    assert changed.tolist() == layer.consumer_columns(torch.tensor([channel])).tolist()


def test_outgoing_weights_group_consumer_columns_by_unit(tiny_convnet):
    model = tiny_convnet()
    layer = Topology.from_model(model).hidden_layers[1]
    per_unit = layer.outgoing_weights()  # a plain model is a population of one: (1, out, units, block)
    assert per_unit.shape == (1, 8, 6, 4)
    assert torch.equal(per_unit[0, :, 2], model[7].weight[:, 8:12])
    conv_layer = Topology.from_model(model).hidden_layers[0]
    assert conv_layer.outgoing_weights().shape == (1, 6, 4, 9)
    assert torch.equal(conv_layer.outgoing_weights()[0, :, 1], model[3].weight[:, 1].reshape(6, 9))


class FunctionalNet(nn.Module):
    """Applies its activation with F.relu, so discovery cannot see it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def test_discovery_on_a_functional_model_raises_and_points_to_explicit_declaration():
    topology = Topology.from_model(FunctionalNet())  # discovery is lazy: strategies without units work
    with pytest.raises(TopologyError, match=r"declare the hidden layers\s+explicitly") as info:
        topology.hidden_layers
    assert "'fc1'" in str(info.value) and "'fc2'" in str(info.value)
    assert "F.relu" in str(info.value)


def test_explicit_declaration_by_names_builds_the_hidden_layers():
    model = FunctionalNet()
    topology = Topology(model, [("fc1", None, "fc2"), ("fc2", None, "head")])
    layers = topology.hidden_layers
    assert [(layer.name, layer.producer, layer.consumer) for layer in layers] == [
        ("fc1", model.fc1, model.fc2),
        ("fc2", model.fc2, model.head),
    ]
    assert [layer.n_units for layer in layers] == [6, 5]
    assert all(layer.activation is None and layer.capture_module is layer.producer for layer in layers)


def test_explicit_declaration_with_an_activation_name_captures_that_module():
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(3, 4))
    model.add_module("act", nn.Tanh())
    model.add_module("fc2", nn.Linear(4, 2))
    layer = Topology(model, [("fc1", "act", "fc2")]).hidden_layers[0]
    assert layer.activation is model.act and layer.capture_module is model.act


@pytest.mark.parametrize(
    "declared, message",
    [
        ([("fc1", None, "missing")], "declared module 'missing' is not in the model"),
        ([("fc1", None, "head")], "producer has 6 units but the consumer takes 5 inputs"),
        ([("fc1", "fc2")], "must be (producer, activation, consumer) names"),
    ],
)
def test_inconsistent_declaration_is_a_topology_error(declared, message):
    with pytest.raises(TopologyError) as info:
        Topology(FunctionalNet(), declared).hidden_layers
    assert message in str(info.value)


def test_no_hooks_are_registered_until_capture_starts(tiny_mlp):
    model = tiny_mlp()
    topology = Topology.from_model(model)
    assert len(topology) == 2
    model(torch.randn(2, 6))
    assert _no_hooks(model)
    assert not topology.capturing
    assert all(layer.output is None for layer in topology)


def test_capture_stores_the_activation_module_outputs_and_stop_removes_the_hooks(tiny_mlp):
    model = tiny_mlp()
    topology = Topology.from_model(model)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    topology.start_capture()
    assert topology.capturing
    assert len(model[1]._forward_hooks) == 1 and len(model[3]._forward_hooks) == 1
    model(x)
    first = model[1](model[0](x))
    second = model[3](model[2](first))
    layers = topology.hidden_layers
    assert torch.equal(layers[0].output, first)
    assert torch.equal(layers[1].output, second)
    assert not layers[0].output.requires_grad
    topology.stop_capture()
    assert _no_hooks(model)
    assert not topology.capturing
    assert all(layer.output is None for layer in layers)


def test_capture_of_a_declared_layer_without_activation_stores_the_producer_output():
    model = FunctionalNet()
    topology = Topology(model, [("fc1", None, "fc2")])
    x = torch.randn(2, 4)
    with topology.capture() as layers:
        model(x)
    assert torch.equal(layers[0].output, model.fc1(x))  # pre-activation: what the producer returns
    assert _no_hooks(model)  # the context removes its hooks but keeps the outputs readable


def test_capture_context_inside_started_capture_keeps_the_hooks(tiny_mlp):
    model = tiny_mlp()
    topology = Topology.from_model(model)
    topology.start_capture()
    with topology.capture():
        pass
    assert topology.capturing and not _no_hooks(model)
    topology.stop_capture()
    assert _no_hooks(model)
