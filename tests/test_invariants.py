"""Property-based invariants of the strategy protocol, for every registered strategy.

Hypothesis draws a tiny network (an MLP or a ConvNet on tiny images; about a fifth of the examples
are populations of 2 or 3 MLP members, built with ``dst.nets.mlp(..., generators=[...])``, each with
its own seeds and numeric settings, trained on member-first data through ``dst.population.forward``), a
density (dense, or sparse with each registered layer-density distribution), an optimizer (SGD with
momentum / Nesterov / weight decay, Adam and AMSGrad, AdamW, ``dst.ElementwiseAdam`` coupled or
decoupled), the strategy's settings (every choice and flag from its config, numeric settings from small
ranges that make refreshes happen within a few steps) and a schedule (steps, task length). It then
trains with the protocol

    forward, loss, zero_grad, backward, strategy.before_step(), opt.step(), strategy.after_step()

calling ``on_task_start`` at task boundaries, and checks after every step, member by member:

- the gradient handed to the optimizer is exactly zero at masked positions (after ``before_step``);
- masked weights are exactly zero;
- every optimizer state tensor shaped like a masked weight (momentum buffers, exp_avg, exp_avg_sq,
  AMSGrad's max, ElementwiseAdam's per-element step) is exactly zero at masked positions;
- every layer of every member keeps exactly the number of active connections it started with, and no
  layer gains or loses its mask;
- ``after_step`` reports its counts per member (an int, or an array of shape (members,));
- no parameter, gradient or optimizer state is NaN or infinite.

In about half the examples the run is checkpointed mid-way (model, optimizer and strategy state dicts)
and continued in freshly built objects, as a resumed experiment is; the invariants hold across it.

Each test also asserts that it was not vacuous: refreshing strategies really refreshed (units replaced,
connections regrown or a head reset) in most examples, and sparse examples really produced non-zero
dense gradients at masked positions for ``before_step`` to remove.

The default suite runs a few derandomised examples per strategy (profile ``dst-invariants-fast``); the
``slow`` set runs the same property at 1,000 random examples per strategy (``dst-invariants-slow``) and
prints how many examples ran and how many refreshed.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.database import DirectoryBasedExampleDatabase
from torch import nn

import dst
import dst.strategies
from dst.errors import TopologyError
from dst.optim import ElementwiseAdam
from dst.population import forward, is_population, member_view, mse_per_member
from dst.population import members as population_size
from dst.sparsity import DISTRIBUTIONS
from dst.srigl import row_fan_ins

# -- profiles ---------------------------------------------------------------------------------

FAST_EXAMPLES = 10
SLOW_EXAMPLES = 1000

# Hypothesis keeps its files (failing examples of the random slow runs, its cache of source constants)
# under .pytest_cache, which git ignores, instead of a .hypothesis directory in the working tree.
_STORAGE = Path(__file__).resolve().parents[1] / ".pytest_cache" / "hypothesis"
set_hypothesis_home_dir(str(_STORAGE))
_DATABASE = DirectoryBasedExampleDatabase(str(_STORAGE / "examples"))

settings.register_profile(
    "dst-invariants-fast",
    max_examples=FAST_EXAMPLES,
    deadline=None,
    derandomize=True,  # the default suite sees the same examples on every run
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "dst-invariants-slow",
    max_examples=SLOW_EXAMPLES,
    deadline=None,
    derandomize=False,
    database=_DATABASE,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
FAST = settings.get_profile("dst-invariants-fast")
SLOW = settings.get_profile("dst-invariants-slow")

STRATEGY_NAMES = sorted(dst.strategies.available())

#: Strategies that change weights or optimizer state without a topology refresh to count.
NO_TOPOLOGY_REFRESH = {"bp", "l2-init", "shrink-perturb", "weight-clipping", "upgd", "parseval", "spectral-reg", "hare-tortoise",
                       "plasticity-injection", "retrain"}

#: Strategies that need a constant fan-in mask, and the distributions that give one.
FAN_IN_ONLY = {"srigl", "cbp-srigl"}
FAN_IN_DISTRIBUTIONS = ["constant-fan-in"]

#: Strategies whose units must be able to fall silent (snr), and the activations that allow it.
NEEDS_SILENT_UNITS = {"snr"}
SILENT_ACTIVATIONS = ("relu", "tanh", "leaky_relu", "elu", "selu", "gelu", "swish", "linear")

#: Strategies that are their own update rule on plain SGD (no momentum, no optimizer weight decay).
PLAIN_SGD_ONLY = {"upgd"}

#: Small ranges for numeric settings, by field name, chosen so refreshes happen within a few steps.
NUMERIC_SETTINGS: dict[str, st.SearchStrategy] = {
    # cbp and its compositions
    "replacement_rate": st.floats(0.2, 1.0),
    "maturity_threshold": st.integers(0, 3),
    "decay_rate": st.floats(0.0, 0.99),
    "magnitude_every": st.integers(1, 3),
    # set, rigl and relatives
    "drop_fraction": st.floats(0.2, 1.0),
    "update_interval": st.integers(1, 3),
    "end_step": st.sampled_from([0, 6, 10]),  # 0: 0.75 x the horizon given by set_horizon
    "grow_scale": st.floats(0.0, 1.0),
    "gamma_sal": st.floats(0.0, 0.9),  # srigl's neuron ablation
    # redo: a unit scoring at most tau is reset; the lowest score is at most 1, so tau >= 1 always resets
    "period": st.integers(1, 3),
    "tau": st.floats(0.5, 2.0),
    "window": st.integers(1, 3),
    # baselines
    "weight_decay": st.floats(0.0, 0.1),
    "noise_std": st.floats(0.0, 0.05),
    "strength": st.floats(0.0, 0.5),
    # weight-space methods
    "kappa": st.floats(0.5, 3.0),
    "beta_utility": st.floats(0.0, 0.999),
    "sigma": st.floats(0.0, 0.05),
    "scale": st.floats(0.5, 3.0),
    "power": st.integers(1, 3),
    "power_iterations": st.integers(1, 3),
    "beta": st.floats(0.0, 0.99),  # hare-tortoise
    "reset_every": st.integers(1, 3),
    "head_layers": st.just(1),  # plasticity-injection: every drawn net has an encoder before its last layer
    "at_step": st.integers(1, 6),
    # snr
    "percentile": st.floats(0.5, 1.0),
    "threshold": st.floats(1.0, 5.0),
    "update_every": st.integers(1, 2),
    "expansion": st.floats(1.0, 3.0),
    "min_threshold": st.floats(1.0, 3.0),
    "tau_max": st.integers(5, 50),
}

#: Numeric settings every member of a population shares (the strategy refuses members that differ).
SHARED_SETTINGS = {"magnitude_every", "power", "power_iterations", "tau_max", "head_layers", "at_step"}

ACTIVATIONS = ["relu", "tanh", "sigmoid", "leaky_relu", "elu", "selu", "gelu", "swish", "linear", "crelu"]


# -- drawing a case ---------------------------------------------------------------------------


def _fields(name: str) -> list[tuple[dataclasses.Field, Any]]:
    config = dst.strategies.get(name).config
    hints = typing.get_type_hints(config)
    return [(field, hints[field.name]) for field in dataclasses.fields(config)]


@functools.cache
def _needs_masks(name: str) -> bool:
    """Whether the strategy refuses a dense model (connection-level strategies need masked layers)."""
    model = dst.nets.mlp(3, [2], 1, generator=torch.Generator().manual_seed(0))
    try:
        dst.strategies.build(name, model, torch.optim.SGD(model.parameters(), lr=0.1), seed=0)
    except TopologyError:
        return True
    return False


@st.composite
def strategy_settings(draw, name: str) -> dict[str, Any]:
    """Every choice and flag of the strategy's config, numeric settings from NUMERIC_SETTINGS."""
    values: dict[str, Any] = {}
    for field, kind in _fields(name):
        choices = field.metadata.get("choices") if field.metadata else None
        if choices:
            values[field.name] = draw(st.sampled_from(choices))
        elif kind is bool:
            values[field.name] = draw(st.booleans())
        elif field.name in NUMERIC_SETTINGS:
            values[field.name] = draw(NUMERIC_SETTINGS[field.name])
    return values


