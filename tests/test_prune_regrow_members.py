"""Populations of SET, RigL and the weight-space baselines: member s of a population is the run of seed s
alone with its own settings, a plain nn.Sequential is a population of one, and the invariants hold per
member after every update."""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import numpy as np
import pytest
import torch

import dst
from dst.population import forward, member_view, mse_per_member
from dst.refresh import NO_REFRESH

IN, HIDDEN, OUT, BATCH = 6, (12, 10), 3, 4
SEEDS = (11, 12, 13)
STEPS, TASK, EVERY = 300, 100, 50  # steps, steps per task, steps between weight snapshots


@dataclasses.dataclass(frozen=True)
class Case:
    strategy: str
    shared: tuple = ()  # settings of every member
    members: tuple = ()  # (key, (value of member 0, 1, 2)) per setting that differs
    changed: tuple = ()  # (key, another value for member 1)
    optimizer: str = "sgd"

    def configs(self, change: bool = False) -> list:
        configs = []
        for s in range(len(SEEDS)):
            settings = dict(self.shared) | {key: values[s] for key, values in self.members}
            if change and s == 1:
                settings |= dict(self.changed)
            configs.append(dst.strategies.config(self.strategy, **settings))
        return configs


CASES = {
    "set": Case("set", (("schedule", "constant"), ("grow_init", "random")),
                (("drop_fraction", (0.3, 0.1, 0.5)), ("update_interval", (5, 7, 3)), ("grow_scale", (0.1, 0.3, 0.05))),
                (("drop_fraction", 0.2),)),
    "set-split-sign": Case("set", (("schedule", "constant"), ("split_sign", True), ("grow_init", "random")),
                           (("drop_fraction", (0.3, 0.5, 0.2)), ("update_interval", (4, 4, 6))),
                           (("update_interval", 9),)),
    "rigl-constant": Case("rigl", (("schedule", "constant"),),
                          (("drop_fraction", (0.3, 0.1, 0.5)), ("update_interval", (5, 7, 3))),
                          (("drop_fraction", 0.4),), optimizer="adam"),
    "rigl-cosine": Case("rigl", (("schedule", "cosine"), ("grow_init", "random")),
                        (("drop_fraction", (0.5, 0.3, 0.4)), ("update_interval", (4, 6, 5)),
                         ("end_step", (200, 270, 0))),
                        (("end_step", 120),)),
    "shrink-perturb": Case("shrink-perturb", (),
                           (("weight_decay", (1e-2, 1e-1, 0.0)), ("noise_std", (1e-3, 0.0, 1e-2))),
                           (("noise_std", 3e-3),)),
    "l2-init": Case("l2-init", (), (("strength", (1e-2, 1e-1, 0.0)),), (("strength", 0.5),), optimizer="adam"),
    "head-reset": Case("head-reset", optimizer="adam"),  # no numeric setting: the members differ in seed only
}


def _model(seeds: tuple, plain: bool = False) -> torch.nn.Module:
    """An MLP sparsified to density 0.4: a population of the seeds, or (``plain``) nn.Linear layers."""
    if plain:
        (seed,) = seeds
        net = dst.nets.mlp(IN, list(HIDDEN), OUT, generator=torch.Generator().manual_seed(seed))
        return dst.sparsify(net, 0.4, seed=seed)
    net = dst.nets.mlp(IN, list(HIDDEN), OUT, generators=[torch.Generator().manual_seed(s) for s in seeds])
    return dst.sparsify(net, 0.4, seed=list(seeds))


def _data(seeds: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's own stream: inputs (steps, S, batch, in), targets (steps, S, batch, out)."""
    xs, ys = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(1000 + seed)
        xs.append(torch.randn(STEPS, BATCH, IN, generator=g))
        ys.append(torch.randn(STEPS, BATCH, OUT, generator=g))
    return torch.stack(xs, 1), torch.stack(ys, 1)


def _optimizer(name: str, params):
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-2)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _member_params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [member_view(m, p) for m in model.modules() for p in m.parameters(recurse=False)]


