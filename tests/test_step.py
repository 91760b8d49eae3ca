"""The training step: gradients written out (no autograd) equal autograd's, by hand and against torch."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import dst
import dst.arrays
from dst.masked import MaskedLinear
from dst.nets import mlp
from dst.population import cross_entropy_per_member, mse_per_member
from dst.step import TrainingStep

CPU = torch.device("cpu")
LOSSES = {"mse": mse_per_member, "cross-entropy": cross_entropy_per_member}


def _steps(model, loss_fn, members, host):
    """(written-out step, autograd step on a copy of the model)."""
    reference = copy.deepcopy(model)
    fused = TrainingStep(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, members, CPU)
    autograd = TrainingStep(reference, torch.optim.SGD(reference.parameters(), lr=0.1), loss_fn, members, CPU,
                            fused=False)
    assert fused.fused and not autograd.fused
    assert fused.arrays.host == host
    return fused, autograd, reference


def _batch(members, batch, n_in, n_out, loss, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(members, batch, n_in, generator=generator)
    if loss == "mse":
        return x, torch.randn(members, batch, n_out, generator=generator)
    return x, torch.randint(0, n_out, (members, batch), generator=generator)


def test_written_out_gradients_of_a_one_unit_net_match_the_hand_computed_ones():
    # x = 1, h = 2x = 2, a = relu(h) = 2, o = 3a + 1 = 7, y = 0: L = 49, dL/do = 14,
    # dW2 = 14 a = 28, db2 = 14, dL/da = 14 * 3 = 42, dW1 = 42 x = 42, db1 = 42
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1))
    with torch.no_grad():
        model[0].weight.fill_(2.0), model[0].bias.fill_(0.0), model[2].weight.fill_(3.0), model[2].bias.fill_(1.0)
    step = TrainingStep(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_per_member, 1, CPU)
    output, loss = step(torch.ones(1, 1, 1), torch.zeros(1, 1, 1))
    assert step.fused
    assert output.item() == 7.0 and loss.tolist() == [49.0]
    grads = [param.grad.item() for param in model.parameters()]
    assert grads == [42.0, 42.0, 28.0, 14.0]


@pytest.mark.parametrize("host", [True, False])
@pytest.mark.parametrize("loss", ["mse", "cross-entropy"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "leaky_relu", "linear"])
@pytest.mark.parametrize("batch", [1, 4])
def test_written_out_step_matches_autograd_for_a_population(monkeypatch, host, loss, activation, batch):
    if not host:
        monkeypatch.setattr(dst.arrays, "HOST_MAX_WEIGHTS", 0)
    members = 3
    model = mlp(7, [6, 5], 4, activation, generators=[torch.Generator().manual_seed(s) for s in range(members)])
    fused, autograd, reference = _steps(model, LOSSES[loss], members, host)
    x, y = _batch(members, batch, 7, 4, loss)
    output, losses = fused(x, y)
    expected_output, expected_losses = autograd(x, y)
    torch.testing.assert_close(output, expected_output, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-6)
    assert losses.shape == (members,) and output.shape == (members, batch, 4)
    for param, expected in zip(model.parameters(), reference.parameters()):
        assert param.grad.shape == param.shape
        torch.testing.assert_close(param.grad, expected.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("host", [True, False])
def test_written_out_step_of_a_plain_model_matches_autograd_and_its_hooks_see_plain_tensors(monkeypatch, host):
    if not host:
        monkeypatch.setattr(dst.arrays, "HOST_MAX_WEIGHTS", 0)
    model = mlp(5, [4], 3, "tanh", generator=torch.Generator().manual_seed(0))
    seen = []
    model[1].register_forward_hook(lambda module, inputs, output: seen.append((inputs[0].shape, output.clone())))
    fused, autograd, reference = _steps(model, cross_entropy_per_member, 1, host)
    x, y = _batch(1, 2, 5, 3, "cross-entropy")
    fused(x, y)
    autograd(x, y)
    assert seen[0][0] == seen[1][0] == (2, 4)  # the activation's input: a plain (batch, units) tensor
    torch.testing.assert_close(seen[0][1], seen[1][1])
    for param, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, expected.grad, rtol=1e-5, atol=1e-6)


def test_a_model_with_a_backward_hook_or_forward_pre_hook_takes_autograd():
    model = mlp(3, [2], 1, "tanh", generator=torch.Generator().manual_seed(0))
    step = TrainingStep(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_per_member, 1, CPU)
    x, y = torch.ones(1, 1, 3), torch.zeros(1, 1, 1)
    calls = []
    handle = model[2].weight.register_hook(lambda grad: calls.append("tensor") or grad * 0)
    step(x, y)
    assert calls == ["tensor"] and model[2].weight.grad.abs().sum() == 0  # autograd ran the hook
    handle.remove()
    handle = model[0].register_forward_pre_hook(lambda module, inputs: calls.append("pre"))
    step(x, y)
    assert calls == ["tensor", "pre"]
    handle.remove()
    step(x, y)
    assert calls == ["tensor", "pre"] and model[2].weight.grad.abs().sum() > 0


def test_a_forward_hook_that_replaces_an_output_is_refused_with_the_fix():
    model = mlp(3, [2], 1, generator=torch.Generator().manual_seed(0))
    model[1].register_forward_hook(lambda module, inputs, output: output * 2)
    step = TrainingStep(model, torch.optim.SGD(model.parameters(), lr=0.1), mse_per_member, 1, CPU)
    with pytest.raises(RuntimeError, match="fused=False"):
        step(torch.ones(1, 1, 3), torch.zeros(1, 1, 1))


@pytest.mark.parametrize(
    "model, loss_fn",
    [
        (nn.Sequential(nn.Linear(3, 2), nn.ELU(), nn.Linear(2, 1)), mse_per_member),  # activation not covered
        (nn.Sequential(nn.Linear(3, 2), nn.LeakyReLU(-0.5), nn.Linear(2, 1)), mse_per_member),  # slope < 0
        (nn.Sequential(nn.Linear(3, 2), nn.ReLU()), mse_per_member),  # ends in an activation
        (nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.ReLU(), nn.Linear(2, 1)), mse_per_member),
        (nn.Sequential(nn.Conv2d(1, 1, 1), nn.Flatten()), mse_per_member),
        (nn.Sequential(nn.Linear(3, 1)), lambda output, target: (output - target).abs().mean((1, 2))),
    ],
)
def test_models_and_losses_the_written_out_step_does_not_cover_take_autograd(model, loss_fn):
    step = TrainingStep(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, 1, CPU)
    assert not step.fused


def test_a_population_experiment_gives_the_same_rows_with_and_without_autograd():
    """Bit-flipping CBP with replacements, 3 members: identical replacement counts, losses to 1e-5."""
    from dst.runner import RunSpec, prepare

    rows = {}
    for fused in (None, False):
        spec = RunSpec("bit-flipping", "cbp", steps=3000, seeds=(0, 1, 2),
                       bench={"probe": False, "bin_size": 500},
                       settings={"replacement_rate": 1e-2, "maturity_threshold": 50})
        experiment = prepare(spec, progress=False)
        experiment.train_step = TrainingStep(experiment.model, experiment.optimizer, experiment.loss_fn, 3,
                                             CPU, fused)
        assert experiment.train_step.fused == (fused is None)
        rows[fused] = experiment.run()
    for written, autograd in zip(rows[None], rows[False]):
        assert written["units_replaced"].tolist() == autograd["units_replaced"].tolist()
        assert written["units_replaced"].sum() > 0
        np.testing.assert_allclose(written["loss"], autograd["loss"], rtol=1e-5)


def test_masked_population_layers_take_the_written_out_step_with_dense_gradients():
    members = 2
    model = nn.Sequential(MaskedLinear(4, 3, members=members), nn.ReLU(), MaskedLinear(3, 2, members=members))
    dst.sparsify(model, density=0.5, seed=[0, 1])
    fused, autograd, reference = _steps(model, mse_per_member, members, True)
    x, y = _batch(members, 1, 4, 2, "mse")
    fused(x, y)
    autograd(x, y)
    for param, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, expected.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3])
def test_the_torch_step_writes_a_gradient_nobody_kept_in_place_and_leaves_a_kept_one_alone(monkeypatch, batch):
    monkeypatch.setattr(dst.arrays, "HOST_MAX_WEIGHTS", 0)  # the torch formulas
    members = 2
    model = mlp(3, [4], 2, generators=[torch.Generator().manual_seed(s) for s in range(members)])
    fused, autograd, reference = _steps(model, mse_per_member, members, False)
    first, second = _batch(members, batch, 3, 2, "mse", seed=0), _batch(members, batch, 3, 2, "mse", seed=1)
    fused(*first)
    weight = model[0].weight
    storage = weight.grad.data_ptr()
    fused(*second)  # nobody holds the gradient: the same memory, this step's values
    assert weight.grad.data_ptr() == storage
    autograd(*second)
    torch.testing.assert_close(weight.grad, reference[0].weight.grad)
    kept = weight.grad
    before = kept.clone()
    fused(*first)  # ``kept`` must keep the previous step's gradient: a fresh tensor instead
    assert weight.grad is not kept and torch.equal(kept, before)
    autograd(*first)
    torch.testing.assert_close(weight.grad, reference[0].weight.grad)