@st.composite
def member_settings(draw, name: str, members: int) -> tuple[dict[str, Any], ...]:
    """One settings dict per member: the choices and flags shared, each member's numeric settings drawn."""
    first = draw(strategy_settings(name))
    numeric = [key for key in first if key in NUMERIC_SETTINGS and key not in SHARED_SETTINGS]
    others = [{**first, **{key: draw(NUMERIC_SETTINGS[key]) for key in numeric}} for _ in range(members - 1)]
    return (first, *others)


@dataclass(frozen=True)
class Case:
    strategy: str
    members: int  # 1: a plain torch model; 2 or 3: a population MLP
    settings: tuple[dict[str, Any], ...]  # one per member
    network: dict[str, Any]
    density: float
    distribution: str
    dense_first: bool  # sparse nets: keep the first / last layer dense (mixed masked and dense layers)
    dense_last: bool
    optimizer: dict[str, Any]
    optimizer_before_sparsify: bool
    batch: int
    steps: int
    steps_per_task: int
    resume_at: int | None  # steps after which the run is checkpointed and resumed in fresh objects
    seed: int


@st.composite
def networks(draw, activations=tuple(ACTIVATIONS)) -> dict[str, Any]:
    if draw(st.booleans()):
        return dict(
            kind="mlp",
            in_features=draw(st.integers(1, 6)),
            hidden=draw(st.lists(st.integers(1, 6), min_size=1, max_size=2)),
            out_features=draw(st.integers(1, 3)),
            activation=draw(st.sampled_from(activations)),
            norm=draw(st.sampled_from(["none", "layer"])),
        )
    layers = draw(st.integers(1, 2))
    kernels = draw(st.lists(st.integers(2, 3), min_size=layers, max_size=layers))
    size = draw(st.integers(1, 2))  # side of the last feature map
    for kernel in reversed(kernels):
        size = 2 * size + kernel - 1  # smallest image giving that side: conv (valid) then 2x2 max-pool
    return dict(
        kind="convnet",
        in_channels=draw(st.integers(1, 2)),
        image_size=size + draw(st.integers(0, 1)),
        out_features=draw(st.integers(1, 3)),
        channels=draw(st.lists(st.integers(1, 4), min_size=layers, max_size=layers)),
        kernel_sizes=kernels,
        hidden=draw(st.lists(st.integers(1, 5), max_size=1)),
        activation=draw(st.sampled_from(["relu", "tanh", "leaky_relu"])),
    )


