"""Sparse backends: the condensed layer computes what the masked layer computes, and runs equal masked runs."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import assert_same_state, train_step

import dst
from dst.backends import Backends, CSRLinear
from dst.backends import condensed as C
from dst.errors import ConfigError
from dst.experiment import TIMING_COLUMNS
from dst.optim_state import replace_parameter
from dst.runner import RunSpec, prepare, run

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _fan_in_mask(members: int, units: int, n_in: int, fan_ins: list[list[int]], seed: int = 0) -> torch.Tensor:
    """A (members, units, n_in) mask with fan_ins[s][u] random inputs in unit u of member s."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(members, units, n_in, dtype=torch.bool)
    for s in range(members):
        for u in range(units):
            mask[s, u, torch.randperm(n_in, generator=g)[: fan_ins[s][u]]] = True
    return mask


def test_the_layout_lists_each_units_inputs_in_order_and_pads_with_distinct_inactive_ones():
    mask = torch.tensor([[[0, 1, 0, 1, 0], [1, 0, 0, 0, 1], [0, 0, 0, 0, 0]]], dtype=torch.bool)
    index, valid = C.condensed_layout(mask)
    assert index[0, 0].tolist() == [1, 3] and index[0, 1].tolist() == [0, 4]
    assert valid[0, :2].all() and not valid[0, 2].any()  # the empty (ablated) unit is all padding
    assert len(set(index[0, 2].tolist())) == 2
    full = torch.tensor([[[1, 1, 0], [0, 1, 1]]], dtype=torch.bool)
    index, valid = C.condensed_layout(full)
    assert valid is None and index.tolist() == [[[0, 1], [1, 2]]]


def test_an_unstructured_mask_is_refused_with_the_fix():
    mask = torch.tensor([[[1, 1, 0], [0, 1, 0]]], dtype=torch.bool)
    with pytest.raises(ConfigError, match="constant fan-in.*distribution='constant-fan-in'.*backend=masked"):
        C.condensed_layout(mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 5])
def test_forward_and_both_gradients_equal_the_masked_dense_products(device, batch):
    # member 0: every unit 3 inputs; member 1: 4 inputs, one unit empty (padding in both)
    fan_ins = [[3, 3, 3, 3], [4, 0, 4, 4]]
    mask = _fan_in_mask(2, 4, 7, fan_ins).to(device)
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(2, 4, 7, generator=g).to(device)) * mask
    bias = torch.randn(2, 4, generator=g).to(device)
    x = torch.randn(2, batch, 7, generator=g).to(device)
    delta = torch.randn(2, batch, 4, generator=g).to(device)
    index, valid = C.condensed_layout(mask)
    flat = (index + torch.arange(2, device=device).view(-1, 1, 1) * 7).view(-1)
    values = weight.gather(-1, index)
    gathered = C.gather_inputs(x, flat, 4, index.shape[-1])
    expected = x @ weight.transpose(1, 2) + bias[:, None]  # the masked dense layer
    torch.testing.assert_close(C.forward(gathered, values, bias), expected)
    dense_grad = delta.transpose(1, 2) @ x  # dL/dW = delta^T x, read at the active positions
    torch.testing.assert_close(C.weight_grad(delta, gathered, valid.to(weight.dtype)), dense_grad.gather(-1, index) * valid)
    torch.testing.assert_close(C.input_grad(delta, values, flat, 7), delta @ weight)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 5])
def test_the_csr_layer_computes_the_masked_dense_products(device, batch):
    g = torch.Generator().manual_seed(2)
    mask = torch.zeros(3, 6, 9, dtype=torch.bool)
    for s in range(3):  # 11 active weights per member, unevenly over the units (one unit empty)
        mask[s].view(-1)[torch.randperm(45, generator=g)[:11] + 9] = True
    layer = dst.masked.MaskedLinear(9, 6, members=3, generators=[torch.Generator().manual_seed(s) for s in range(3)])
    layer.set_mask(mask)
    layer.to(device)
    record = CSRLinear(layer)
    record.condense(None)
    weight, bias = layer.weight.detach(), layer.bias.detach()
    x = torch.randn(3, batch, 9, generator=g).to(device)
    delta = torch.randn(3, batch, 6, generator=g).to(device)
    h, saved = record.forward(x, bias)
    torch.testing.assert_close(h, x @ weight.transpose(1, 2) + bias[:, None])
    dense_grad = (delta.transpose(1, 2) @ x).reshape(3, -1)
    torch.testing.assert_close(record.weight_grad(delta, saved), dense_grad.gather(1, record.positions))
    torch.testing.assert_close(record.input_grad(delta), delta @ weight)


