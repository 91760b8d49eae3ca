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


# -- Parseval and spectral regularisation -----------------------------------------------------


def _hidden_weight(model, weight):
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(weight))
    for param in model.parameters():
        param.grad = torch.zeros_like(param)


@pytest.mark.parametrize("weight, strength, expected", [
    # 4 lambda (W W^T - 2 I) W with W = diag(1, 2): 4 * 0.5 * diag(-1, 2) diag(1, 2) = diag(-2, 8)
    ([[1.0, 0.0], [0.0, 2.0]], 0.5, [[-2.0, 0.0], [0.0, 8.0]]),
    # W W^T = diag(2, 1): W W^T - 2 I = diag(0, -1), times W keeps only the second row: [0, 0, -1] x 4
    ([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], 1.0, [[0.0, 0.0, 0.0], [0.0, 0.0, -4.0]]),
])
def test_parseval_gradient_by_hand_and_the_output_layer_left_alone(weight, strength, expected):
    rows, columns = len(weight), len(weight[0])
    model = dst.nets.mlp(columns, [rows], 1)
    strategy = dst.strategies.build("parseval", model, torch.optim.SGD(model.parameters(), lr=0.1), strength=strength)
    _hidden_weight(model, weight)
    strategy.before_step()
    torch.testing.assert_close(model[0].weight.grad, torch.tensor(expected))
    assert torch.all(model[2].weight.grad == 0)


def test_parseval_gradient_is_masked_on_a_sparse_layer():
    model = dst.nets.mlp(6, [5], 1, generators=[torch.Generator().manual_seed(s) for s in range(2)])
    dst.sparsify(model, density=0.5, seed=[0, 1])
    strategy = dst.strategies.build("parseval", model, torch.optim.SGD(model.parameters(), lr=0.1), seed=[0, 1])
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    strategy.before_step()
    grad, mask = model[0].weight.grad, model[0].mask
    assert torch.all(grad[~mask] == 0) and bool((grad[mask] != 0).any())
    w = model[0].weight.detach()  # the active entries are 4 lambda ((W W^T - 2 I) W), member by member
    for s in range(2):
        full = 4e-3 * (w[s] @ w[s].T - 2 * torch.eye(5)) @ w[s]
        torch.testing.assert_close(grad[s][mask[s]], full[mask[s]])


def test_spectral_reg_gradient_by_hand_on_a_diagonal_matrix():
    # sigma_max(diag(3, 1)) = 3, u = v = e1: 2 lambda k sigma^(k - 1) (sigma^k - 1) = 2 * 2 * 3 * 8 = 96
    model = dst.nets.mlp(2, [2], 1)
    strategy = dst.strategies.build("spectral-reg", model, torch.optim.SGD(model.parameters(), lr=0.1),
                                    strength=1.0, power_iterations=20, output_layer=False, seed=0)
    for _ in range(3):
        _hidden_weight(model, [[3.0, 0.0], [0.0, 1.0]])
        strategy.before_step()
    torch.testing.assert_close(model[0].weight.grad.abs(), torch.tensor([[96.0, 0.0], [0.0, 0.0]]), atol=1e-3, rtol=1e-4)
    assert torch.all(model[2].weight.grad == 0)


def test_spectral_reg_power_iteration_finds_the_largest_singular_value_of_each_member():
    members = 3
    model = dst.nets.mlp(7, [5], 1, generators=[torch.Generator().manual_seed(s) for s in range(members)])
    configs = [dst.strategies.config("spectral-reg", strength=1.0, power=1, power_iterations=20) for _ in range(members)]
    strategy = dst.strategies.build("spectral-reg", model, torch.optim.SGD(model.parameters(), lr=0.1),
                                    config=configs, seed=list(range(members)))
    for _ in range(5):  # 100 power iterations on fixed weights
        for param in model.parameters():
            param.grad = torch.zeros_like(param)
        strategy.before_step()
    for layer in (model[0], model[2]):
        sigma = torch.linalg.matrix_norm(layer.weight.detach(), ord=2)  # (S,): an independent SVD
        # k = 1: the gradient is 2 (sigma - 1) u v^T, whose Frobenius norm is 2 |sigma - 1|
        norm = torch.linalg.matrix_norm(layer.weight.grad)
        torch.testing.assert_close(norm, 2 * (sigma - 1).abs(), rtol=1e-4, atol=1e-5)


def test_spectral_reg_refuses_members_with_different_power_iterations():
    model = dst.nets.mlp(3, [2], 1, generators=[torch.Generator().manual_seed(s) for s in range(2)])
    configs = [dst.strategies.config("spectral-reg", power_iterations=n) for n in (1, 2)]
    with pytest.raises(ConfigError, match="power_iterations"):
        dst.strategies.build("spectral-reg", model, torch.optim.SGD(model.parameters(), lr=0.1), config=configs, seed=[0, 1])


# -- Hare & Tortoise --------------------------------------------------------------------------