@st.composite
def optimizers(draw) -> dict[str, Any]:
    kind = draw(st.sampled_from(["sgd", "adam", "adamw", "elementwise-adam"]))
    weight_decay = draw(st.sampled_from([0.0, 1e-3, 5e-2]))
    if kind == "sgd":
        momentum = draw(st.sampled_from([0.0, 0.9]))
        # step sizes that do not diverge in a dozen steps (a diverged run is NaN everywhere, masked or not)
        lr = draw(st.floats(1e-3, 0.03)) * (0.3 if momentum else 1.0)
        return dict(kind=kind, lr=lr, momentum=momentum, weight_decay=weight_decay,
                    nesterov=momentum > 0 and draw(st.booleans()))
    lr = draw(st.floats(1e-3, 3e-2))
    if kind == "elementwise-adam":
        return dict(kind=kind, lr=lr, weight_decay=weight_decay, decoupled=draw(st.booleans()))
    return dict(kind=kind, lr=lr, weight_decay=weight_decay, amsgrad=draw(st.booleans()))


@st.composite
def plain_sgd(draw) -> dict[str, Any]:
    return dict(kind="sgd", lr=draw(st.floats(1e-3, 0.03)), momentum=0.0, weight_decay=0.0, nesterov=False)


@st.composite
def cases(draw, name: str) -> Case:
    sparse_only = _needs_masks(name)
    density = draw(st.floats(0.1, 0.9) if sparse_only else st.one_of(st.just(1.0), st.floats(0.1, 0.9)))
    steps = draw(st.integers(4, 12))
    network = draw(networks(SILENT_ACTIVATIONS if name in NEEDS_SILENT_UNITS else tuple(ACTIVATIONS)))
    members = draw(st.sampled_from([1, 2, 3])) if network["kind"] == "mlp" else 1
    layers = len(network["hidden"]) + 1 + len(network.get("channels", ()))
    dense_first = draw(st.booleans()) and draw(st.booleans())  # a quarter of the examples
    dense_last = draw(st.booleans()) and draw(st.booleans()) and not (dense_first and layers == 2)
    settings = draw(member_settings(name, members))
    if network["activation"] == "crelu":  # cbp's bias correction needs one mean per unit (refused, tested)
        settings = tuple({**item, "bias_correction": False} if "bias_correction" in item else item for item in settings)
    return Case(
        strategy=name,
        members=members,
        settings=settings,
        network=network,
        density=density,
        # srigl keeps constant fan-ins, so it needs them to start from
        distribution=draw(st.sampled_from(FAN_IN_DISTRIBUTIONS if name in FAN_IN_ONLY else DISTRIBUTIONS)),
        dense_first=dense_first,
        dense_last=dense_last,
        optimizer=draw(plain_sgd() if name in PLAIN_SGD_ONLY else optimizers()),
        optimizer_before_sparsify=draw(st.booleans()),
        batch=draw(st.integers(1, 6)),
        steps=steps,
        # mostly two tasks or more, so task-boundary strategies (head-reset, cosine-per-task) act
        steps_per_task=draw(st.integers(2, steps)),
        resume_at=draw(st.one_of(st.none(), st.integers(1, steps - 1))),
        seed=draw(st.integers(0, 2**16)),
    )


