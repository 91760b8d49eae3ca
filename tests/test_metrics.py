"""Plasticity metrics on inputs whose answer is known: spectra built from chosen singular values,
activations with planted dead / dormant / saturated units, and tiny models with hand-set weights.

A single (samples, units) matrix gives 0-d tensors; the batched (S, samples, units) case and the
per-member model metrics are pinned in test_metrics_members.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dst.errors import ConfigError
from dst.masked import MaskedLinear, sparsify
from dst.metrics import (
    conv_samples,
    conv_units,
    dead_fraction,
    dormant_fraction,
    effective_rank,
    gradient_norm,
    inactive_fraction,
    saturated_fraction,
    singular_values,
    spectral_ranks,
    approximate_rank,
    srank,
    stable_rank,
    weight_magnitude,
)


def with_spectrum(s: list[float], rows: int = 8, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """A (rows x len(s)) matrix U diag(s) V^T with random orthonormal U, V: its singular values are s."""
    g = torch.Generator().manual_seed(seed)
    cols = len(s)
    u, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    return (u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T).to(dtype)


def erank_by_hand(s: list[float]) -> float:
    total = sum(s)
    return math.exp(-sum(x / total * math.log(x / total) for x in s if x > 0))


# --- rank metrics -------------------------------------------------------------------------------------


def test_singular_values_are_float64_and_recover_the_planted_spectrum():
    sigma = singular_values(with_spectrum([3.0, 2.0, 1.0, 0.0, 0.0]))
    assert sigma.dtype == torch.float64
    assert torch.allclose(sigma, torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0], dtype=torch.float64), atol=1e-5)


def test_effective_rank_matches_exp_entropy_of_normalised_singular_values():
    s = [3.0, 2.0, 1.0, 0.0, 0.0]
    value = effective_rank(with_spectrum(s, dtype=torch.float64))
    assert value.shape == () and value.dtype == torch.float64
    assert value == pytest.approx(erank_by_hand(s), rel=1e-9)
    assert 2.0 < value < 3.0  # zero singular values contribute nothing


def test_equal_singular_values_give_effective_rank_and_stable_rank_n():
    a = with_spectrum([2.0] * 5, dtype=torch.float64)
    assert effective_rank(a) == pytest.approx(5.0, rel=1e-9)
    assert stable_rank(a) == pytest.approx(5.0, rel=1e-9)
    assert srank(a) == 5


def test_rank_one_matrix_has_every_rank_equal_to_one():
    a = torch.outer(torch.arange(1.0, 7.0), torch.tensor([1.0, -2.0, 0.5]))
    assert effective_rank(a) == pytest.approx(1.0, abs=1e-6)
    assert stable_rank(a) == pytest.approx(1.0, abs=1e-9)
    assert srank(a) == 1


@pytest.mark.parametrize("threshold, expected", [(0.8, 1), (0.9, 2), (0.99, 3), (1.0, 3)])
def test_srank_is_smallest_k_whose_top_singular_values_reach_the_threshold(threshold, expected):
    # cumulative ratios: 10/12 = 0.833, 11/12 = 0.917, 12/12 = 1.0
    value = srank(with_spectrum([10.0, 1.0, 1.0]), threshold)
    assert value.shape == () and value.dtype == torch.int64
    assert value == expected


@pytest.mark.parametrize("threshold, expected", [(0.98, 1), (0.99, 2), (1.0, 3)])
def test_approximate_rank_is_smallest_k_whose_squared_singular_values_reach_the_threshold(threshold, expected):
    # squared: 100, 1, 1 of 102: cumulative 0.98039, 0.99020, 1.0 (srank at 0.99 is 3 on the same matrix)
    value = approximate_rank(with_spectrum([10.0, 1.0, 1.0], dtype=torch.float64), threshold)
    assert value.dtype == torch.int64
    assert value == expected
    assert srank(with_spectrum([10.0, 1.0, 1.0], dtype=torch.float64), 0.99) == 3


def test_spectral_ranks_reports_the_approximate_rank_beside_srank():
    ranks = spectral_ranks(with_spectrum([10.0, 1.0, 1.0], dtype=torch.float64))
    assert (ranks["srank"], ranks["approximate_rank"]) == (3.0, 2.0)
    assert approximate_rank(torch.zeros(4, 3)) == 0


def test_srank_counts_a_ratio_equal_to_the_threshold_up_to_round_off():
    # cumulative ratios 0.5, 0.8, 1.0; for seed 0 the computed second ratio is 0.7999999999999999
    assert srank(with_spectrum([5.0, 3.0, 2.0], dtype=torch.float64), 0.8) == 2
    assert srank(with_spectrum([5.0, 3.0, 2.0], dtype=torch.float64), 0.5) == 1


def test_stable_rank_is_frobenius_over_spectral_norm_squared():
    s = [3.0, 2.0, 1.0, 0.0, 0.0]
    assert stable_rank(with_spectrum(s, dtype=torch.float64)) == pytest.approx((9 + 4 + 1) / 9, rel=1e-9)


def test_zero_matrix_has_zero_ranks():
    zeros = torch.zeros(6, 4)
    assert effective_rank(zeros) == 0.0
    assert srank(zeros) == 0
    assert stable_rank(zeros) == 0.0


def test_conv_maps_become_one_row_per_sample_or_one_column_per_channel():
    conv = torch.randn(2, 5, 3, 4, 4, generator=torch.Generator().manual_seed(1))  # (S, N, C, H, W)
    assert torch.equal(conv_samples(conv)[1, 4], conv[1, 4].reshape(-1))  # member 1, sample 4: its whole map
    units = conv_units(conv)
    assert units.shape == (2, 5 * 16, 3)
    assert torch.equal(units[1, :, 2].sort().values, conv[1, :, 2].reshape(-1).sort().values)  # all of channel 2


@pytest.mark.parametrize("threshold", [0.0, 1.5, -0.1])
def test_srank_rejects_a_threshold_outside_zero_one(threshold):
    with pytest.raises(ConfigError, match="threshold"):
        srank(torch.eye(3), threshold)


@pytest.mark.parametrize("shape", [(5,), (), (0, 4), (2, 3, 0)])
def test_metrics_reject_features_that_are_not_samples_by_units(shape):
    with pytest.raises(ConfigError, match="features"):
        effective_rank(torch.zeros(shape))
    with pytest.raises(ConfigError, match="features"):
        dead_fraction(torch.zeros(shape))


# --- unit metrics -------------------------------------------------------------------------------------


def relu_features(rows: int = 10, units: int = 6, seed: int = 0) -> torch.Tensor:
    """Strictly positive activations: no unit is dead until a test zeroes it."""
    return torch.rand(rows, units, generator=torch.Generator().manual_seed(seed)) + 0.1


def test_dead_fraction_counts_columns_zero_on_every_sample():
    h = relu_features()
    h[:, [1, 4]] = 0.0
    value = dead_fraction(h)
    assert value.shape == () and value.dtype == torch.float64
    assert value == pytest.approx(2 / 6)


def test_unit_zero_on_all_but_one_sample_is_not_dead():
    h = relu_features()
    h[:, 1] = 0.0
    h[:, 3] = 0.0
    h[7, 3] = 0.5
    assert dead_fraction(h) == pytest.approx(1 / 6)


def test_conv_channel_is_dead_only_if_zero_at_every_sample_and_position():
    h = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) + 0.1
    h[:, 2] = 0.0  # dead channel
    h[:, 0] = 0.0
    h[3, 0, 4, 4] = 1.0  # channel 0 fires at one position of one sample: alive
    assert dead_fraction(conv_units(h)) == pytest.approx(1 / 3)


def test_dormant_fraction_uses_redo_score_on_both_sides_of_tau():
    # E|h| per unit = [1.5, 1.5, 0.75, 0.25]; layer mean = 1; scores = E|h| (all exact in binary)
    h = torch.tensor([[1.5, -1.5, 0.5, 0.25], [-1.5, 1.5, -1.0, -0.25]])
    assert dormant_fraction(h, tau=0.24) == 0.0
    assert dormant_fraction(h, tau=0.25) == pytest.approx(1 / 4)  # s_i <= tau: equality is dormant
    assert dormant_fraction(h, tau=0.7) == pytest.approx(1 / 4)
    assert dormant_fraction(h, tau=0.75) == pytest.approx(2 / 4)
    assert dormant_fraction(h, tau=1.4) == pytest.approx(2 / 4)
    assert dormant_fraction(h, tau=1.5) == 1.0
    assert dormant_fraction(h * 7.0, tau=0.25) == pytest.approx(1 / 4)  # the score is scale-free


def test_dormant_fraction_of_a_silent_layer_is_one():
    assert dormant_fraction(torch.zeros(4, 3)) == 1.0


def test_dormant_fraction_averages_conv_channels_over_positions():
    h = torch.ones(2, 4, 3, 3)
    h[:, 3] = 0.05  # E|h_3| = 0.05, layer mean = 3.05 / 4, score ~ 0.066
    assert dormant_fraction(conv_units(h), tau=0.1) == pytest.approx(1 / 4)
    assert dormant_fraction(conv_units(h), tau=0.05) == 0.0


def test_dormant_fraction_rejects_negative_tau():
    with pytest.raises(ConfigError, match="tau"):
        dormant_fraction(torch.ones(2, 2), tau=-0.1)


def test_inactive_fraction_counts_units_active_on_fewer_than_threshold_of_inputs():
    h = torch.zeros(100, 4)
    h[:, 0] = 1.0  # active on 100%
    h[:5, 1] = 1.0  # active on 5%
    h[:1, 2] = 1.0  # active on 1%: not below 1%
    h[:, 3] = -1.0  # never positive
    assert inactive_fraction(h, threshold=0.01) == pytest.approx(1 / 4)
    assert inactive_fraction(h, threshold=0.05) == pytest.approx(2 / 4)
    assert inactive_fraction(h, threshold=0.06) == pytest.approx(3 / 4)


def test_conv_channel_is_active_on_an_input_when_positive_at_any_position():
    h = torch.zeros(10, 2, 4, 4)
    h[:, 0, 0, 0] = 1.0  # one position on every input: active on 100% of inputs
    h[0, 1] = 1.0  # every position of one input: active on 10%
    assert inactive_fraction(h.amax((-2, -1)), threshold=0.5) == pytest.approx(1 / 2)
    assert inactive_fraction(h.amax((-2, -1)), threshold=0.1) == 0.0


def test_saturated_fraction_for_tanh_counts_entries_beyond_099():
    h = torch.tensor([[0.995, -0.999, 0.5, 0.99], [0.0, -0.1, 1.0, -0.98]])
    assert saturated_fraction(h, "tanh") == pytest.approx(3 / 8)
    assert saturated_fraction(h, nn.Tanh()) == pytest.approx(3 / 8)


def test_saturated_fraction_for_sigmoid_counts_entries_outside_001_099():
    h = torch.tensor([[0.005, 0.995, 0.5, 0.01], [0.99, 0.0, 1.0, 0.3]])
    assert saturated_fraction(h, "sigmoid") == pytest.approx(4 / 8)
    assert saturated_fraction(h, nn.Sigmoid()) == pytest.approx(4 / 8)


@pytest.mark.parametrize("activation", ["relu", nn.ReLU()])
def test_saturated_fraction_names_the_supported_activations_for_others(activation):
    with pytest.raises(ConfigError, match="sigmoid.*tanh"):
        saturated_fraction(torch.ones(2, 2), activation)


# --- model metrics ------------------------------------------------------------------------------------


def two_layer_model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0], [2.0, -2.0]]))  # mean |w| = 1.5, 4 entries
        model[2].weight.copy_(torch.tensor([[-6.0, 0.0]]))  # mean |w| = 3.0, 2 entries
        model[0].bias.fill_(100.0)  # biases are not weights
    return model


def lists(result: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    return {name: value.tolist() for name, value in result.items()}


def test_weight_magnitude_reports_each_layer_and_the_mean_over_all_entries():
    result = weight_magnitude(two_layer_model())
    assert all(value.shape == (1,) and value.dtype == torch.float64 for value in result.values())  # S = 1
    assert lists(result) == {"0": [1.5], "2": [3.0], "overall": [12 / 6]}  # exact in binary
    assert float(result["overall"]) != pytest.approx((1.5 + 3.0) / 2)  # not the mean of layer means


def test_weight_magnitude_active_only_averages_over_mask_active_entries(tiny_mlp):
    model = sparsify(tiny_mlp(), 0.5, seed=0)
    dense = weight_magnitude(model)
    active = weight_magnitude(model, active_only=True)
    abs_sum, kept = 0.0, 0
    for name in ["0", "2", "4"]:
        layer = model.get_submodule(name)
        assert layer.mask is not None and not layer.mask.all()
        layer_sum = float(layer.weight.detach().abs().sum())
        layer_kept = int(layer.mask.sum())
        assert float(dense[name]) == pytest.approx(layer_sum / layer.weight.numel())
        assert float(active[name]) == pytest.approx(layer_sum / layer_kept)
        abs_sum, kept = abs_sum + layer_sum, kept + layer_kept
    assert float(active["overall"]) == pytest.approx(abs_sum / kept)
    assert active["overall"] > dense["overall"]


def test_weight_magnitude_active_only_ignores_stored_values_at_masked_positions():
    layer = MaskedLinear(2, 2, mask=torch.tensor([[True, False], [True, True]]))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 40.0], [-2.0, 3.0]]))  # 40 sits at a masked position
    assert float(weight_magnitude(layer)["overall"]) == pytest.approx(46 / 4)  # as stored
    assert float(weight_magnitude(layer, active_only=True)["overall"]) == pytest.approx(6 / 3)


def test_weight_magnitude_needs_a_weight_layer():
    with pytest.raises(ConfigError, match="no nn.Linear or nn.Conv2d"):
        weight_magnitude(nn.Sequential(nn.ReLU()))


def test_gradient_norm_is_the_global_l2_norm_after_backward(tiny_mlp):
    model = tiny_mlp()
    assert gradient_norm(model).tolist() == [0.0]  # no backward yet
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    model(x).pow(2).sum().backward()
    expected = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    value = gradient_norm(model)
    assert value.shape == (1,) and value.dtype == torch.float64
    assert float(value) > 0
    assert float(value) == pytest.approx(expected, rel=1e-6)


def test_gradient_norm_skips_parameters_without_gradient():
    model = two_layer_model()
    model[0].weight.grad = torch.full((2, 2), 3.0)  # sum of squares 36
    model[2].bias.grad = torch.tensor([8.0])  # 64
    assert gradient_norm(model).tolist() == [10.0]


def test_gradient_norm_reads_gradients_given_by_parameter_name_instead_of_grad():
    model = two_layer_model()
    model[0].weight.grad = torch.full((2, 2), 100.0)  # ignored when gradients are given
    given = {"0.bias": torch.tensor([3.0, 0.0]), "2.weight": torch.tensor([[0.0, 4.0]]), "2.bias": None}
    assert gradient_norm(model, given).tolist() == [5.0]


def test_spectral_ranks_from_one_svd_equal_the_separate_metrics():
    features = torch.randn(40, 7, generator=torch.Generator().manual_seed(3)) @ torch.diag(
        torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1, 0.0])
    )
    ranks = spectral_ranks(features, 0.9)
    assert {name: value.item() for name, value in ranks.items()} == {
        "effective_rank": effective_rank(features).item(),
        "srank": srank(features, 0.9).item(),
        "approximate_rank": approximate_rank(features, 0.9).item(),
        "stable_rank": stable_rank(features).item(),
    }
    assert ranks["srank"] < 6
    with pytest.raises(ConfigError, match="threshold"):
        spectral_ranks(features, 1.5)