def test_csr_refuses_members_with_different_counts():
    layer = dst.masked.MaskedLinear(4, 2, members=2)
    layer.set_mask(torch.tensor([[[1, 1, 0, 0], [0, 0, 0, 1]], [[1, 0, 0, 0], [0, 0, 0, 1]]], dtype=torch.bool))
    with pytest.raises(ConfigError, match="same number of active weights in every member"):
        CSRLinear(layer)


def _layers(members: int = 2, density: float = 0.3, seed: int = 0):
    seeds = list(range(seed, seed + members))
    net = dst.nets.mlp(12, [16, 16], 3, generators=[torch.Generator().manual_seed(s) for s in seeds])
    return dst.sparsify(net, density, "constant-fan-in", seed=seeds), seeds


def test_condensing_moves_weights_and_optimizer_state_and_expanding_restores_them_exactly():
    net, seeds = _layers()
    optimizer = dst.build_optimizer("elementwise-adam", net.parameters(), 1e-2)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    dst.mask_gradients(net)
    optimizer.step()
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    state = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in net.named_parameters()}
    strategy = dst.strategies.build("bp", net, optimizer, seed=seeds)
    backends = Backends(net, optimizer, strategy, "condensed")
    backends.prepare(1)
    layer = net[0]
    record = layer.compact
    assert record.active and all(p is not layer.weight for group in optimizer.param_groups for p in group["params"])
    assert layer.weight not in optimizer.state and optimizer.state[record.values]["exp_avg"].shape == record.values.shape
    torch.testing.assert_close(record.values, before["0.weight"].gather(-1, record.index))  # (S, units, k)
    backends.expand()
    for name, p in net.named_parameters():
        assert torch.equal(p, before[name]), name
        for key, value in state[name].items():
            assert torch.equal(optimizer.state[p][key], value), (name, key)


def test_replacing_a_parameter_the_optimizer_does_not_hold_is_refused():
    net, _ = _layers()
    optimizer = dst.build_optimizer("sgd", net.parameters(), 0.1)
    with pytest.raises(ValueError, match="does not hold"):
        replace_parameter(optimizer, torch.zeros(1), torch.zeros(1), lambda t: t)


def test_auto_condenses_only_large_sparse_constant_fan_in_layers_of_strategies_that_name_their_refresh_steps():
    def build(strategy, distribution="constant-fan-in", hidden=(400, 400), density=0.1, batch=1):
        net = dst.nets.mlp(300, list(hidden), 10, generators=[torch.Generator().manual_seed(0)])
        dst.sparsify(net, density, distribution, seed=[0])
        optimizer = dst.build_optimizer("sgd", net.parameters(), 0.1)
        strategy = dst.strategies.build(strategy, net, optimizer, seed=[0])
        return net, Backends(net, optimizer, strategy, "auto", batch)

    net, backends = build("bp")
    assert [record.layer for record in backends.layers] == [net[0], net[2]]  # 300x400, 400x400; not 400x10
    assert {record.name for record in backends.layers} == {"condensed"}
    assert build("srigl")[1] and not build("cbp")[1]  # cbp may touch weights at every step
    net, backends = build("rigl", distribution="erk")  # unstructured at 0.1: CSR
    assert {record.name for record in backends.layers} == {"csr"} and len(backends.layers) == 2
    assert not build("bp", distribution="erk", density=0.4)[1]  # unstructured above CSR's break-even: masked
    assert not build("bp", hidden=(40, 40))[1]  # small layers: per-call overhead favours masked
    assert not build("bp", density=0.5)[1]
    assert not build("bp", batch=16)[1]  # minibatches: the dense matrix-matrix product wins
    with pytest.raises(ConfigError, match="unknown backend 'fast'"):
        Backends(net, None, None, "fast")


def test_forcing_condensed_on_an_unstructured_mask_names_the_fix(tmp_path):
    spec = RunSpec("bit-flipping", "bp", steps=100, seed=0, device="cpu",
                   bench={"density": 0.3, "hidden": (16,), "backend": "condensed"})
    with pytest.raises(ConfigError, match="constant fan-in"):
        run(spec, progress=False)


def _no_timing(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=list(TIMING_COLUMNS)).reset_index(drop=True)