# -- building and training --------------------------------------------------------------------


def _seeds(case: Case, purpose: int) -> list[int]:
    """One distinct seed per member for each purpose (network, masks, strategy, data)."""
    return [case.seed + purpose + 10 * member for member in range(case.members)]


def _build_network(spec: dict[str, Any], seeds: list[int]) -> tuple[nn.Module, tuple[int, ...]]:
    """A plain torch model for one seed, a population MLP (one member per seed) for several."""
    spec = dict(spec)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    generator = generators[0] if len(seeds) == 1 else None
    if spec.pop("kind") == "mlp":
        model = dst.nets.mlp(spec["in_features"], spec["hidden"], spec["out_features"], spec["activation"],
                             norm=spec["norm"], generator=generator, generators=None if generator else generators)
        return model, (spec["in_features"],)
    model = dst.nets.convnet(spec["in_channels"], spec["image_size"], spec["out_features"],
                             channels=spec["channels"], kernel_sizes=spec["kernel_sizes"], hidden=spec["hidden"],
                             activation=spec["activation"], generator=generator)
    return model, (spec["in_channels"], spec["image_size"], spec["image_size"])


def _build_optimizer(spec: dict[str, Any], params) -> torch.optim.Optimizer:
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind == "sgd":
        return torch.optim.SGD(params, **spec)
    if kind == "adam":
        return torch.optim.Adam(params, **spec)
    if kind == "adamw":
        return torch.optim.AdamW(params, **spec)
    return ElementwiseAdam(params, **spec)