def test_the_tortoise_is_an_ema_of_the_hare_which_is_reset_to_it_with_its_optimizer_state():
    members = 2
    model = dst.nets.mlp(2, [2], 1, generators=[torch.Generator().manual_seed(s) for s in range(members)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    configs = [dst.strategies.config("hare-tortoise", beta=0.5, reset_every=every) for every in (2, 3)]
    strategy = dst.strategies.build("hare-tortoise", model, optimizer, config=configs, seed=[0, 1])
    start = model[0].weight.detach().clone()
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()  # every weight -0.1 (momentum buffer = 1)
    strategy.after_step()  # tortoise = 0.5 start + 0.5 (start - 0.1) = start - 0.05
    torch.testing.assert_close(strategy.tortoise[0], start - 0.05)
    optimizer.step()  # -0.19 more: buffer 0.9 + 1 = 1.9
    strategy.after_step()  # tortoise = 0.5 (start - 0.05) + 0.5 (start - 0.29) = start - 0.17; member 0 resets
    torch.testing.assert_close(strategy.tortoise[0], start - 0.17)
    torch.testing.assert_close(model[0].weight[0], start[0] - 0.17)  # member 0: the hare is the tortoise
    torch.testing.assert_close(model[0].weight[1], start[1] - 0.29)  # member 1: resets at step 3
    buffer = optimizer.state[model[0].weight]["momentum_buffer"]
    assert torch.all(buffer[0] == 0) and torch.allclose(buffer[1], torch.full_like(buffer[1], 1.9))


# -- plasticity injection ---------------------------------------------------------------------


def _injected(members=2, **settings):
    model = dst.nets.mlp(3, [4, 6], 2, generators=[torch.Generator().manual_seed(s) for s in range(members)])
    optimizer = dst.build_optimizer("sgd", model.parameters(), 0.1, momentum=0.9)
    strategy = dst.strategies.build("plasticity-injection", model, optimizer, seed=list(range(members)), **settings)
    return model, optimizer, strategy


def _head(z, w1, b1, w2, b2):
    """The 2-layer head by hand: (S, batch, 4) -> (S, batch, 2)."""
    hidden = torch.relu(z @ w1.transpose(1, 2) + b1[:, None])
    return hidden @ w2.transpose(1, 2) + b2[:, None]


def test_injection_keeps_the_output_and_then_trains_a_fresh_head_minus_its_frozen_copy():
    from dst.population import forward

    model, optimizer, strategy = _injected()
    x = torch.randn(2, 5, 3)
    before = forward(model, x).detach()
    old = [p.detach().clone() for p in strategy.head.head.parameters()]
    strategy.set_horizon(10)
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()  # momentum buffers of 1
    for _ in range(5):
        strategy.after_step()  # the 5th step is halfway: injection
    assert strategy.head.injections == 1
    frozen = [p.detach().clone() for p in strategy.head.head.parameters()]  # theta_0' = the fresh head
    assert not torch.equal(frozen[0], old[0]) and torch.all(frozen[1] == 0) and torch.all(frozen[3] == 0)
    for param in strategy.head.head.parameters():
        assert torch.all(optimizer.state[param]["momentum_buffer"] == 0)
    z = torch.relu(x @ model[0].weight.detach().transpose(1, 2) + model[0].bias.detach()[:, None])
    torch.testing.assert_close(forward(model, x).detach(), _head(z, *[p - 0.1 for p in old]), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the fresh head moves; the frozen terms do not
        for param in strategy.head.head.parameters():
            param.add_(0.05)
    moved = [p + 0.05 for p in frozen]
    expected = _head(z, *[p - 0.1 for p in old]) + _head(z, *moved) - _head(z, *frozen)
    torch.testing.assert_close(forward(model, x).detach(), expected, rtol=1e-5, atol=1e-5)
    del before


def test_injecting_at_every_task_start_keeps_the_output_each_time_and_resumes_its_frozen_heads():
    from dst.population import forward

    model, optimizer, strategy = _injected(every_task=True, head_layers=1)
    x = torch.randn(2, 5, 3)
    for task in range(3):
        before = forward(model, x).detach()
        strategy.on_task_start(task)
        torch.testing.assert_close(forward(model, x).detach(), before, rtol=1e-5, atol=1e-6)
    assert strategy.head.injections == 2
    fresh, _, resumed = _injected(every_task=True, head_layers=1)
    fresh.load_state_dict(model.state_dict())
    resumed.load_state_dict(strategy.state_dict())
    torch.testing.assert_close(forward(fresh, x), forward(model, x))


def test_plasticity_injection_needs_a_separable_head():
    model = dst.nets.mlp(3, [4], 2)
    with pytest.raises(dst.TopologyError, match="separable head.*head_layers"):
        dst.strategies.build("plasticity-injection", model, None, head_layers=2, seed=0)


def test_upgd_stays_finite_when_the_largest_utility_is_subnormal_and_others_are_zero():
    # dead units' traces decay toward 0: eta can be subnormal while most traces are exactly 0
    model, optimizer, strategy = _one_weight_row([1.0, 0.0], [-1e-40, 0.0], beta_utility=0.0, sigma=0.0)
    strategy.before_step()
    grad = model[0].weight.grad
    assert torch.isfinite(grad).all()
    # u = [1e-40, 0] (subnormal): eta = 1e-40, u_hat / eta = [1, 0]: gates sigmoid(1), 1/2
    assert grad[0, 1].item() == 0.0 and grad[0, 0].item() == pytest.approx(-1e-40 * (1 - _sigmoid(1.0)), rel=1e-3)