CASES = {  # strategy -> settings, bench (constant fan-in: condensed; ERK: csr)
    "bp": ({}, {"optimizer": "sgd", "momentum": 0.9}),
    "rigl": ({"update_interval": 40}, {"optimizer": "sgd", "momentum": 0.5, "distribution": "erk"}),
    "set": ({"update_interval": 40}, {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-2, "distribution": "erk"}),
    "srigl": ({"update_interval": 40, "gamma_sal": 0.5}, {"optimizer": "elementwise-adam", "lr": 1e-3}),
    "cbp-srigl": ({"update_interval": 40, "replacement_rate": 0.01, "maturity_threshold": 20}, {"optimizer": "adam", "lr": 1e-3}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_compact_run_equals_the_masked_run(tmp_path, name):
    settings, bench = CASES[name]
    bench = {"density": 0.3, "distribution": "constant-fan-in", "hidden": (32, 32), "bin_size": 250,
             "change_every": 500, "probe_size": 100, **bench}
    frames = {}
    compact = "csr" if bench.get("distribution") == "erk" else "condensed"
    for backend in ("masked", compact):
        spec = RunSpec("bit-flipping", name, steps=1000, seeds=(3, 5), device="cpu", settings=settings,
                       bench={**bench, "backend": backend})
        experiment = prepare(spec, tmp_path / backend, progress=False)
        frames[backend] = experiment.run()
        if backend == compact:
            assert experiment.backends and not experiment.backends.layers[0].active  # masked again after run
        frames[backend + " model"] = experiment.model.state_dict()
    frames["condensed"], frames["condensed model"] = frames[compact], frames[compact + " model"]
    for masked, condensed in zip(frames["masked"], frames["condensed"]):
        if name != "bp":
            assert masked["connections_regrown"].sum() > 0
        assert list(masked["connections_regrown"]) == list(condensed["connections_regrown"])
        pd.testing.assert_frame_equal(_no_timing(masked), _no_timing(condensed), rtol=1e-4, atol=1e-5)
    for key, value in frames["masked model"].items():
        if value.dtype == torch.bool:
            assert torch.equal(value, frames["condensed model"][key]), key
        else:
            torch.testing.assert_close(value, frames["condensed model"][key], rtol=1e-4, atol=1e-5)


def test_a_condensed_run_resumes_to_exactly_the_uninterrupted_run(tmp_path):
    bench = {"density": 0.3, "distribution": "constant-fan-in", "hidden": (32, 32), "bin_size": 250,
             "change_every": 500, "probe_size": 100, "backend": "condensed"}
    spec = RunSpec("bit-flipping", "srigl", steps=1000, seed=2, device="cpu", bench=bench,
                   settings={"update_interval": 30}, checkpoint_every=500)
    full = prepare(spec, tmp_path / "full", progress=False)
    (full_rows,) = full.run()
    cut = prepare(spec, tmp_path / "cut", progress=False)
    after_step = cut.strategy.after_step

    def crash():  # Ctrl-C after step 700, between checkpoints, in the middle of a condensed stretch
        stats = after_step()
        if cut.strategy.step == 700:
            raise KeyboardInterrupt
        return stats

    cut.strategy.after_step = crash
    with pytest.raises(KeyboardInterrupt):
        cut.run()
    resumed = prepare(spec, tmp_path / "cut", progress=False)
    (resumed_rows,) = resumed.run(resume=True)
    pd.testing.assert_frame_equal(_no_timing(full_rows), _no_timing(resumed_rows))
    assert_same_state(full.model.state_dict(), resumed.model.state_dict(), "model")
    assert_same_state(full.optimizer.state_dict(), resumed.optimizer.state_dict(), "optimizer")


def test_quiet_steps_never_convert_and_each_refresh_converts_once(monkeypatch):
    net, seeds = _layers(members=1)
    optimizer = dst.build_optimizer("sgd", net.parameters(), 0.1)
    strategy = dst.strategies.build("srigl", net, optimizer, seed=seeds, update_interval=10, schedule="constant")
    backends = Backends(net, optimizer, strategy, "condensed")
    expansions = []
    expand = C.CondensedLinear.expand
    monkeypatch.setattr(C.CondensedLinear, "expand", lambda self, opt: (expansions.append(strategy.step), expand(self, opt)))
    g = torch.Generator().manual_seed(0)
    for _ in range(35):
        backends.prepare(strategy.step + 1)
        train_step(net, optimizer, strategy, torch.randn(1, 2, 12, generator=g), torch.randn(1, 2, 3, generator=g))
    assert sorted(set(expansions)) == [9, 19, 29]  # before steps 10, 20, 30: one conversion per layer each