def _weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _active(layer: nn.Module) -> tuple[int, ...]:
    """Active connections of each member of ``layer``."""
    mask = getattr(layer, "mask", None)
    active = member_view(layer, torch.ones_like(layer.weight, dtype=torch.bool) if mask is None else mask)
    return tuple(active.flatten(1).sum(1).tolist())


def _masked(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in _weight_layers(model).items() if getattr(m, "mask", None) is not None}


def _leak(layer: nn.Module, values: torch.Tensor) -> str | None:
    """``None`` when ``values`` (shaped like ``layer``'s weight) is zero at every masked position, else
    what leaked, member by member."""
    leaked = member_view(layer, values.detach() * ~layer.mask)
    per_member = (leaked != 0).flatten(1).sum(1)
    if not per_member.any():
        return None
    return (f"non-zero at masked positions of members {per_member.nonzero().flatten().tolist()} "
            f"({per_member.tolist()} per member), max |value| {leaked.abs().max().item():.3g}")


def _check_masked_gradients(model: nn.Module, where: str) -> None:
    for name, layer in _masked(model).items():
        grad = layer.weight.grad
        if grad is None:
            continue
        leak = _leak(layer, grad)
        assert leak is None, f"{where}: {name}.weight.grad {leak}"


def _check_state(model: nn.Module, optimizer: torch.optim.Optimizer, counts: dict[str, tuple[tuple[int, ...], bool]],
                 where: str, ablates: bool = False) -> None:
    """``ablates``: SRigL may empty units and spread their budget B over the A others, floor(B / A) each."""
    layers = _weight_layers(model)
    masked = _masked(model)
    assert sorted(masked) == sorted(n for n, c in counts.items() if c[1]), f"{where}: the set of masked layers changed"
    for name, layer in layers.items():
        if not (ablates and name in masked):
            assert _active(layer) == counts[name][0], (
                f"{where}: {name} has {_active(layer)} active connections per member, started with {counts[name][0]}"
            )
            continue
        fan_ins = row_fan_ins(member_view(layer, layer.mask))
        for member, (budget, row) in enumerate(zip(counts[name][0], fan_ins.tolist())):
            units = [count for count in row if count]
            assert set(units) == {budget // len(units)}, (
                f"{where}: {name} member {member} has fan-ins {row}; a budget of {budget} over {len(units)} units "
                f"gives {budget // len(units)} each"
            )
    for param_name, param in model.named_parameters():
        assert torch.isfinite(param).all(), f"{where}: parameter {param_name} is not finite"
        if param.grad is not None:
            assert torch.isfinite(param.grad).all(), f"{where}: gradient of {param_name} is not finite"
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert torch.isfinite(value).all(), f"{where}: optimizer state {key!r} of {param_name} is not finite"
    for name, layer in masked.items():
        mask = layer.mask
        assert mask.dtype == torch.bool and mask.shape == layer.weight.shape
        leak = _leak(layer, layer.weight)
        assert leak is None, f"{where}: {name}.weight {leak}"
        for key, value in optimizer.state.get(layer.weight, {}).items():
            if isinstance(value, torch.Tensor) and value.shape == layer.weight.shape:
                leak = _leak(layer, value)
                assert leak is None, f"{where}: optimizer state {key!r} of {name}.weight {leak}"


@dataclass
class Outcome:
    strategy: str
    members: int
    sparse: bool
    refreshes: int  # units replaced + connections regrown (over all members) + head resets
    dense_grad_at_masked: bool  # backward produced a non-zero gradient at some masked position
    masked_state: bool  # the optimizer keeps state shaped like a masked weight (checked at masked positions)
    stateful: bool  # the optimizer keeps per-element state (all but plain SGD without momentum)


