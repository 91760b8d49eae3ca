"""SRigL: drop and grow within each unit's row, neuron ablation, budgets; checked on hand-computed cases."""

from __future__ import annotations

import pytest
import torch
from conftest import train_step
from torch import nn

import dst
from dst.errors import TopologyError
from dst.masked import MaskedLinear
from dst.srigl import row_fan_ins

# A 6-input layer of 4 hidden units, fan-in 3 (budget 12), feeding a dense output unit.
ACTIVE = [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]
MAGNITUDES = [[0.9, 0.8, 0.7], [0.6, 0.5, 0.05], [0.01, 0.02, 0.03], [0.4, 0.3, 0.2]]
# (unit, input) -> |dense gradient|; the other positions get small distinct values below 0.01
LARGE_GRADIENTS = {(1, 3): 5.0, (3, 0): 4.0, (3, 1): 3.5, (0, 5): 3.0, (1, 4): 2.5, (3, 2): 2.0}


def _hand_layer() -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, mask) of the hand-made layer."""
    mask = torch.zeros(4, 6, dtype=torch.bool)
    weight = torch.zeros(4, 6)
    for unit, (columns, values) in enumerate(zip(ACTIVE, MAGNITUDES)):
        mask[unit, columns] = True
        weight[unit, columns] = torch.tensor(values) * (-1) ** unit  # signs must not matter
    return weight, mask


def _net():
    weight, mask = _hand_layer()
    layer = MaskedLinear(6, 4)
    with torch.no_grad():
        layer.weight.copy_(weight)
    layer.set_mask(mask)
    return nn.Sequential(layer, nn.ReLU(), nn.Linear(4, 1))


def _gradient() -> torch.Tensor:
    grad = (torch.arange(24, dtype=torch.float32).view(4, 6) + 1) * 1e-4  # distinct, all below the large ones
    for (unit, column), value in LARGE_GRADIENTS.items():
        grad[unit, column] = -value if column % 2 else value
    return grad


def _refresh(net, **settings):
    """One SRigL update at drop fraction 0.5 with the hand-made weights and dense gradient."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    layer = net[0]
    layer.weight.grad = _gradient()
    net[2].weight.grad = torch.zeros_like(net[2].weight)
    net[2].bias.grad = torch.zeros_like(net[2].bias)
    layer.bias.grad = torch.zeros_like(layer.bias)
    optimizer.step()  # momentum buffers everywhere, so their reset is visible
    layer.weight.grad = _gradient()
    config = dict(schedule="constant", drop_fraction=0.5, update_interval=1, **settings)
    strategy = dst.strategies.build("srigl", net, optimizer, seed=0, **config)
    with torch.no_grad():  # back to the hand-made weights (the optimizer step moved them)
        layer.weight.copy_(_hand_layer()[0])
    strategy.before_step()
    stats = strategy.after_step()
    return strategy, optimizer, stats


def _columns(mask: torch.Tensor) -> list[list[int]]:
    return [row.nonzero().flatten().tolist() for row in mask]


def test_the_hand_computed_update_ablates_the_unit_without_salient_weights_and_spreads_its_budget():
    # n = 12, n_drop = 6: the kept weights are the 6 largest magnitudes (units 0: 3, 1: 2, 2: 0, 3: 1).
    # Salient: kept, or among the 6 largest |gradients|: units 0, 1, 3 have 4 each, unit 2 none.
    # Threshold max(1, floor(0.3 x 3)) = 1 (at least floor(12 / 6) + 1 = 3 units stay): unit 2 is ablated.
    # k' = floor(12 / 3) = 4: unit 0 grows input 5; unit 1 inputs 3, 4; unit 3 inputs 0, 1, 2.
    net = _net()
    strategy, optimizer, stats = _refresh(net)
    layer = net[0]
    assert _columns(layer.mask) == [[0, 1, 2, 5], [0, 1, 3, 4], [], [0, 1, 2, 3]]
    assert strategy.ablated[0].tolist() == [[False, False, True, False]]
    assert stats.connections_regrown.tolist() == [1 + 2 + 3]
    expected = torch.zeros(4, 6)
    expected[0, :3] = torch.tensor([0.9, 0.8, 0.7])
    expected[1, :2] = -torch.tensor([0.6, 0.5])
    expected[3, 3] = -0.4
    torch.testing.assert_close(layer.weight.detach(), expected)  # grown at 0, dropped zeroed, kept unchanged
    momentum = optimizer.state[layer.weight]["momentum_buffer"]
    changed = torch.zeros(4, 6, dtype=torch.bool)
    changed[0, 5] = changed[1, 2] = changed[1, 3] = changed[1, 4] = True
    changed[2, 3:] = changed[3, :3] = changed[3, 4:] = True
    assert (momentum[changed] == 0).all() and (momentum[~changed & layer.mask] != 0).all()


