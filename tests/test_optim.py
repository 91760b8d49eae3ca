"""A population of one: our SGD / Adam / AdamW match torch's; ElementwiseAdam is identical to torch's
Adam/AdamW until a reset, then a fresh start per element. (Populations, per-member rates: test_optim_members.py)"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from dst import nets
from dst.errors import ConfigError
from dst.masked import sparsify
from dst.optim import SGD, Adam, AdamW, ElementwiseAdam, build_optimizer
from dst.optim_state import reset_optimizer_state


STEPS = 50
RELATIVE_TOLERANCE = 1e-6


def assert_relatively_close(actual: torch.Tensor, expected: torch.Tensor, message: str = "") -> None:
    """|actual - expected| <= 1e-6 * max |expected| everywhere (relative to the tensor's scale, so an entry
    that happens to pass near zero does not need an impossible elementwise relative precision)."""
    error = float((actual - expected).detach().abs().max())
    scale = float(expected.detach().abs().max())
    assert error <= RELATIVE_TOLERANCE * scale, f"{message}: max error {error:.3g} ({error / scale:.3g} relative)"


def _net(sparse: bool = False) -> nn.Sequential:
    model = nets.mlp(8, [16, 16], 3, "tanh", generator=torch.Generator().manual_seed(0))
    return sparsify(model, 0.4, seed=1) if sparse else model


def _train_side_by_side(model, reference_model, optimizer, reference):
    data = torch.Generator().manual_seed(5)
    for step in range(STEPS):
        x = torch.randn(16, 8, generator=data)
        y = torch.randn(16, 3, generator=data)
        for net, opt in ((model, optimizer), (reference_model, reference)):
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            for layer in net:  # what a strategy's before_step does on a sparse net
                if getattr(layer, "mask", None) is not None:
                    layer.mask_grad()
            opt.step()
        for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
            assert_relatively_close(p, q, f"step {step}, {name}")


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize(
    "name, settings, reference",
    [
        ("sgd", dict(lr=0.05, momentum=0.9, weight_decay=1e-2), torch.optim.SGD),
        ("adam", dict(lr=1e-2, weight_decay=1e-2), torch.optim.Adam),
        ("adamw", dict(lr=1e-2, weight_decay=0.1), torch.optim.AdamW),
    ],
    ids=["sgd-momentum-wd", "adam-wd", "adamw"],
)
def test_optimizer_matches_torch_step_for_step_with_a_float_lr(name, settings, reference, sparse):
    model = _net(sparse)
    reference_model = copy.deepcopy(model)
    optimizer = build_optimizer(name, model.parameters(), **settings)
    torch_optimizer = reference(reference_model.parameters(), **settings)
    start = [p.detach().clone() for p in model.parameters()]
    _train_side_by_side(model, reference_model, optimizer, torch_optimizer)
    assert all(not torch.equal(p, s) for p, s in zip(model.parameters(), start))


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_elementwise_adam_matches_torch_adam_step_for_step(weight_decay, sparse):
    model = _net(sparse)
    reference_model = copy.deepcopy(model)
    optimizer = ElementwiseAdam(model.parameters(), lr=1e-2, weight_decay=weight_decay)
    reference = torch.optim.Adam(reference_model.parameters(), lr=1e-2, weight_decay=weight_decay)
    start = [p.detach().clone() for p in model.parameters()]
    _train_side_by_side(model, reference_model, optimizer, reference)
    assert all(not torch.equal(p, s) for p, s in zip(model.parameters(), start))
    for p, q in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(optimizer.state[p]["exp_avg"], reference.state[q]["exp_avg"])
        torch.testing.assert_close(optimizer.state[p]["exp_avg_sq"], reference.state[q]["exp_avg_sq"])


def test_decoupled_elementwise_adam_matches_torch_adamw_step_for_step():
    model = _net()
    reference_model = copy.deepcopy(model)
    optimizer = ElementwiseAdam(model.parameters(), lr=1e-2, weight_decay=0.1, decoupled=True)
    reference = torch.optim.AdamW(reference_model.parameters(), lr=1e-2, weight_decay=0.1)
    _train_side_by_side(model, reference_model, optimizer, reference)


def test_decoupled_and_coupled_weight_decay_differ():
    # Guards the AdamW comparison above against a decoupled flag that is silently ignored.
    coupled_model, decoupled_model = _net(), _net()
    coupled = ElementwiseAdam(coupled_model.parameters(), lr=1e-2, weight_decay=0.1)
    decoupled = ElementwiseAdam(decoupled_model.parameters(), lr=1e-2, weight_decay=0.1, decoupled=True)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    for net, opt in ((coupled_model, coupled), (decoupled_model, decoupled)):
        for _ in range(3):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    assert not torch.allclose(coupled_model[0].weight, decoupled_model[0].weight)


def test_step_state_is_shaped_like_the_parameter_and_counts_steps():
    model = _net()
    optimizer = ElementwiseAdam(model.parameters(), lr=1e-3)
    x = torch.randn(4, 8)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()
    for p in model.parameters():
        assert optimizer.state[p]["step"].shape == p.shape
        assert torch.all(optimizer.state[p]["step"] == 3)


LR = 1e-3
LONG_RUN = 3000
RESET = (torch.tensor([0, 2]),)
GRADIENT = torch.tensor([0.8, -1.5, -0.4, 2.0], dtype=torch.float64)


@functools.cache
def _long_trained_once(optimizer_class):
    param = nn.Parameter(torch.tensor([0.5, -0.3, 0.2, 0.1], dtype=torch.float64))
    optimizer = optimizer_class([param], lr=LR)
    for _ in range(LONG_RUN):
        param.grad = GRADIENT.clone()
        optimizer.step()
    return param, optimizer


def _long_trained(optimizer_class):
    """A parameter and its optimizer after a long run (float64, so updates compare tightly)."""
    return copy.deepcopy(_long_trained_once(optimizer_class))  # deepcopy keeps param -> state linked


def _update(param, optimizer, grad) -> torch.Tensor:
    before = param.detach().clone()
    param.grad = grad.clone()
    optimizer.step()
    return param.detach() - before


def test_reset_restarts_the_elementwise_clock_and_moments_at_those_positions_only():
    param, optimizer = _long_trained(ElementwiseAdam)
    reset_optimizer_state(optimizer, param, RESET)
    state = optimizer.state[param]
    assert state["step"].tolist() == [0, LONG_RUN, 0, LONG_RUN]
    assert state["exp_avg"][RESET].tolist() == [0, 0] and state["exp_avg_sq"][RESET].tolist() == [0, 0]
    assert torch.all(state["exp_avg"][[1, 3]] != 0) and torch.all(state["exp_avg_sq"][[1, 3]] != 0)


def test_reset_position_takes_a_fresh_adam_first_step_while_torch_adam_overshoots():
    new_gradient = torch.tensor([-0.3, 1.0, 0.7, 1.0], dtype=torch.float64)

    fresh_param = nn.Parameter(torch.tensor([0.5, -0.3, 0.2, 0.1], dtype=torch.float64))
    fresh_update = _update(fresh_param, torch.optim.Adam([fresh_param], lr=LR), new_gradient)
    # A fresh Adam's first step is lr * sign(g) (up to eps).
    torch.testing.assert_close(fresh_update, -LR * new_gradient.sign(), rtol=1e-4, atol=0)

    elementwise_param, elementwise = _long_trained(ElementwiseAdam)
    torch_param, torch_adam = _long_trained(torch.optim.Adam)
    torch.testing.assert_close(elementwise_param, torch_param)  # identical until the reset
    for param, optimizer in ((elementwise_param, elementwise), (torch_param, torch_adam)):
        reset_optimizer_state(optimizer, param, RESET)
    elementwise_update = _update(elementwise_param, elementwise, new_gradient)
    torch_update = _update(torch_param, torch_adam, new_gradient)

    # ElementwiseAdam: the reset positions behave exactly like a fresh parameter...
    torch.testing.assert_close(elementwise_update[RESET], fresh_update[RESET], rtol=1e-9, atol=0)
    # ...and the untouched positions exactly like torch's Adam.
    torch.testing.assert_close(elementwise_update[[1, 3]], torch_update[[1, 3]], rtol=1e-9, atol=0)
    # torch's Adam keeps its old bias correction: (1 - beta1) / sqrt(1 - beta2) ~ 3.16 times too large
    # once the run is long (here sqrt(1 - 0.999^3001) / (1 - 0.9^3001) = 0.975 of that).
    ratio = torch_update[RESET] / fresh_update[RESET]
    expected = 0.1 / 0.001**0.5 * (1 - 0.999 ** (LONG_RUN + 1)) ** 0.5
    torch.testing.assert_close(ratio, torch.full_like(ratio, expected), rtol=1e-3, atol=0)
    assert torch.all(ratio > 3.0)


def test_reset_optimizer_state_accepts_a_boolean_mask_and_ignores_scalar_state():
    param, optimizer = _long_trained(torch.optim.Adam)
    where = torch.tensor([True, False, False, True])
    reset_optimizer_state(optimizer, param, where)
    state = optimizer.state[param]
    assert state["exp_avg"][where].tolist() == [0, 0]
    assert torch.all(state["exp_avg"][~where] != 0)
    assert float(state["step"]) == LONG_RUN  # the scalar clock cannot be reset per element


def test_reset_optimizer_state_without_state_is_a_no_op():
    param = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    reset_optimizer_state(optimizer, param, (torch.tensor([0]),))
    assert optimizer.state.get(param, {}) == {}


@pytest.mark.parametrize(
    "name, expected_type",
    [
        ("sgd", SGD),
        ("adam", Adam),
        ("adamw", AdamW),
        ("elementwise-adam", ElementwiseAdam),
    ],
)
def test_build_optimizer_by_name_passes_the_settings(name, expected_type):
    param = nn.Parameter(torch.ones(2))
    optimizer = build_optimizer(name, [param], lr=0.05, momentum=0.9, weight_decay=1e-3)
    assert type(optimizer) is expected_type
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.05 and group["weight_decay"] == 1e-3
    if name == "sgd":
        assert group["momentum"] == 0.9


def test_build_optimizer_unknown_name_raises_listing_the_known_ones():
    with pytest.raises(ConfigError, match="unknown optimizer 'rmsprop'; use one of sgd, adam, adamw, elementwise-adam"):
        build_optimizer("rmsprop", [nn.Parameter(torch.ones(1))], lr=0.1)


@pytest.mark.parametrize(
    "kwargs", [{"lr": 0.0}, {"lr": 1e-3, "betas": (0.9, 1.0)}, {"lr": 1e-3, "weight_decay": -1.0}]
)
def test_elementwise_adam_rejects_invalid_hyperparameters(kwargs):
    with pytest.raises(ConfigError, match="ElementwiseAdam: invalid"):
        ElementwiseAdam([nn.Parameter(torch.ones(1))], **kwargs)
