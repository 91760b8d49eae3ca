"""Unit surgery: re-initialised incoming rows, zero outgoing columns, bias folding, optimizer state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dst.errors import ConfigError
from dst.init import fans, init_bound
from dst.masked import sparsify
from dst.population import MemberRandom
from dst.surgery import (
    UnitSelection,
    fold_into_consumer_bias,
    reinit_incoming,
    replace_units,
    reset_unit_optimizer_state,
    zero_outgoing,
)
from dst.topology import Topology

UNITS = torch.tensor([1, 3])
RANDOM = MemberRandom([12345])  # the one member's random numbers


def _pick(units: torch.Tensor) -> UnitSelection:
    """``units`` of a plain model's only member."""
    return UnitSelection.of_member(units)


def _wide_mlp(tiny_mlp, seed: int = 0):
    """40 -> 6 -> 4 -> 3 tanh: 40 incoming weights per first-layer unit, enough to probe the bound.

    Tanh has no dead units, so every gradient and optimizer state entry is non-zero after a step.
    """
    model = tiny_mlp(hidden=(6, 4), in_features=40, activation="tanh", seed=seed)
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Linear):
                module.bias.uniform_(0.5, 1.0)  # non-zero, so "bias reset to 0" means something
    return model


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _others(n: int, units: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[units] = False
    return keep


def test_replaced_unit_has_fresh_incoming_weights_within_the_kaiming_bound(tiny_mlp):
    model = _wide_mlp(tiny_mlp)
    layer = Topology.from_model(model).hidden_layers[0]
    old = model[0].weight.detach().clone()
    gain = 0.5
    replace_units(layer, _pick(UNITS), None, RANDOM, step=1, gain=gain)
    bound = gain * math.sqrt(3 / 40)
    new_rows = model[0].weight[UNITS]
    assert new_rows.abs().max() <= bound
    assert new_rows.abs().max() > 0.8 * bound  # the whole range is used, not a narrower one
    assert torch.all(new_rows != old[UNITS])


def test_replaced_unit_has_zero_bias_and_zero_outgoing_weights(tiny_mlp):
    model = _wide_mlp(tiny_mlp)
    layer = Topology.from_model(model).hidden_layers[0]
    replace_units(layer, _pick(UNITS), None, RANDOM, step=1)
    assert torch.all(model[0].bias[UNITS] == 0)
    assert torch.all(model[2].weight[:, UNITS] == 0)


def test_replacement_leaves_every_other_unit_and_layer_untouched(tiny_mlp):
    model = _wide_mlp(tiny_mlp)
    before = _snapshot(model)
    layer = Topology.from_model(model).hidden_layers[0]
    replace_units(layer, _pick(UNITS), None, RANDOM, step=1)
    after = _snapshot(model)
    rows = _others(6, UNITS)
    assert torch.equal(after["0.weight"][rows], before["0.weight"][rows])
    assert torch.equal(after["0.bias"][rows], before["0.bias"][rows])
    assert torch.equal(after["2.weight"][:, rows], before["2.weight"][:, rows])
    for name in ("2.bias", "4.weight", "4.bias"):
        assert torch.equal(after[name], before[name]), name


def test_replacing_no_units_changes_nothing(tiny_mlp):
    model = _wide_mlp(tiny_mlp)
    before = _snapshot(model)
    nothing = _pick(torch.tensor([], dtype=torch.long))
    replace_units(Topology.from_model(model).hidden_layers[0], nothing, None, RANDOM, step=1)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_masked_incoming_entries_stay_zero_on_a_sparse_producer(tiny_mlp):
    model = sparsify(_wide_mlp(tiny_mlp), 0.5, "uniform", seed=0)
    mask = model[0].mask
    layer = Topology.from_model(model).hidden_layers[0]
    replace_units(layer, _pick(UNITS), None, RANDOM, step=1)
    rows = model[0].weight[UNITS]
    assert torch.all(rows[~mask[UNITS]] == 0)
    assert torch.all(rows[mask[UNITS]] != 0)  # active entries are re-drawn
    assert torch.equal(model[0].mask, mask)


def test_conv_to_linear_replacement_zeroes_the_whole_block_of_consumer_columns(tiny_convnet):
    model = tiny_convnet()
    layer = Topology.from_model(model).hidden_layers[1]  # conv "3" (6 channels) -> linear "7", block 4
    before = model[7].weight.detach().clone()
    replace_units(layer, _pick(torch.tensor([2])), None, RANDOM, step=1)
    assert torch.all(model[7].weight[:, 8:12] == 0)
    keep = torch.ones(24, dtype=torch.bool)
    keep[8:12] = False
    assert torch.equal(model[7].weight[:, keep], before[:, keep])
    fan_in = 4 * 3 * 3
    assert model[3].weight[2].abs().max() <= math.sqrt(2) * math.sqrt(3 / fan_in)
    assert model[3].bias[2] == 0


def test_conv_to_conv_replacement_zeroes_the_consumer_input_channel(tiny_convnet):
    model = tiny_convnet()
    layer = Topology.from_model(model).hidden_layers[0]
    before = model[3].weight.detach().clone()
    zero_outgoing(layer, _pick(torch.tensor([1])))
    assert torch.all(model[3].weight[:, 1] == 0)
    assert torch.equal(model[3].weight[:, [0, 2, 3]], before[:, [0, 2, 3]])


def test_fold_into_consumer_bias_adds_outgoing_weight_times_mean_activation(tiny_mlp):
    model = _wide_mlp(tiny_mlp)
    layer = Topology.from_model(model).hidden_layers[0]
    w_out = model[2].weight.detach().clone()
    bias = model[2].bias.detach().clone()
    mean_activation = torch.tensor([0.5, 2.0])
    fold_into_consumer_bias(layer, _pick(UNITS), mean_activation)
    expected = bias + w_out[:, 1] * 0.5 + w_out[:, 3] * 2.0
    torch.testing.assert_close(model[2].bias, expected, rtol=1e-6, atol=1e-7)


def test_folding_then_zeroing_keeps_the_consumer_output_when_units_sit_at_their_mean(tiny_mlp):
    model = _wide_mlp(tiny_mlp)
    layer = Topology.from_model(model).hidden_layers[0]
    h = torch.rand(5, 6, generator=torch.Generator().manual_seed(2))
    h[:, 1], h[:, 3] = 0.7, 1.3
    expected = model[2](h)
    fold_into_consumer_bias(layer, _pick(UNITS), torch.tensor([0.7, 1.3]))
    zero_outgoing(layer, _pick(UNITS))
    torch.testing.assert_close(model[2](h), expected, rtol=1e-5, atol=1e-6)


def test_fold_for_conv_to_linear_sums_the_block_columns(tiny_convnet):
    model = tiny_convnet()
    layer = Topology.from_model(model).hidden_layers[1]
    w_out = model[7].weight.detach().clone()
    with torch.no_grad():
        model[7].bias.fill_(0.25)
    units = torch.tensor([0, 4])
    fold_into_consumer_bias(layer, _pick(units), torch.tensor([1.5, -0.5]))
    expected = 0.25 + w_out[:, 0:4].sum(1) * 1.5 + w_out[:, 16:20].sum(1) * -0.5
    torch.testing.assert_close(model[7].bias, expected, rtol=1e-6, atol=1e-7)


def test_fold_with_one_mean_per_block_column_weights_each_column(tiny_convnet):
    model = tiny_convnet()
    layer = Topology.from_model(model).hidden_layers[1]
    w_out = model[7].weight.detach().clone()
    bias = model[7].bias.detach().clone()
    per_column = torch.tensor([[1.0, 2.0, 3.0, 4.0]])  # (units, block)
    fold_into_consumer_bias(layer, _pick(torch.tensor([5])), per_column)
    expected = bias + w_out[:, 20:24] @ per_column[0]
    torch.testing.assert_close(model[7].bias, expected, rtol=1e-6, atol=1e-6)


def _trained_optimizer(model, kind: str):
    if kind == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x = torch.randn(8, *next(model.parameters()).shape[1:2], generator=torch.Generator().manual_seed(0))
    return optimizer, x


STATE_KEYS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq")}


def _step(model, optimizer, x):
    for _ in range(2):
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        optimizer.step()


def _states(optimizer, model, keys):
    return {
        (name, key): optimizer.state[p][key].clone() for name, p in model.named_parameters() for key in keys
    }


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_reset_unit_optimizer_state_zeroes_exactly_the_units_rows_bias_and_columns(tiny_mlp, kind):
    model = _wide_mlp(tiny_mlp)
    optimizer, x = _trained_optimizer(model, kind)
    _step(model, optimizer, x)
    keys = STATE_KEYS[kind]
    before = _states(optimizer, model, keys)
    assert all(torch.all(value != 0) for (name, _), value in before.items() if name.startswith(("0.", "2.")))
    layer = Topology.from_model(model).hidden_layers[0]
    reset_unit_optimizer_state(optimizer, layer, _pick(UNITS))
    after = _states(optimizer, model, keys)
    rows = _others(6, UNITS)
    for key in keys:
        assert torch.all(after["0.weight", key][UNITS] == 0)
        assert torch.equal(after["0.weight", key][rows], before["0.weight", key][rows])
        assert torch.all(after["0.bias", key][UNITS] == 0)
        assert torch.equal(after["0.bias", key][rows], before["0.bias", key][rows])
        assert torch.all(after["2.weight", key][:, UNITS] == 0)
        assert torch.equal(after["2.weight", key][:, rows], before["2.weight", key][:, rows])
        for name in ("2.bias", "4.weight", "4.bias"):
            assert torch.equal(after[name, key], before[name, key]), (name, key)
    if kind == "adam":
        assert all(float(optimizer.state[p]["step"]) == 2 for p in model.parameters())


def test_reset_unit_optimizer_state_for_conv_to_linear_zeroes_the_block_columns(tiny_convnet):
    model = tiny_convnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(4, 2, 14, 14, generator=torch.Generator().manual_seed(0))
    _step(model, optimizer, x)
    layer = Topology.from_model(model).hidden_layers[1]
    consumer_before = optimizer.state[model[7].weight]["momentum_buffer"].clone()
    reset_unit_optimizer_state(optimizer, layer, _pick(torch.tensor([2])))
    consumer_after = optimizer.state[model[7].weight]["momentum_buffer"]
    keep = torch.ones(24, dtype=torch.bool)
    keep[8:12] = False
    assert torch.all(consumer_after[:, 8:12] == 0)
    assert torch.equal(consumer_after[:, keep], consumer_before[:, keep])
    assert torch.all(optimizer.state[model[3].weight]["momentum_buffer"][2] == 0)


def test_replace_units_with_an_optimizer_resets_its_state(tiny_mlp):
    model = _wide_mlp(tiny_mlp)
    optimizer, x = _trained_optimizer(model, "adam")
    _step(model, optimizer, x)
    replace_units(Topology.from_model(model).hidden_layers[0], _pick(UNITS), optimizer, RANDOM, step=1)
    for key in STATE_KEYS["adam"]:
        assert torch.all(optimizer.state[model[0].weight][key][UNITS] == 0)
        assert torch.all(optimizer.state[model[2].weight][key][:, UNITS] == 0)


@pytest.mark.parametrize(
    "scheme, gain, expected",
    [
        ("kaiming", 2.0, 2.0 * math.sqrt(3 / 40)),
        ("lecun", 2.0, math.sqrt(3 / 40)),  # LeCun ignores the gain
        ("xavier", 2.0, 2.0 * math.sqrt(6 / (40 + 6))),
        ("default", 2.0, 1 / math.sqrt(40)),
    ],
)
def test_reinit_respects_the_bound_of_each_init_scheme(tiny_mlp, scheme, gain, expected):
    assert init_bound(scheme, 40, 6, gain) == pytest.approx(expected, rel=1e-12)
    model = _wide_mlp(tiny_mlp)
    layer = Topology.from_model(model).hidden_layers[0]
    units = torch.arange(6)
    reinit_incoming(layer, _pick(units), RANDOM, step=1, init=scheme, gain=gain)
    largest = model[0].weight.abs().max()
    assert largest <= expected
    assert largest > 0.9 * expected


def test_fans_of_a_conv_weight_count_the_receptive_field():
    assert fans((8, 4, 3, 3)) == (36, 72)
    assert fans((5, 7)) == (7, 5)


def test_unknown_init_scheme_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown init scheme 'he'; use one of kaiming, lecun, xavier, default"):
        init_bound("he", 10, 10)