def test_without_ablation_every_unit_keeps_its_fan_in_and_an_emptied_unit_regrows_by_gradient():
    net = _net()
    strategy, _, stats = _refresh(net, gamma_sal=0.0)
    # k' = 3: unit 0 keeps its 3; unit 1 keeps 2 and grows input 3 (5.0); unit 2 kept nothing and grows the
    # three largest (small) gradients of its row, inputs 3, 4, 5; unit 3 keeps input 3 and grows inputs 0, 1.
    assert _columns(net[0].mask) == [[0, 1, 2], [0, 1, 3], [3, 4, 5], [0, 1, 3]]
    assert not strategy.ablated[0].any()
    assert stats.connections_regrown.tolist() == [0 + 1 + 3 + 2]


def test_the_threshold_is_lowered_so_that_the_budget_fits_the_active_units():
    # Drop fraction 0.9: n_drop = 10, kept: unit 0's 0.9 and 0.8. Salient: those and the 10 largest gradients
    # (the 6 large ones and (3, 5), (3, 4), (3, 3), (2, 5)): counts 3, 2, 1, 6. gamma_sal 1.0 asks for 3, which
    # would leave 2 units; more than floor(12 / 6) = 2 must stay, so the threshold drops to the third largest
    # count, 2: only unit 2 is ablated, and k' = 4.
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    strategy = dst.strategies.build("srigl", net, optimizer, seed=0, schedule="constant", drop_fraction=0.9,
                                    update_interval=1, gamma_sal=1.0)
    net[0].weight.grad = _gradient()
    strategy.before_step()
    strategy.after_step()
    assert strategy.ablated[0].tolist() == [[False, False, True, False]]
    # unit 0 grows input 5 (3.0) and input 4 (its largest small gradient); unit 1 inputs 3, 4 and then 5, 2;
    # unit 3 inputs 0, 1, 2 and then 5
    assert _columns(net[0].mask) == [[0, 1, 4, 5], [2, 3, 4, 5], [], [0, 1, 2, 5]]


def test_the_output_layer_is_never_ablated():
    torch.manual_seed(0)
    net = dst.nets.mlp(6, [8], 3)
    dst.sparsify(net, 0.5, "constant-fan-in", seed=0)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    strategy = dst.strategies.build("srigl", net, optimizer, seed=0, schedule="constant", drop_fraction=0.9,
                                    update_interval=1, gamma_sal=0.9)
    assert strategy.ablates == [True, False]
    before = row_fan_ins(net[2].mask[None])
    for layer in strategy.masked:
        layer.weight.grad = torch.randn_like(layer.weight)
    strategy.before_step()
    strategy.after_step()
    assert torch.equal(row_fan_ins(net[2].mask[None]), before)
    assert not strategy.ablated[1].any()


def test_a_mask_without_constant_fan_in_is_refused_with_the_fix():
    net = dst.nets.mlp(20, [30], 1)
    dst.sparsify(net, 0.3, "erk", seed=0)
    with pytest.raises(TopologyError, match="distribution=constant-fan-in"):
        dst.strategies.build("srigl", net, torch.optim.SGD(net.parameters(), lr=0.1), seed=0)


@pytest.mark.parametrize("name", ["srigl", "cbp-srigl"])
def test_budgets_and_fan_ins_hold_over_many_updates_in_every_member(name):
    seeds = [3, 5, 8]
    net = dst.nets.mlp(12, [16, 16], 2, generators=[torch.Generator().manual_seed(s) for s in seeds])
    dst.sparsify(net, 0.3, "constant-fan-in", seed=seeds)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    strategy = dst.strategies.build(name, net, optimizer, seed=seeds, schedule="constant", update_interval=3,
                                    drop_fraction=0.4, gamma_sal=0.5, **({"replacement_rate": 0.05} if name != "srigl" else {}))
    srigl = strategy if name == "srigl" else strategy.parts[0]
    budgets = [member_counts.copy() for member_counts in srigl.budget]
    g = torch.Generator().manual_seed(0)
    ablated_seen = 0
    for _ in range(60):
        train_step(net, optimizer, strategy, torch.randn(3, 4, 12, generator=g), torch.randn(3, 4, 2, generator=g))
        for layer, budget in zip(srigl.masked, budgets):
            for member, row in enumerate(row_fan_ins(layer.mask).tolist()):
                units = [count for count in row if count]
                assert set(units) == {int(budget[member]) // len(units)}
            assert (layer.weight[~layer.mask] == 0).all()
            for value in optimizer.state[layer.weight].values():
                if value.shape == layer.weight.shape:
                    assert (value[~layer.mask] == 0).all()
        ablated_seen += int(srigl.ablated[0].sum())
    assert ablated_seen > 0, "no unit was ever ablated: the case tests too little"
