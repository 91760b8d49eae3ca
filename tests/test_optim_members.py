"""Populations: member s of a population, with its own learning rate, is torch's optimizer on its slice alone;
per-member rates are validated, saved and restored; masked positions and state resets hold per member."""

from __future__ import annotations

import copy
import functools
import io
import math
import re

import pytest
import torch
from torch import nn

import dst.optim
from dst.errors import ConfigError
from dst.optim import SGD, Adam, AdamW, ElementwiseAdam, build_optimizer
from dst.optim_state import reset_optimizer_state

MEMBERS = 4
MEMBER_LRS = [0.01, 0.03, 0.1, 0.003]
STEPS = 50

# (ours, torch's reference, shared settings)
CASES = [
    (SGD, torch.optim.SGD, dict(momentum=0.9, weight_decay=1e-2)),
    (Adam, torch.optim.Adam, dict(weight_decay=1e-2)),
    (AdamW, torch.optim.AdamW, dict(weight_decay=0.1)),
    (ElementwiseAdam, torch.optim.Adam, dict(weight_decay=1e-2)),
    (functools.partial(ElementwiseAdam, decoupled=True), torch.optim.AdamW, dict(weight_decay=0.1)),
]
CASE_IDS = ["sgd-momentum-wd", "adam-wd", "adamw", "elementwise-adam-wd", "elementwise-adam-decoupled"]
NAMES = ["sgd", "adam", "adamw", "elementwise-adam"]


def _population(dtype=torch.float32, members: int = MEMBERS) -> list[nn.Parameter]:
    """A population layer's weight (S, out, in) and bias (S, out)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(members, 5, 3, generator=generator, dtype=dtype)
    bias = torch.randn(members, 5, generator=generator, dtype=dtype)
    return [nn.Parameter(weight), nn.Parameter(bias)]


def _quadratic(params, targets, curvatures) -> torch.Tensor:
    """Elementwise, so a member's gradient is exactly what its slice alone would get."""
    return sum((c * (p - t) ** 2).sum() for p, t, c in zip(params, targets, curvatures))


def _assert_relatively_close(actual, expected, message=""):
    """|actual - expected| <= 1e-6 * max |expected| (relative to the tensor's scale)."""
    error, scale = float((actual - expected).detach().abs().max()), float(expected.detach().abs().max())
    assert error <= 1e-6 * scale, f"{message}: max error {error:.3g} ({error / scale:.3g} relative)"


@pytest.mark.parametrize("ours, reference, settings", CASES, ids=CASE_IDS)
def test_each_member_matches_torch_run_alone_with_its_own_lr(ours, reference, settings):
    population = _population()
    alone = [[nn.Parameter(p[s].detach().clone()) for p in population] for s in range(MEMBERS)]
    optimizer = ours(population, lr=MEMBER_LRS, **settings)
    references = [reference(alone[s], lr=MEMBER_LRS[s], **settings) for s in range(MEMBERS)]
    start = [p.detach().clone() for p in population]
    data = torch.Generator().manual_seed(1)
    curvatures = [torch.rand(p.shape, generator=data) + 0.1 for p in population]
    for step in range(STEPS):
        targets = [torch.randn(p.shape, generator=data) for p in population]
        optimizer.zero_grad()
        _quadratic(population, targets, curvatures).backward()
        optimizer.step()
        for s in range(MEMBERS):
            references[s].zero_grad()
            _quadratic(alone[s], [t[s] for t in targets], [c[s] for c in curvatures]).backward()
            references[s].step()
    for s in range(MEMBERS):
        for p, q in zip(population, alone[s]):
            _assert_relatively_close(p[s], q, f"member {s} (lr {MEMBER_LRS[s]}), shape {tuple(p.shape)}")
    assert all(not torch.equal(p, q) for p, q in zip(population, start))


INVALID_LRS = [0.0, -1e-3, math.nan, math.inf, True, "0.1", None]
INVALID_LRS += [[0.1, "a"], [0.1, -0.2], [0.1, math.nan], [], [[0.1]]]


@pytest.mark.parametrize("lr", INVALID_LRS)
@pytest.mark.parametrize("name", NAMES)
def test_invalid_lr_is_refused_naming_the_value(name, lr):
    with pytest.raises(ConfigError, match=re.escape(f"invalid lr={lr!r}")):
        build_optimizer(name, _population(), lr=lr)


@pytest.mark.parametrize(
    "lr",
    [torch.zeros(MEMBERS), torch.ones(2, 2), torch.ones(MEMBERS, dtype=torch.bool)],
    ids=["zero", "2-d", "bool"],
)
def test_invalid_lr_tensor_is_refused(lr):
    with pytest.raises(ConfigError, match="invalid lr=tensor"):
        Adam(_population(), lr=lr)