def _build(case: Case):
    """The case's model (sparsified), optimizer and strategy, with the run's horizon set."""
    model, input_shape = _build_network(case.network, _seeds(case, 0))
    optimizer = None
    if case.optimizer_before_sparsify:  # masked layers share the dense layers' Parameter objects
        optimizer = _build_optimizer(case.optimizer, model.parameters())
    if case.density < 1.0:
        dst.sparsify(model, case.density, case.distribution, dense_first=case.dense_first,
                     dense_last=case.dense_last, seed=_seeds(case, 1))
    if optimizer is None:
        optimizer = _build_optimizer(case.optimizer, model.parameters())
    configs = [dst.strategies.config(case.strategy, **settings) for settings in case.settings]
    strategy = dst.strategies.build(case.strategy, model, optimizer, config=configs, seed=_seeds(case, 2))
    strategy.set_horizon(case.steps, case.steps_per_task)
    return model, optimizer, strategy, input_shape


def run_case(case: Case) -> Outcome:
    """Train ``case`` with the strategy protocol, checking the invariants after every step. With
    ``case.resume_at`` the run is checkpointed after that many steps and continued in fresh objects."""
    torch.manual_seed(case.seed)
    model, optimizer, strategy, input_shape = _build(case)
    population = is_population(model)
    assert population_size(model) == strategy.members == case.members
    counts = {name: (_active(layer), getattr(layer, "mask", None) is not None)
              for name, layer in _weight_layers(model).items()}
    note(f"active connections per layer: {counts}")
    ablates = case.strategy in FAN_IN_ONLY
    _check_state(model, optimizer, counts, "before training", ablates)

    data = torch.Generator().manual_seed(case.seed + 3)
    out_features = case.network["out_features"]
    refreshes = 0
    dense_grad_at_masked = False
    for step in range(case.steps):
        if step == case.resume_at:  # a checkpoint loaded into fresh objects, as a resumed run does
            saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), strategy.state_dict()))
            model, optimizer, strategy, _ = _build(case)
            model.load_state_dict(saved[0])
            optimizer.load_state_dict(saved[1])
            strategy.load_state_dict(saved[2])
            _check_state(model, optimizer, counts, f"resumed after step {step}", ablates)
        if step % case.steps_per_task == 0:
            strategy.on_task_start(step // case.steps_per_task)
        x = torch.randn(case.members, case.batch, *input_shape, generator=data)
        y = torch.randn(case.members, case.batch, out_features, generator=data)
        loss = mse_per_member(forward(model, x, population), y).sum()  # each member its own gradient
        optimizer.zero_grad()
        loss.backward()
        dense_grad_at_masked |= any(
            bool((layer.weight.grad[~layer.mask] != 0).any())
            for layer in _masked(model).values() if layer.weight.grad is not None
        )
        strategy.before_step()
        _check_masked_gradients(model, f"step {step + 1} after before_step")
        optimizer.step()
        stats = strategy.after_step()
        for count in (stats.units_replaced, stats.connections_regrown):
            assert isinstance(count, int) or np.shape(count) == (case.members,), f"step {step + 1}: {stats}"
            assert np.all(np.asarray(count) >= 0), f"step {step + 1}: {stats}"
            refreshes += int(np.sum(count))
        _check_state(model, optimizer, counts, f"step {step + 1} after after_step ({stats})", ablates)
    refreshes += getattr(strategy, "resets", 0)  # head-reset counts its resets
    masked_state = any(
        isinstance(value, torch.Tensor) and value.shape == layer.weight.shape
        for layer in _masked(model).values() for value in optimizer.state.get(layer.weight, {}).values()
    )
    stateful = case.optimizer["kind"] != "sgd" or case.optimizer["momentum"] > 0
    outcome = Outcome(case.strategy, case.members, case.density < 1.0, refreshes, dense_grad_at_masked,
                      masked_state, stateful)
    event(f"{case.strategy}: {'refreshed' if refreshes else 'no refresh'}")
    event(f"network: {case.network['kind']}, {'sparse' if outcome.sparse else 'dense'}, {case.members} member(s)")
    event(f"optimizer: {case.optimizer['kind']}")
    return outcome


def check_invariants(name: str, profile: settings) -> list[Outcome]:
    """Run the property for strategy ``name`` under ``profile``; returns one outcome per example."""
    outcomes: list[Outcome] = []

    @profile
    @given(case=cases(name))
    def masked_positions_stay_zero_and_densities_stay_exact(case: Case) -> None:
        note(repr(case))
        outcomes.append(run_case(case))

    masked_positions_stay_zero_and_densities_stay_exact()
    return outcomes


def assert_not_vacuous(name: str, outcomes: list[Outcome], examples: int, share: float) -> str:
    """The property saw the examples it was asked for; refreshes happened in at least ``share`` of them
    (about 70% refresh with the settings drawn), and masks had work to do."""
    assert len(outcomes) >= examples, f"only {len(outcomes)} of {examples} examples ran"
    refreshed = sum(1 for o in outcomes if o.refreshes)
    sparse = [o for o in outcomes if o.sparse]
    leaked = sum(1 for o in sparse if o.dense_grad_at_masked)
    if name not in NO_TOPOLOGY_REFRESH:
        assert refreshed >= share * len(outcomes), (
            f"{name} refreshed in only {refreshed} of {len(outcomes)} examples: the settings drawn are too "
            "timid for the invariants to be tested across refreshes"
        )
    stateful = sum(1 for o in sparse if o.masked_state)
    if sparse:
        assert leaked >= 0.5 * len(sparse), (
            f"only {leaked} of {len(sparse)} sparse examples had a non-zero dense gradient at a masked "
            "position: the gradient check is vacuous"
        )
    # every optimizer with per-element state had state shaped like each masked weight to check
    assert all(o.masked_state for o in sparse if o.stateful), "an optimizer kept no state for a masked weight"
    populations = sum(1 for o in outcomes if o.members > 1)
    return (f"{name}: {len(outcomes)} examples ({len(sparse)} sparse, {populations} populations), "
            f"{refreshed} with a refresh ({sum(o.refreshes for o in outcomes)} refreshes in all); of the sparse "
            f"ones {leaked} had a dense gradient at masked positions and {stateful} per-element optimizer state "
            "there")


# -- tests ------------------------------------------------------------------------------------


def test_every_numeric_strategy_setting_has_a_small_range():
    """A strategy registered later gets its choices and flags drawn automatically; its numeric settings
    need a small range here (a default such as period=1000 would never refresh in a few steps)."""
    missing = {
        f"{name}.{field.name}"
        for name in STRATEGY_NAMES
        for field, kind in _fields(name)
        if kind in (int, float) and not (field.metadata or {}).get("choices") and field.name not in NUMERIC_SETTINGS
    }
    assert not missing, f"add small ranges to NUMERIC_SETTINGS for {sorted(missing)}"


def test_connection_level_strategies_are_the_ones_drawn_sparse_only():
    # guards _needs_masks: were it always False, set/rigl would never be built (TopologyError)
    assert _needs_masks("rigl") and _needs_masks("set")
    assert not _needs_masks("bp") and not _needs_masks("cbp")


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_masked_weights_grads_and_optimizer_state_stay_zero_and_densities_exact(name):
    outcomes = check_invariants(name, FAST)
    assert_not_vacuous(name, outcomes, FAST.max_examples, share=1 / 3)


@pytest.mark.slow
@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_masked_weights_grads_and_optimizer_state_stay_zero_and_densities_exact_1000_examples(name, capsys):
    outcomes = check_invariants(name, SLOW)
    summary = assert_not_vacuous(name, outcomes, SLOW.max_examples, share=0.4)
    counts = Counter(o.sparse for o in outcomes)
    assert counts[True] > 0, "no sparse example was drawn"
    assert Counter(o.members for o in outcomes).keys() == {1, 2, 3}, "populations of 1, 2 and 3 were not all drawn"
    with capsys.disabled():
        print(f"\n[hypothesis] {summary}")
