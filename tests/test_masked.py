"""Masked layers: the mask buffer, dense layers without one, and the masked-position invariant."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dst.strategies
from dst.errors import ConfigError
from dst.masked import MaskedConv2d, MaskedLinear, mask_of, masked_layers, sparsify
from dst.optim import ElementwiseAdam



def _checkerboard(shape) -> torch.Tensor:
    return (torch.arange(torch.Size(shape).numel()) % 2 == 0).view(*shape)


def test_set_mask_zeroes_weights_at_masked_positions_only():
    torch.manual_seed(0)
    layer = MaskedLinear(4, 3)
    before = layer.weight.detach().clone()
    mask = _checkerboard((3, 4))
    layer.set_mask(mask)
    assert torch.all(layer.weight[~mask] == 0)
    torch.testing.assert_close(layer.weight[mask], before[mask], rtol=0, atol=0)
    assert layer.density == 0.5
    assert layer.active_connections == 6


def test_mask_of_wrong_shape_is_rejected():
    layer = MaskedLinear(4, 3)
    with pytest.raises(ConfigError, match=r"mask shape \(4, 3\) does not match weight shape \(3, 4\)"):
        layer.set_mask(torch.ones(4, 3, dtype=torch.bool))


def test_mask_buffer_is_saved_and_round_trips_into_a_fresh_dense_layer():
    torch.manual_seed(0)
    sparse = MaskedLinear(5, 4, mask=_checkerboard((4, 5)))
    state = sparse.state_dict()
    assert "mask" in state
    assert state["mask"].dtype == torch.bool
    assert torch.equal(state["mask"], sparse.mask)

    fresh = MaskedLinear(5, 4)
    assert fresh.mask is None
    fresh.load_state_dict(state)
    assert fresh.mask is not None
    assert torch.equal(fresh.mask, sparse.mask)
    assert torch.equal(fresh.weight, sparse.weight)
    assert torch.equal(fresh.bias, sparse.bias)
    # The loaded mask is the one per-element optimizers see for this weight.
    assert mask_of(fresh.weight) is fresh.mask
    x = torch.randn(2, 5)
    assert torch.equal(fresh(x), sparse(x))


def test_dense_masked_layer_has_no_mask_in_its_state_dict():
    layer = MaskedLinear(3, 2)
    assert layer.mask is None
    assert "mask" not in layer.state_dict()
    assert not layer.is_sparse and layer.density == 1.0
    assert list(masked_layers(nn.Sequential(layer))) == []
    assert mask_of(layer.weight) is None


def test_from_dense_linear_shares_parameter_objects():
    dense = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(dense.parameters(), lr=0.1)
    wrapped = MaskedLinear.from_dense(dense, _checkerboard((3, 4)))
    assert wrapped.weight is dense.weight
    assert wrapped.bias is dense.bias
    # An optimizer built on the dense layer moves the masked layer's weights.
    before = wrapped.bias.detach().clone()
    wrapped(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    assert not torch.equal(wrapped.bias, before)


def test_from_dense_conv_shares_parameters_and_keeps_the_convolution_settings():
    torch.manual_seed(0)
    dense = nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=1, bias=True)
    x = torch.randn(1, 2, 7, 7)
    expected = dense(x)
    wrapped = MaskedConv2d.from_dense(dense, torch.ones_like(dense.weight, dtype=torch.bool))
    assert wrapped.weight is dense.weight and wrapped.bias is dense.bias
    assert (wrapped.stride, wrapped.padding) == ((2, 2), (1, 1))
    torch.testing.assert_close(wrapped(x), expected, rtol=0, atol=0)


def test_sparsify_with_density_one_leaves_plain_layers_unchanged(tiny_mlp):
    model = tiny_mlp()
    layers_before = list(model)
    weights_before = [p.detach().clone() for p in model.parameters()]
    assert sparsify(model, 1.0) is model
    assert list(model) == layers_before
    assert all(type(m) is not MaskedLinear for m in model)
    assert list(masked_layers(model)) == []
    for before, after in zip(weights_before, model.parameters()):
        assert torch.equal(before, after)


# -- the invariant: masked positions stay exactly zero through real training -------------------

OPTIMIZERS = {
    "sgd-momentum-wd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam-wd": lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2),
    "elementwise-adam-wd": lambda params: ElementwiseAdam(params, lr=1e-2, weight_decay=1e-3),
    "elementwise-adamw": lambda params: ElementwiseAdam(params, lr=1e-2, weight_decay=1e-2, decoupled=True),
}


def _sparse_mlp(tiny_mlp):
    model = sparsify(tiny_mlp(hidden=(16, 16), in_features=10, out_features=4), 0.3, "erk", seed=1)
    return model, torch.randn(64, 10, generator=torch.Generator().manual_seed(2))


def _sparse_convnet(tiny_convnet):
    model = sparsify(tiny_convnet(), 0.3, "erk", seed=1)
    return model, torch.randn(16, 2, 14, 14, generator=torch.Generator().manual_seed(2))


NETWORKS = {"mlp": _sparse_mlp, "convnet": _sparse_convnet}


@pytest.mark.parametrize("network", sorted(NETWORKS))
@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
def test_masked_weights_grads_and_optimizer_state_stay_exactly_zero(
    network, optimizer_name, tiny_mlp, tiny_convnet
):
    factory = tiny_mlp if network == "mlp" else tiny_convnet
    model, inputs = NETWORKS[network](factory)
    targets = torch.randint(0, 3, (inputs.shape[0],), generator=torch.Generator().manual_seed(3))
    layers = list(masked_layers(model))
    expected_type = MaskedLinear if network == "mlp" else MaskedConv2d
    assert any(isinstance(layer, expected_type) for layer in layers)
    assert all(0 < layer.density < 1 for layer in layers)
    masks = [layer.mask.clone() for layer in layers]
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    strategy = dst.strategies.build("bp", model, optimizer, seed=0)
    initial = [layer.weight.detach().clone() for layer in layers]

    dense_grad_leaked = False
    for _ in range(25):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        # The backward pass gives the dense gradient: it is non-zero at some masked position.
        dense_grad_leaked |= any(bool((layer.weight.grad[~mask] != 0).any()) for layer, mask in zip(layers, masks))
        strategy.before_step()
        for layer, mask in zip(layers, masks):
            assert torch.all(layer.weight.grad[~mask] == 0), "a masked gradient reached the optimizer"
        optimizer.step()
        strategy.after_step()

    assert dense_grad_leaked, "test is vacuous: masked positions never received a gradient"
    assert strategy.step == 25
    for layer, mask, start in zip(layers, masks, initial):
        assert torch.equal(layer.mask, mask), "plain backprop must not change the mask"
        assert torch.all(layer.weight[~mask] == 0)
        assert not torch.equal(layer.weight[mask], start[mask]), "active weights did not train"
        state = optimizer.state[layer.weight]
        shaped_like_weight = {
            key: value
            for key, value in state.items()
            if isinstance(value, torch.Tensor) and value.shape == layer.weight.shape
        }
        assert shaped_like_weight, "expected per-element optimizer state to check"
        for key, value in shaped_like_weight.items():
            assert torch.all(value[~mask] == 0), f"optimizer state {key!r} leaked into masked positions"
            assert torch.any(value[mask] != 0), f"optimizer state {key!r} is zero everywhere"
        if isinstance(optimizer, ElementwiseAdam):
            # masked positions never advance their clock; active ones advanced once per step
            assert torch.all(state["step"][mask] == 25)


def test_the_float_mask_cache_follows_in_place_mask_changes_and_loaded_states():
    layer = MaskedLinear(4, 3)
    mask = torch.tensor([[True, False, True, False]] * 3)
    layer.set_mask(mask)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    layer.mask[:, 1] = True  # a refresh writes the mask in place
    layer.apply_mask()
    assert layer.weight.detach().tolist() == [[1.0, 1.0, 1.0, 0.0]] * 3
    state = {key: value.clone() for key, value in layer.state_dict().items()}
    state["mask"][:, 0] = False
    layer.load_state_dict(state)  # copies into the mask in place
    layer.weight.grad = torch.ones(3, 4)
    layer.mask_grad()
    assert layer.weight.grad.tolist() == [[0.0, 1.0, 1.0, 0.0]] * 3