@pytest.mark.parametrize("name", NAMES)
def test_per_member_lr_on_a_parameter_without_the_member_dimension_is_refused(name):
    plain = nn.Linear(3, 5)  # weight (5, 3): a population of one, not of MEMBERS
    message = rf"shape \(5, 3\) has no leading member dimension of size {MEMBERS}; "
    with pytest.raises(ConfigError, match=message + "per-member learning rates need population parameters"):
        build_optimizer(name, plain.parameters(), lr=MEMBER_LRS)
    optimizer = build_optimizer(name, _population(), lr=MEMBER_LRS)
    with pytest.raises(ConfigError, match=r"shape \(\) has no leading member dimension"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.tensor(1.0))]})


def test_per_member_lr_may_be_a_tuple_or_a_tensor_and_is_kept_as_float64_on_the_cpu():
    for lr in (tuple(MEMBER_LRS), torch.tensor(MEMBER_LRS, dtype=torch.float32)):
        group = SGD(_population(), lr=lr).param_groups[0]
        assert group["lr"].dtype == torch.float64 and group["lr"].device.type == "cpu"
        expected = torch.tensor(MEMBER_LRS, dtype=torch.float64)
        torch.testing.assert_close(group["lr"], expected, rtol=1e-7, atol=0)  # float32 input: rounded once


def _train(params, optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        optimizer.step()


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_saves_the_member_lrs_and_a_loaded_optimizer_uses_them(name):
    population = _population()
    optimizer = build_optimizer(name, population, lr=MEMBER_LRS, momentum=0.9, weight_decay=1e-2)
    _train(population, optimizer, 5, seed=1)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)

    restored = [nn.Parameter(p.detach().clone()) for p in population]
    other = build_optimizer(name, restored, lr=[1.0] * MEMBERS, momentum=0.9, weight_decay=1e-2)
    _train(restored, other, 1, seed=7)  # its views of the old rates are built (and must be dropped)
    for p, q in zip(restored, population):
        p.data.copy_(q)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(other.param_groups[0]["lr"], torch.tensor(MEMBER_LRS, dtype=torch.float64))

    _train(population, optimizer, 5, seed=2)
    _train(restored, other, 5, seed=2)
    for p, q in zip(restored, population):
        assert torch.equal(p, q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_state_dict_from_the_cpu_loads_onto_cuda_parameters():
    population = _population()
    optimizer = Adam(population, lr=MEMBER_LRS, weight_decay=1e-2)
    _train(population, optimizer, 3, seed=1)
    on_cuda = [nn.Parameter(p.detach().cuda()) for p in population]
    cuda_optimizer = Adam(on_cuda, lr=[1.0] * MEMBERS, weight_decay=1e-2)
    cuda_optimizer.load_state_dict(optimizer.state_dict())
    assert cuda_optimizer.param_groups[0]["lr"].device.type == "cpu"
    _train(population, optimizer, 3, seed=2)
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        for p in on_cuda:
            p.grad = torch.randn(p.shape, generator=generator).cuda()
        cuda_optimizer.step()
    for p, q in zip(on_cuda, population):
        torch.testing.assert_close(p.cpu(), q.detach(), rtol=1e-5, atol=1e-6)


def test_member_lr_views_are_built_once_and_follow_changes_to_the_rates():
    weight = nn.Parameter(torch.zeros(3, 2))
    optimizer = SGD([weight], lr=[0.1, 0.2, 0.3])
    group = optimizer.param_groups[0]
    first, again = (optimizer._member_views(group, [weight], "lr")[0] for _ in range(2))
    assert first is again and first.shape == (3, 1)

    def update() -> torch.Tensor:
        before = weight.detach().clone()
        weight.grad = torch.ones_like(weight)
        optimizer.step()
        return (before - weight.detach())[:, 0]

    torch.testing.assert_close(update(), torch.tensor([0.1, 0.2, 0.3]))
    group["lr"][1] = 0.5  # changed in place
    torch.testing.assert_close(update(), torch.tensor([0.1, 0.5, 0.3]))
    group["lr"] = torch.tensor([0.4, 0.4, 0.4], dtype=torch.float64)  # replaced
    torch.testing.assert_close(update(), torch.tensor([0.4, 0.4, 0.4]))


@pytest.mark.parametrize("ours, reference, settings", CASES, ids=CASE_IDS)
def test_masked_positions_keep_zero_weights_and_zero_state_per_member(ours, reference, settings, monkeypatch):
    generator = torch.Generator().manual_seed(3)
    mask = torch.rand(MEMBERS, 6, 4, generator=generator) < 0.5  # a different pattern in every member
    weight = nn.Parameter(torch.randn(MEMBERS, 6, 4, generator=generator) * mask)
    bias = nn.Parameter(torch.randn(MEMBERS, 6, generator=generator))
    monkeypatch.setattr(dst.optim, "mask_of", lambda param: mask if param is weight else None)
    optimizer = ours([weight, bias], lr=MEMBER_LRS, **settings)
    for _ in range(20):
        x = torch.randn(MEMBERS, 8, 4, generator=generator)
        target = torch.randn(MEMBERS, 8, 6, generator=generator)
        optimizer.zero_grad()
        output = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
        nn.functional.mse_loss(output, target).backward()
        weight.grad.mul_(mask)  # what a masked layer's mask_grad does
        optimizer.step()
    assert torch.all(weight[~mask] == 0) and torch.all(weight[mask] != 0)
    tensors = {k: v for k, v in optimizer.state[weight].items() if isinstance(v, torch.Tensor) and v.dim()}
    assert tensors.keys() >= ({"momentum_buffer"} if ours is SGD else {"exp_avg", "exp_avg_sq"})
    for key, value in tensors.items():
        assert torch.all(value[~mask] == 0), key
        assert torch.all(value[mask] != 0), key
    if "step" in tensors:  # ElementwiseAdam: the clock advances only where the member's mask is set
        assert torch.all(tensors["step"][mask] == 20)


RESET = (torch.tensor([0, 2]), torch.tensor([1, 3]))  # (member, row): row 1 of member 0, row 3 of member 2


def test_member_row_reset_gives_a_fresh_first_step_there_at_that_members_lr():
    lrs = [1e-3, 2e-3, 5e-3]
    generator = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(3, 4, 5, generator=generator, dtype=torch.float64))
    optimizer = ElementwiseAdam([weight], lr=lrs)
    _train([weight], optimizer, 200, seed=1)
    weight_untouched = copy.deepcopy((weight, optimizer))

    reset_optimizer_state(optimizer, weight, RESET)
    state = optimizer.state[weight]
    where = torch.zeros(weight.shape, dtype=torch.bool)
    where[RESET] = True
    assert torch.all(state["step"][where] == 0) and torch.all(state["step"][~where] == 200)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.all(state[key][where] == 0) and torch.all(state[key][~where] != 0)

    gradient = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
    updates = []
    for param, opt in ((weight, optimizer), weight_untouched):
        before = param.detach().clone()
        param.grad = gradient.clone()
        opt.step()
        updates.append(param.detach() - before)
    reset_update, untouched_update = updates
    fresh_first_step = -torch.tensor(lrs, dtype=torch.float64).view(3, 1, 1) * gradient.sign()
    fresh_first_step = fresh_first_step.expand_as(weight)
    torch.testing.assert_close(reset_update[where], fresh_first_step[where], rtol=1e-6, atol=0)
    torch.testing.assert_close(reset_update[~where], untouched_update[~where], rtol=0, atol=0)


