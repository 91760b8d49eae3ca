"""Permuted and random-label MNIST streams, the probe, and the MNIST benchmarks end to end."""

from pathlib import Path

import pandas as pd
import pytest
import torch

import dst
from dst.probe import Probe
from dst.streams import PermutedMNISTStream, RandomLabelMNISTStream

REAL_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def _fake_mnist(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g)


def test_each_permuted_task_applies_one_fixed_permutation_to_scaled_pixels():
    images, labels = _fake_mnist()
    stream = PermutedMNISTStream(images, labels, seed=3, examples_per_task=100, batch_size=4)
    x, y = stream.task_examples(1)
    order, permutation = stream.order(1), stream.permutation(1)
    expected = images[order].reshape(100, -1).float()[:, permutation] / 255
    torch.testing.assert_close(x, expected)
    assert torch.equal(y, labels[order])
    assert not torch.equal(stream.permutation(1), stream.permutation(2))
    assert torch.equal(stream.permutation(1), PermutedMNISTStream(images, labels, seed=3, examples_per_task=10).permutation(1))
    assert len(set(order.tolist())) == 100  # shown once


def test_permuted_batches_resume_from_any_step_and_probe_is_the_tasks_first_examples():
    images, labels = _fake_mnist()
    stream = PermutedMNISTStream(images, labels, seed=0, examples_per_task=40, batch_size=4, probe_size=8)
    full = stream.batches(0)
    items = [next(full) for _ in range(35)]
    resumed = stream.batches(23)
    for step in range(23, 35):
        x, y, task = next(resumed)
        assert task == items[step][2] == step // 10
        assert torch.equal(x, items[step][0]) and torch.equal(y, items[step][1])
    probe_x, probe_y = stream.probe_batch(2)
    assert torch.equal(probe_x[:4], items[20][0]) and torch.equal(probe_y[4:8], items[21][1])


def test_random_label_tasks_redraw_labels_over_a_fixed_subset_for_several_epochs():
    images, labels = _fake_mnist()
    stream = RandomLabelMNISTStream(images, labels, seed=1, subset=32, epochs=3, batch_size=8)
    assert stream.steps_per_task == 12
    batches = stream.batches(0)
    first = [next(batches) for _ in range(24)]
    assert {task for *_, task in first} == {0, 1}
    epoch_inputs = torch.cat([x for x, _, _ in first[:4]])
    assert sorted(epoch_inputs.sum(1).tolist()) == sorted(stream.images.sum(1).tolist())  # a full pass
    assert not torch.equal(stream.task_labels(0), stream.task_labels(1))
    resumed = stream.batches(6)
    assert torch.equal(next(resumed)[0], first[6][0])


def test_probe_reports_a_planted_dead_unit_and_weight_magnitudes():
    torch.manual_seed(0)
    net = dst.nets.mlp(5, [4], 2)
    with torch.no_grad():
        net[0].weight[1] = -1.0
        net[0].bias[1] = -1.0
    x = torch.rand(50, 5)
    row = Probe()(net, dst.Topology.from_model(net), x, torch.randint(0, 2, (50,)), torch.nn.functional.cross_entropy)
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
