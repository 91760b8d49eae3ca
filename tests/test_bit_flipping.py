import pytest
import torch

import dst.streams.bit_flipping
from dst.errors import ConfigError
from dst.streams import BitFlippingStream, LTUTarget


def _take(stream, start, steps):
    batches = stream.batches(start)
    return [next(batches) for _ in range(steps)]


def test_ltu_target_fires_iff_input_exceeds_released_threshold():
    target = LTUTarget(2, 1, 0.7, [torch.Generator().manual_seed(0)])
    target.weight1 = torch.tensor([[[1.0, -1.0]]])
    target.bias1 = torch.tensor([[1.0]])
    # S = (m - sum_j W_ij + b_i) / 2 = (2 - 0 + 1) / 2 = 1.5; tau = 0.7 * (2 + 1) - 1.5 = 0.6
    target.tau = 0.7 * 3 - (2 - target.weight1.sum(2) + target.bias1) / 2
    assert target.tau.item() == pytest.approx(0.6)
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])  # W x + b = 2, 0, 1
    assert target.features(x).flatten().tolist() == [1.0, 0.0, 1.0]


def test_each_members_target_is_its_own_network():
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    target = LTUTarget(20, 100, 0.7, generators)
    x = torch.randint(0, 2, (1, 50, 20), generator=torch.Generator().manual_seed(2)).float()
    for member, seed in enumerate((0, 1)):
        alone = LTUTarget(20, 100, 0.7, [torch.Generator().manual_seed(seed)])
        assert torch.equal(target.weight1[member], alone.weight1[0])
        assert torch.equal(target(x.expand(2, -1, -1))[member], alone(x)[0])
    assert not torch.equal(target.weight1[0], target.weight1[1])


def test_target_weights_are_signs_and_threshold_follows_formula():
    stream = BitFlippingStream(3)
    t = stream.target
    for tensor in (t.weight1, t.bias1, t.weight2, t.bias2):
        assert set(tensor.unique().tolist()) <= {-1.0, 1.0}
    expected = 0.7 * 21 - (20 - t.weight1.sum(2) + t.bias1) / 2
    torch.testing.assert_close(t.tau, expected)
    assert t.weight1.shape == (1, 100, 20) and t.weight2.shape == (1, 1, 100)


def test_flipping_bits_are_fixed_within_a_task_and_random_bits_vary():
    stream = BitFlippingStream(0, change_every=500, probe_size=500)
    x, y = stream.probe_batch(2)
    assert x.shape == (1, 500, 20) and y.shape == (1, 500, 1)
    assert (x[0, :, :15] == x[0, 0, :15]).all()
    assert torch.equal(x[0, 0, :15], stream.flipping_bits(2)[0])
    assert x[0, :, 15:].std(0).min() > 0.3
    torch.testing.assert_close(y, stream.target(x))


def test_flip_one_changes_exactly_one_bit_per_task():
    stream = BitFlippingStream(1, flip="one")
    for task in range(1, 30):
        changed = (stream.flipping_bits(task) != stream.flipping_bits(task - 1)).sum().item()
        assert changed == 1


def test_flip_all_redraws_every_bit():
    stream = BitFlippingStream(1, flip="all")
    changes = [(stream.flipping_bits(t) != stream.flipping_bits(t - 1)).sum().item() for t in range(1, 30)]
    assert max(changes) > 3  # many bits change at once, as in the released default
    assert sum(changes) / len(changes) == pytest.approx(7.5, abs=2.5)  # each bit flips w.p. 1/2


def test_stream_is_deterministic_per_seed_and_differs_across_seeds():
    a, b, c = BitFlippingStream(5), BitFlippingStream(5), BitFlippingStream(6)
    xa, ya = a.probe_batch(3)
    xb, yb = b.probe_batch(3)
    xc, _ = c.probe_batch(3)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, xc)


def test_batches_from_a_start_step_equal_the_tail_of_a_full_iteration():
    stream = BitFlippingStream(0, change_every=100, batch_size=4)
    full = stream.batches(0)
    items = [next(full) for _ in range(60)]
    resumed = BitFlippingStream(0, change_every=100, batch_size=4).batches(37)
    for step in range(37, 60):
        x, y, task = next(resumed)
        assert x.shape == (1, 4, 20) and y.shape == (1, 4, 1)
        assert task == items[step][2] == step // 25
        assert torch.equal(x, items[step][0]) and torch.equal(y, items[step][1])


def test_change_period_must_be_a_multiple_of_the_batch_size():
    with pytest.raises(ConfigError, match="multiple of batch_size"):
        BitFlippingStream(0, change_every=100, batch_size=3)


def test_target_table_holds_each_random_bit_patterns_target():
    stream = BitFlippingStream((0, 7), n_bits=6, n_flipping=3, change_every=8)
    assert stream.uses_table  # 2^3 = 8 patterns, no more than the task's 8 examples
    flipping = stream.flipping_bits(0)
    table = stream.target_table(flipping)
    assert table.shape == (2, 8)
    for p in range(8):  # pattern p sets random bit j to bit j of p
        bits = torch.tensor([(p >> j) & 1 for j in range(3)], dtype=torch.float32)
        x = torch.cat((flipping, bits.expand(2, 3)), dim=1).unsqueeze(1)
        assert torch.equal(table[:, p], stream.target(x)[:, 0, 0])


def test_table_is_used_only_when_it_is_smaller_than_the_task_and_capped():
    assert BitFlippingStream(0).uses_table  # 2^5 = 32 patterns per 10,000-example task
    assert not BitFlippingStream(0, n_flipping=3).uses_table  # 2^17 patterns: more than a task
    assert BitFlippingStream(0, n_flipping=8, change_every=100_000).uses_table  # 2^12 = TABLE_MAX, task ok
    assert not BitFlippingStream(0, n_flipping=7, change_every=100_000).uses_table  # 2^13 > TABLE_MAX
    assert not BitFlippingStream(0, change_every=20).uses_table  # 32 patterns, a 20-example task


@pytest.mark.parametrize("flip", ["one", "all"])
def test_table_and_direct_targets_give_identical_batches_and_probes(flip, monkeypatch):
    make = lambda: BitFlippingStream((4, 0, 9), flip=flip, change_every=100, batch_size=4, probe_size=30)
    table = make()
    monkeypatch.setattr(dst.streams.bit_flipping, "TABLE_MAX", 16)
    direct = make()
    assert table.uses_table and not direct.uses_table
    for (x, y, task), (x1, y1, task1) in zip(_take(table, 10, 60), _take(direct, 10, 60)):  # across 2 changes
        assert task == task1 and torch.equal(x, x1) and torch.equal(y, y1)
    for task in (0, 3):
        for a, b in zip(table.probe_batch(task), direct.probe_batch(task)):
            assert torch.equal(a, b)