@pytest.mark.parametrize("flat", [False, True], ids=["member-row", "flat"])
@pytest.mark.parametrize(
    "make",
    [
        functools.partial(SGD, lr=MEMBER_LRS, momentum=0.9),
        functools.partial(Adam, lr=MEMBER_LRS),
        functools.partial(AdamW, lr=0.01),
        functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
        functools.partial(torch.optim.Adam, lr=0.01),
    ],
    ids=["sgd", "adam", "adamw", "torch-sgd", "torch-adam"],
)
def test_reset_zeroes_every_state_tensor_of_a_population_parameter_at_the_index_only(make, flat):
    weight, bias = _population()
    optimizer = make([weight, bias])
    _train([weight, bias], optimizer, 5, seed=1)
    where = torch.zeros(weight.shape, dtype=torch.bool)
    where[RESET] = True
    index = where.view(-1).nonzero().squeeze(1) if flat else RESET
    reset_optimizer_state(optimizer, weight, index, flat=flat)
    tensors = {key: v for key, v in optimizer.state[weight].items() if isinstance(v, torch.Tensor) and v.dim()}
    sgd = "SGD" in type(optimizer).__name__
    assert tensors.keys() >= ({"momentum_buffer"} if sgd else {"exp_avg", "exp_avg_sq"})
    for key, value in tensors.items():
        assert torch.all(value[where] == 0) and torch.all(value[~where] != 0), key
    bias_state = [v for v in optimizer.state[bias].values() if isinstance(v, torch.Tensor) and v.dim()]
    assert all(torch.all(v != 0) for v in bias_state)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "elementwise-adam"])
def test_step_runs_torch_step_hooks_and_a_closure_without_torch_profiler_wrapper(name):
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = build_optimizer(name, [param], lr=0.1)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append(("pre", args)))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(("post", args)))

    def closure():
        calls.append(("closure", ()))
        param.grad = torch.ones(2)
        return torch.tensor(3.0)

    assert optimizer.step(closure).item() == 3.0
    assert [call[0] for call in calls] == ["pre", "closure", "post"]
    assert calls[0][1] == (closure,)
    assert bool((param < 1).all())  # the update ran
