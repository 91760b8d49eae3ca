"""Weight-space methods (dst.methods): weight clipping and UPGD on hand-computed cases."""

import math

import pytest
import torch
from torch import nn

import dst
from dst.errors import ConfigError


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


# -- weight clipping --------------------------------------------------------------------------


def test_weight_clipping_clips_each_layer_to_kappa_times_its_kaiming_bound():
    # hidden 2 -> 3 (ReLU, gain sqrt 2): b = sqrt(2) sqrt(3 / 2) = sqrt(3); output 3 -> 1 (gain 1): b = sqrt(3 / 3) = 1
    model = dst.nets.mlp(2, [3], 1, generator=torch.Generator().manual_seed(0))
    strategy = dst.strategies.build("weight-clipping", model, torch.optim.SGD(model.parameters(), lr=0.1), kappa=2.0)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[5.0, -5.0], [0.5, -0.5], [3.4, -3.5]]))
        model[0].bias.copy_(torch.tensor([4.0, -1.0, 0.0]))
        model[2].weight.copy_(torch.tensor([[2.5, -1.5, -2.01]]))
        model[2].bias.fill_(-7.0)
    strategy.after_step()
    hidden, out = 2 * math.sqrt(3), 2.0
    torch.testing.assert_close(model[0].weight, torch.tensor([[hidden, -hidden], [0.5, -0.5], [3.4, -hidden]]))
    torch.testing.assert_close(model[0].bias, torch.tensor([hidden, -1.0, 0.0]))
    torch.testing.assert_close(model[2].weight, torch.tensor([[out, -1.5, -out]]))
    torch.testing.assert_close(model[2].bias, torch.tensor([-out]))


def test_weight_clipping_gives_each_member_its_kappa_and_keeps_masked_weights_zero():
    model = dst.nets.mlp(4, [3], 2, generators=[torch.Generator().manual_seed(s) for s in range(2)])
    dst.sparsify(model, density=0.5, seed=[0, 1])
    configs = [dst.strategies.config("weight-clipping", kappa=k, init="default") for k in (0.5, 3.0)]
    strategy = dst.strategies.build("weight-clipping", model, torch.optim.SGD(model.parameters(), lr=0.1),
                                    config=configs, seed=[0, 1])
    with torch.no_grad():
        model[0].weight.fill_(10.0)
        model[0].apply_mask()
    strategy.after_step()
    weight, mask = model[0].weight, model[0].mask  # (2, 3, 4); init=default: b = 1 / sqrt(fan_in) = 1 / 2
    assert torch.all(weight[0][mask[0]] == 0.25) and torch.all(weight[1][mask[1]] == 1.5)
    assert torch.all(weight[~mask] == 0)


def test_weight_clipping_refuses_a_kappa_that_is_not_positive():
    model = dst.nets.mlp(2, [3], 1)
    with pytest.raises(ConfigError, match="kappa"):
        dst.strategies.build("weight-clipping", model, torch.optim.SGD(model.parameters(), lr=0.1), kappa=0.0)


# -- UPGD -------------------------------------------------------------------------------------


def _one_weight_row(w, g, **settings):
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = dst.strategies.build("upgd", model, optimizer, seed=0, **settings)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([w]))
    model[0].weight.grad = torch.tensor([g])
    return model, optimizer, strategy


def test_upgd_global_step_by_hand():
    # u = 0.5 * 0 + 0.5 * (-g w) = [-0.25, 0.5]; eta = 0.5; u_hat = u / (1 - 0.5) = [-0.5, 1];
    # gate = sigmoid(u_hat / eta) = sigmoid([-1, 2]); w <- w (1 - lr wd) - lr g (1 - gate)
    model, optimizer, strategy = _one_weight_row([1.0, -2.0], [0.5, 0.5], beta_utility=0.5, sigma=0.0, weight_decay=0.1)
    strategy.before_step()
    optimizer.step()
    strategy.after_step()
    expected = [w * (1 - 0.1 * 0.1) - 0.1 * 0.5 * (1 - _sigmoid(r)) for w, r in ((1.0, -1.0), (-2.0, 2.0))]
    torch.testing.assert_close(model[0].weight, torch.tensor([expected]))
    torch.testing.assert_close(strategy.trace, torch.tensor([[-0.25, 0.5]]))  # (members, weights)


