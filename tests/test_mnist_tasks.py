"""Permuted and random-label MNIST streams, the probe, and the MNIST benchmarks end to end."""

from pathlib import Path

import pandas as pd
import pytest
import torch

import dst
from dst.population import cross_entropy_per_member
from dst.probe import Probe
from dst.streams import PermutedMNISTStream, RandomLabelMNISTStream, derive_seed

REAL_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def _fake_mnist(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g)


def test_each_permuted_task_applies_one_fixed_permutation_to_scaled_pixels():
    images, labels = _fake_mnist()
    stream = PermutedMNISTStream(images, labels, 3, examples_per_task=100, batch_size=4, probe_size=100)
    x, y = stream.probe_batch(1)
    order, permutation = stream.orders(1)[0], stream.permutations(1)[0]
    expected = images[order].reshape(100, -1).float()[:, permutation] / 255
    assert x.shape == (1, 100, 784) and y.shape == (1, 100)
    torch.testing.assert_close(x[0], expected)
    assert torch.equal(y[0], labels[order])
    assert not torch.equal(stream.permutations(1), stream.permutations(2))
    shorter = PermutedMNISTStream(images, labels, 3, examples_per_task=10)
    assert torch.equal(stream.permutations(1), shorter.permutations(1))
    assert len(set(order.tolist())) == 100  # shown once


def test_permuted_tasks_draw_from_the_released_seed_keys():
    images, labels = _fake_mnist()
    stream = PermutedMNISTStream(images, labels, 3, examples_per_task=50)
    for task in (0, 4):
        permutation = torch.randperm(784, generator=torch.Generator().manual_seed(derive_seed(3, 31, task)))
        order = torch.randperm(300, generator=torch.Generator().manual_seed(derive_seed(3, 32, task)))[:50]
        assert torch.equal(stream.permutations(task), permutation[None])
        assert torch.equal(stream.orders(task), order[None])


def test_permuted_batches_resume_from_any_step_and_probe_is_the_tasks_first_examples():
    images, labels = _fake_mnist()
    stream = PermutedMNISTStream(images, labels, 0, examples_per_task=40, batch_size=4, probe_size=8)
    full = stream.batches(0)
    items = [next(full) for _ in range(35)]
    resumed = stream.batches(23)
    for step in range(23, 35):
        x, y, task = next(resumed)
        assert x.shape == (1, 4, 784) and x.dtype == torch.float32 and y.shape == (1, 4) and y.dtype == torch.long
        assert task == items[step][2] == step // 10
        assert torch.equal(x, items[step][0]) and torch.equal(y, items[step][1])
    probe_x, probe_y = stream.probe_batch(2)
    assert torch.equal(probe_x[:, :4], items[20][0]) and torch.equal(probe_y[:, 4:8], items[21][1])


def test_random_label_tasks_redraw_labels_over_a_fixed_subset_for_several_epochs():
    images, labels = _fake_mnist()
    stream = RandomLabelMNISTStream(images, labels, 1, subset=32, epochs=3, batch_size=8)
    assert stream.steps_per_task == 12
    batches = stream.batches(0)
    first = [next(batches) for _ in range(24)]
    assert {task for *_, task in first} == {0, 1}
    assert first[0][0].shape == (1, 8, 784) and first[0][1].shape == (1, 8)
    epoch_inputs = torch.cat([x[0] for x, _, _ in first[:4]])
    subset_images = stream.images[stream.chosen[0]]
    assert sorted(epoch_inputs.sum(1).tolist()) == sorted(subset_images.sum(1).tolist())  # a full pass
    assert not torch.equal(stream.task_labels(0), stream.task_labels(1))
    resumed = stream.batches(6)
    assert torch.equal(next(resumed)[0], first[6][0])


def test_probe_reports_a_planted_dead_unit_and_weight_magnitudes():
    torch.manual_seed(0)
    net = dst.nets.mlp(5, [4], 2)
    with torch.no_grad():
        net[0].weight[1] = -1.0
        net[0].bias[1] = -1.0
    x, y = torch.rand(1, 50, 5), torch.randint(0, 2, (1, 50))  # member-first: a plain net is a population of one
    (row,) = Probe()(net, dst.Topology.from_model(net), x, y, cross_entropy_per_member)
    assert row["dead_fraction_0"] == 0.25 and row["dead_fraction"] == 0.25
    assert row["effective_rank_0"] <= 3 + 1e-9
    assert row["weight_magnitude_0"] == pytest.approx(net[0].weight.abs().mean().item())
    assert row["gradient_norm"] > 0
    assert net[0].weight.grad is None  # the probe's gradient is computed aside


@pytest.mark.skipif(not REAL_MNIST.exists(), reason="the real MNIST files are not beside the project")
def test_permuted_mnist_runs_online_with_one_probed_row_per_task(tmp_path):
    rows = dst.runner.run(
        dst.RunSpec("permuted-mnist", "cbp", steps=None, seed=0,
                    bench={"data_dir": str(REAL_MNIST), "tasks": 3, "examples_per_task": 200, "batch_size": 2,
                           "hidden": (32,), "probe_size": 100, "lr": 0.01},
                    settings={"replacement_rate": 1e-3, "maturity_threshold": 10}),
        tmp_path / "pm", progress=False,
    )
    assert list(rows["step"]) == [100, 200, 300] and list(rows["task"]) == [0, 1, 2]
    assert rows["accuracy"].between(0, 1).all()
    for column in ("effective_rank", "srank", "dead_fraction", "dormant_fraction", "weight_magnitude",
                   "gradient_norm", "effective_rank_0", "units_replaced"):
        assert rows[column].notna().all(), column
    csv = pd.read_csv(tmp_path / "pm" / "metrics.csv")
    assert "accuracy" in csv.columns and (tmp_path / "pm" / "summary.json").exists()


def test_scaling_the_images_leaves_the_callers_tensor_unchanged():
    images, labels = _fake_mnist()
    images = images.float()  # already float32 on the device: scaling must still work on a copy
    before = images.clone()
    PermutedMNISTStream(images, labels, 0, examples_per_task=40)
    RandomLabelMNISTStream(images, labels, 0, subset=32, batch_size=8)
    assert torch.equal(images, before)