def _check_masked_grads(strategy) -> None:
    for layer in strategy.masked:
        assert (layer.weight.grad[~layer.mask] == 0).all()


def _check_invariants(strategy, counts: list[np.ndarray]) -> None:
    """Per member and layer: the active count unchanged, masked weights and optimizer state 0."""
    for layer, count in zip(strategy.masked, counts):
        mask = member_view(layer, layer.mask)
        np.testing.assert_array_equal(mask.flatten(1).sum(1).numpy(), count)
        assert (layer.weight[~layer.mask] == 0).all()
        for value in strategy.optimizer.state[layer.weight].values():
            if isinstance(value, torch.Tensor) and value.shape == layer.weight.shape:
                assert (value[~layer.mask] == 0).all()


def _run(case: Case, seeds: tuple, configs, *, plain: bool = False, check: bool = False, members=None):
    """Train by hand; per step the regrowth counts (S,) and (on update steps) the masks, and the
    parameters every EVERY steps. ``members`` picks the data of a population's members."""
    x, y = _data(SEEDS)
    members = list(range(len(seeds))) if members is None else members
    x, y = x[:, members], y[:, members]
    model = _model(seeds, plain)
    opt = _optimizer(case.optimizer, model.parameters())
    strategy = dst.strategies.build(case.strategy, model, opt, config=configs, seed=list(seeds))
    strategy.set_horizon(STEPS, TASK)
    counts = [member_view(layer, layer.mask).flatten(1).sum(1).numpy() for layer in strategy.masked]
    regrown, masks, weights = [], [], []
    for t in range(STEPS):
        if t % TASK == 0:
            strategy.on_task_start(t // TASK)
        opt.zero_grad()
        mse_per_member(forward(model, x[t]), y[t]).sum().backward()
        strategy.before_step()
        if check:
            _check_masked_grads(strategy)
        opt.step()
        stats = strategy.after_step()
        step_regrown = np.zeros(len(seeds), np.int64) if stats is NO_REFRESH else stats.connections_regrown
        if stats is not NO_REFRESH:
            assert step_regrown.dtype == np.int64 and step_regrown.shape == (len(seeds),) and step_regrown.any()
        regrown.append(step_regrown)
        updated = step_regrown.any()
        masks.append([member_view(layer, layer.mask).clone() for layer in strategy.masked] if updated else None)
        if check:
            _check_invariants(strategy, counts)
        if (t + 1) % EVERY == 0:
            weights.append([p.detach().clone() for p in _member_params(model)])
    return np.stack(regrown), masks, weights


@lru_cache(maxsize=None)
def _population(name: str, change: bool = False):
    case = CASES[name]
    return _run(case, SEEDS, case.configs(change), check=not change)


def _assert_member_equals(population, member: int, single) -> None:
    """Member ``member`` of a population's record equals a population of one's record."""
    regrown, masks, weights = population
    single_regrown, single_masks, single_weights = single
    np.testing.assert_array_equal(regrown[:, member], single_regrown[:, 0])
    for step in np.flatnonzero(regrown[:, member]):  # the member's updates (the same steps in both)
        for a, b in zip(masks[step], single_masks[step]):
            assert torch.equal(a[member], b[0]), f"masks differ after step {step + 1}"
    for snapshot, (these, those) in enumerate(zip(weights, single_weights)):
        for a, b in zip(these, those):
            torch.testing.assert_close(a[member], b[0], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"weights after step {(snapshot + 1) * EVERY}: {m}")


@pytest.mark.parametrize("name", list(CASES))
# member 1 in the default suite; the first and last members (each a full single run) under slow
@pytest.mark.parametrize("member", [pytest.param(0, marks=pytest.mark.slow), 1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_member_runs_the_experiment_of_a_population_of_one_with_its_seed_and_settings(name, member):
    case = CASES[name]
    population = _population(name)
    single = _run(case, (SEEDS[member],), case.configs()[member], members=[member])
    _assert_member_equals(population, member, single)
    if case.strategy in ("set", "rigl"):
        assert (population[0][:, member] > 0).sum() > 25  # the refresh really happened, many times


@pytest.mark.parametrize("name", list(CASES))
def test_a_plain_sequential_model_is_the_population_layer_model_of_one(name):
    case = CASES[name]
    config = case.configs()[0]
    plain = _run(case, SEEDS[:1], config, plain=True, members=[0])
    layered = _run(case, SEEDS[:1], config, members=[0])
    _assert_member_equals(layered, 0, plain)


def _member_record(record, member: int):
    """Member ``member`` of a population's record, as a population of one's record."""
    regrown, masks, weights = record
    masks = [None if step is None else [mask[[member]] for mask in step] for step in masks]
    return regrown[:, [member]], masks, [[w[[member]] for w in snapshot] for snapshot in weights]


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.changed])
def test_changing_one_members_settings_leaves_the_other_members_unchanged(name):
    population, changed = _population(name), _population(name, change=True)
    for member in (0, 2):
        _assert_member_equals(population, member, _member_record(changed, member))
    with pytest.raises(AssertionError):
        _assert_member_equals(population, 1, _member_record(changed, 1))


@pytest.mark.parametrize("name", ["set", "rigl-constant"])
def test_each_member_regrows_round_of_its_fraction_times_its_active_count_per_layer(name):
    case = CASES[name]
    regrown, _, _ = _population(name)
    model = _model(SEEDS)
    active = [member_view(layer, layer.mask).flatten(1).sum(1).numpy() for layer in dst.masked.masked_layers(model)]
    settings = dict(case.members)
    for member in range(len(SEEDS)):
        fraction, interval = settings["drop_fraction"][member], settings["update_interval"][member]
        expected = sum(round(fraction * int(count[member])) for count in active)
        steps = np.arange(1, STEPS + 1)
        np.testing.assert_array_equal(regrown[:, member], np.where(steps % interval == 0, expected, 0))


def test_a_step_that_changes_nothing_returns_no_refresh():
    case = CASES["rigl-constant"]
    model = _model(SEEDS)
    opt = _optimizer(case.optimizer, model.parameters())
    strategy = dst.strategies.build("rigl", model, opt, config=case.configs(), seed=list(SEEDS))
    x, y = _data(SEEDS)
    for t in range(3):  # intervals (5, 7, 3): only member 2 updates, at step 3
        opt.zero_grad()
        mse_per_member(forward(model, x[t]), y[t]).sum().backward()
        strategy.before_step()
        opt.step()
        stats = strategy.after_step()
        if t < 2:
            assert stats is NO_REFRESH
    assert stats.connections_regrown[:2].tolist() == [0, 0] and stats.connections_regrown[2] > 0


def test_head_reset_draws_each_members_fresh_head_within_the_bound_and_zeroes_its_state():
    model = _model(SEEDS)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    strategy = dst.strategies.build("head-reset", model, opt, seed=list(SEEDS))
    x, y = _data(SEEDS)
    mse_per_member(forward(model, x[0]), y[0]).sum().backward()
    opt.step()
    head, hidden = model[-1], model[0]
    before, hidden_before = head.weight.detach().clone(), hidden.weight.detach().clone()
    strategy.on_task_start(1)
    bound = 3 ** 0.5 / HIDDEN[-1] ** 0.5  # kaiming, gain 1: sqrt(3 / fan_in)
    for s in range(len(SEEDS)):
        assert not torch.equal(head.weight[s], before[s])
        assert (head.weight[s].abs() <= bound).all()
    assert not torch.equal(head.weight[0], head.weight[1])  # each member its own draw
    assert (head.weight[~head.mask] == 0).all() and (head.bias == 0).all()
    assert (opt.state[head.weight]["momentum_buffer"] == 0).all()
    assert torch.equal(hidden.weight, hidden_before)
