import torch

import dst


def _backward(net, x):
    loss = net(x).pow(2).mean()
    loss.backward()


def test_shrink_perturb_shrinks_by_lr_times_decay_exactly_without_noise():
    net = dst.nets.mlp(4, [6], 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    strategy = dst.strategies.build("shrink-perturb", net, opt, weight_decay=0.1, noise_std=0.0)
    before = [p.detach().clone() for p in net.parameters()]
    strategy.after_step()  # no optimizer step: only the strategy acts
    for p, b in zip(net.parameters(), before):
        torch.testing.assert_close(p.detach(), b * (1 - 0.5 * 0.1))


def test_shrink_perturb_noise_has_the_configured_scale_and_masked_weights_stay_zero():
    net = dst.sparsify(dst.nets.mlp(50, [200], 10), density=0.2, seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    strategy = dst.strategies.build("shrink-perturb", net, opt, weight_decay=0.0, noise_std=0.01, seed=0)
    before = net[0].weight.detach().clone()
    strategy.after_step()
    delta = (net[0].weight - before)[net[0].mask]
    assert abs(delta.std().item() - 0.01) < 0.001
    assert (net[0].weight[~net[0].mask] == 0).all()


def test_l2_init_adds_the_gradient_of_the_pull_toward_initial_weights():
    torch.manual_seed(0)
    net = dst.nets.mlp(3, [4], 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    strategy = dst.strategies.build("l2-init", net, opt, strength=0.5)
    initial = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    x = torch.randn(2, 3)
    _backward(net, x)
    plain = [p.grad.clone() for p in net.parameters()]
    strategy.before_step()
    for p, g, start in zip(net.parameters(), plain, initial):
        torch.testing.assert_close(p.grad, g + 2 * 0.5 * (p.detach() - start))


def test_head_reset_reinitialises_the_output_layer_at_each_new_task_only():
    torch.manual_seed(0)
    net = dst.nets.mlp(3, [4], 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    strategy = dst.strategies.build("head-reset", net, opt, seed=0)
    _backward(net, torch.randn(2, 3))
    opt.step()
    head_before, hidden_before = net[2].weight.detach().clone(), net[0].weight.detach().clone()
    strategy.on_task_start(0)
    assert torch.equal(net[2].weight, head_before)
    strategy.on_task_start(1)
    assert not torch.equal(net[2].weight, head_before)
    assert (net[2].bias == 0).all()
    assert (opt.state[net[2].weight]["momentum_buffer"] == 0).all()
    assert torch.equal(net[0].weight, hidden_before)
    assert net[2].weight.abs().max() <= (1 * 3 / 4) ** 0.5


def test_retrain_draws_every_layer_afresh_at_its_activations_gain_for_each_member_at_new_tasks_only():
    net = dst.sparsify(_population(), density=0.5, seed=[0, 1, 2])
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    strategy = dst.strategies.build("retrain", net, opt, seed=[0, 1, 2])
    _backward(net, torch.randn(3, 2, 4))
    opt.step()
    with torch.no_grad():
        net[0].bias.fill_(1.0)
    before = [p.detach().clone() for p in net.parameters()]
    strategy.on_task_start(0)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    strategy.on_task_start(1)
    hidden, head = net[0], net[2]
    # U(-b, b): b = gain * sqrt(3 / fan_in), the ReLU gain sqrt(2) for the hidden layer, 1 for the output
    assert hidden.weight.abs().max() <= 2**0.5 * (3 / 4) ** 0.5 and head.weight.abs().max() <= (3 / 6) ** 0.5
    assert hidden.weight.abs().max() > 0.5 * (3 / 4) ** 0.5
    assert (hidden.bias == 0).all() and (head.bias == 0).all()
    assert (hidden.weight[~hidden.mask] == 0).all() and (head.weight[~head.mask] == 0).all()
    assert not torch.equal(hidden.weight[0], before[0][0]) and not torch.equal(hidden.weight[0], hidden.weight[1])
    assert all((opt.state[p]["momentum_buffer"] == 0).all() for p in net.parameters())
    assert strategy.retrains == 1


def _population(seeds=(0, 1, 2)):
    return dst.nets.mlp(4, [6], 2, generators=[torch.Generator().manual_seed(s) for s in seeds])


def test_shrink_perturb_shrinks_each_member_by_its_own_lr_times_decay():
    net = _population()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    configs = [dst.strategies.config("shrink-perturb", weight_decay=wd, noise_std=0.0) for wd in (0.1, 0.4, 0.0)]
    strategy = dst.strategies.build("shrink-perturb", net, opt, config=configs, seed=[0, 1, 2])
    before = [p.detach().clone() for p in net.parameters()]
    strategy.after_step()
    for p, b in zip(net.parameters(), before):  # population parameters are member-first
        for member, factor in enumerate((1 - 0.5 * 0.1, 1 - 0.5 * 0.4, 1.0)):
            torch.testing.assert_close(p[member], b[member] * factor)


def test_shrink_perturb_noise_has_each_members_scale():
    net = dst.nets.mlp(50, [200], 10, generators=[torch.Generator().manual_seed(s) for s in (0, 1)])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    configs = [dst.strategies.config("shrink-perturb", weight_decay=0.0, noise_std=sigma) for sigma in (0.01, 0.0)]
    strategy = dst.strategies.build("shrink-perturb", net, opt, config=configs, seed=[0, 1])
    before = net[0].weight.detach().clone()
    strategy.after_step()
    delta = net[0].weight - before
    assert abs(delta[0].std().item() - 0.01) < 0.001
    assert (delta[1] == 0).all()


def test_l2_init_pulls_each_member_toward_its_own_initial_weights_with_its_own_strength():
    net = _population()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    configs = [dst.strategies.config("l2-init", strength=lam) for lam in (0.5, 0.1, 0.0)]
    strategy = dst.strategies.build("l2-init", net, opt, config=configs, seed=[0, 1, 2])
    initial = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.arange(1.0, 4.0).view(-1, *[1] * (p.dim() - 1)))  # member s moved by s + 1
    x = torch.randn(3, 2, 4)
    dst.population.forward(net, x).pow(2).mean((1, 2)).sum().backward()
    plain = [p.grad.clone() for p in net.parameters()]
    strategy.before_step()
    for p, g, start in zip(net.parameters(), plain, initial):
        for member, lam in enumerate((0.5, 0.1, 0.0)):
            torch.testing.assert_close(p.grad[member], g[member] + 2 * lam * (p[member].detach() - start[member]))