def test_upgd_local_scaling_normalises_each_row_of_the_corrected_utility():
    model, optimizer, strategy = _one_weight_row([1.0, -2.0], [0.5, 0.5], beta_utility=0.5, sigma=0.0,
                                                 scaling="local")
    strategy.before_step()
    norm = math.sqrt(0.5**2 + 1.0**2)  # ||u_hat|| of the row [-0.5, 1]
    expected = [0.5 * (1 - _sigmoid(-0.5 / norm)), 0.5 * (1 - _sigmoid(1.0 / norm))]
    torch.testing.assert_close(model[0].weight.grad, torch.tensor([expected]))


def test_upgd_bias_correction_and_trace_over_two_steps():
    # step 2 with the same gradient: u_2 = 0.5 u_1 + 0.5 (-g w_1), u_hat_2 = u_2 / (1 - 0.25)
    model, optimizer, strategy = _one_weight_row([1.0, -2.0], [0.5, 0.5], beta_utility=0.5, sigma=0.0)
    strategy.before_step()
    optimizer.step()
    strategy.after_step()
    w1 = model[0].weight.detach().clone()[0].tolist()
    model[0].weight.grad = torch.tensor([[0.5, 0.5]])
    strategy.before_step()
    u2 = [0.5 * u1 + 0.5 * (-0.5 * w) for u1, w in zip((-0.25, 0.5), w1)]
    eta = max(u2)
    expected = [0.5 * (1 - _sigmoid(u / 0.75 / eta)) for u in u2]
    torch.testing.assert_close(model[0].weight.grad, torch.tensor([expected]))


def test_upgd_perturbation_is_gaussian_gated_by_one_half_at_zero_utility_and_absent_where_masked():
    members = 2
    model = dst.nets.mlp(100, [100], 100, generators=[torch.Generator().manual_seed(s) for s in range(members)])
    dst.sparsify(model, density=0.5, seed=[0, 1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    configs = [dst.strategies.config("upgd", sigma=s) for s in (0.1, 0.02)]
    strategy = dst.strategies.build("upgd", model, optimizer, config=configs, seed=[0, 1])
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    with torch.no_grad():  # zero weights and gradients: every utility 0, eta 0, gate 1/2
        model[0].weight.zero_()
    strategy.before_step()
    grad, mask = model[0].weight.grad, model[0].mask
    assert torch.all(grad[~mask] == 0)
    for member, sigma in enumerate((0.1, 0.02)):
        noise = grad[member][mask[member]] / 0.5  # xi ~ N(0, sigma^2) over ~5,000 active weights
        assert abs(noise.mean().item()) < 0.1 * sigma
        assert noise.std().item() == pytest.approx(sigma, rel=0.05)


@pytest.mark.parametrize("optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    lambda params: torch.optim.SGD(params, lr=0.1, weight_decay=1e-3),
    lambda params: dst.build_optimizer("adam", params, 1e-3),
])
def test_upgd_refuses_an_optimizer_that_is_not_plain_sgd_with_the_fix(optimizer):
    model = dst.nets.mlp(2, [3], 1)
    with pytest.raises(ConfigError, match="optimizer=sgd momentum=0"):
        dst.strategies.build("upgd", model, optimizer(model.parameters()))


def test_upgd_refuses_a_utility_decay_of_one():
    model = dst.nets.mlp(2, [3], 1)
    with pytest.raises(ConfigError, match="beta_utility"):
        dst.strategies.build("upgd", model, torch.optim.SGD(model.parameters(), lr=0.1), beta_utility=1.0)
