"""The class-incremental CIFAR-100 stream on generated files in the release's format."""

from __future__ import annotations

import itertools
import json

import pandas as pd
import pytest
import torch

from dst.errors import ConfigError, DataError
from dst.runner import RunSpec, prepare, run
from dst.streams.cifar100 import load_cifar100
from dst.streams.incremental_cifar import MEAN, STD, ClassIncrementalCIFARStream, augment
from test_cifar import make_cifar100

# 6 training images per class (1 for validation, 5 to train), 2 test images; batches of 5
SMALL = dict(epochs_per_increment=2, batch_size=5, validation_per_class=1, probe_size=7)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = make_cifar100(tmp_path_factory.mktemp("cifar"), train_per_class=6, test_per_class=2)
    return load_cifar100(folder), load_cifar100(folder, train=False)


def _stream(data, seed=0, **changes):
    return ClassIncrementalCIFARStream(*data, seed, **{**SMALL, **changes})


def test_tasks_add_five_classes_and_epochs_grow_with_them(data):
    stream = _stream(data)
    assert stream.tasks == 20 and [stream.active_outputs(k) for k in (0, 1, 19)] == [5, 10, 100]
    # task k: 2 epochs of 5 (k + 1) classes x 5 images / 5 per batch = 10 (k + 1) steps
    lengths = [2 * 5 * (k + 1) * 5 // 5 for k in range(20)]
    assert [stream.task_start(k) for k in range(21)] == [sum(lengths[:k]) for k in range(21)]
    assert stream.total_steps == 2100 and stream.task_of(0) == 0 and stream.task_of(9) == 0
    assert stream.task_of(10) == 1 and stream.task_of(2099) == 19
    # evaluations at every epoch end: steps 5, 10 (task 0), then 20, 30 (task 1), ...
    assert [stream.next_evaluation(s) for s in (0, 4, 5, 9, 10, 19, 20)] == [5, 5, 10, 10, 20, 20, 30]


def test_each_epoch_shows_every_training_image_of_the_seen_classes_once_and_no_validation_image(data):
    stream = _stream(data, augmentation=False)
    (images, labels), _ = data
    order = stream.class_order
    validation = set(stream._validation.reshape(-1).tolist())
    batches = list(itertools.islice(stream.batches(0), 30))  # task 0 (10 steps) and task 1 (20 steps)
    for first, last, classes in ((0, 5, 5), (5, 10, 5), (10, 20, 10), (20, 30, 10)):
        shown = torch.cat([y[0] for _, y, _ in batches[first:last]])
        assert torch.equal(torch.sort(shown).values, torch.arange(classes).repeat_interleave(5))
    x0, y0, task0 = batches[0]
    assert x0.shape == (1, 5, 3, 32, 32) and task0 == 0 and batches[10][2] == 1
    # label j is class order[j]; pixels are normalised with the authors' statistics
    index = stream.order(0, 0)[:5]
    assert torch.equal(order[y0[0]], labels[index])
    expected = (images[index].float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(x0[0], expected, atol=1e-5)
    assert not validation & set(torch.cat([stream.order(1, e) for e in range(2)]).tolist())


def test_validation_is_the_first_images_of_each_class_and_held_out_sets_cover_the_seen_classes(data):
    stream = _stream(data)
    (_, labels), (_, test_labels) = data
    sets = stream.evaluation_sets(1)
    x, y = sets["test"]
    assert x.shape == (1, 20, 3, 32, 32) and torch.equal(torch.sort(y[0]).values, torch.arange(10).repeat_interleave(2))
    xv, yv = sets["validation"]
    assert xv.shape[1] == 10 and torch.equal(torch.sort(yv[0]).values, torch.arange(10))
    first_of_each = {int(c): int((labels == c).nonzero()[0]) for c in stream.class_order[:10]}
    assert sorted(stream._validation[:10].reshape(-1).tolist()) == sorted(first_of_each.values())


def test_a_resumed_stream_gives_the_same_augmented_batches_and_seeds_differ(data):
    stream = _stream(data)
    whole = list(itertools.islice(stream.batches(0), 40))
    resumed = list(itertools.islice(_stream(data).batches(17), 23))
    for (x, y, task), (xr, yr, taskr) in zip(whole[17:], resumed):
        assert torch.equal(x, xr) and torch.equal(y, yr) and task == taskr
    other = _stream(data, seed=1)
    assert not torch.equal(other.class_order, stream.class_order)
    assert not torch.equal(next(other.batches(0))[0], whole[0][0])


def test_augmentation_flips_crops_from_the_reflect_padded_image_and_rotates_counter_clockwise():
    x = torch.arange(2 * 36, dtype=torch.float32).reshape(2, 1, 6, 6)
    centre = 2 / 5 + 0.01  # offset 2 of 0..4: the uncropped image
    same = augment(x, torch.tensor([[0.9, centre, centre, 0.0]] * 2), padding=2)
    assert torch.equal(same, x)
    flipped = augment(x, torch.tensor([[0.1, centre, centre, 0.0]] * 2), padding=2)
    assert torch.equal(flipped, x.flip(-1))
    corner = augment(x, torch.tensor([[0.9, 0.0, 0.0, 0.0]] * 2), padding=2)
    assert corner[0, 0, 0].tolist() == [14, 13, 12, 13, 14, 15]  # row -2 reflects row 2; column -2 column 2
    quarter = augment(x, torch.tensor([[0.9, centre, centre, 1.0]] * 2), padding=2, degrees=90)
    assert torch.equal(quarter, torch.rot90(x, 1, (-2, -1)))


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(batch_size=7), ConfigError, "batch_size 7 must divide"),
        (dict(validation_per_class=6), DataError, "leave none to train on"),
        (dict(classes_per_increment=7), ConfigError, "whole increments of 7"),
        (dict(), ConfigError, "one member at a time"),
    ],
)
def test_bad_settings_are_clear_errors(data, change, error, message):
    seeds = (0, 1) if not change else 0
    with pytest.raises(error, match=message):
        ClassIncrementalCIFARStream(*data, seeds, **{**SMALL, **change})


def test_a_training_set_with_unequal_classes_is_refused(data):
    (images, labels), test = data
    with pytest.raises(DataError, match="the same number in each"):
        ClassIncrementalCIFARStream((images[:-1], labels[:-1]), test, 0, **SMALL)


# -- the benchmark, end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    return make_cifar100(tmp_path_factory.mktemp("cifar-run"), train_per_class=6, test_per_class=2)


def _spec(cifar_dir, strategy="bp", **bench):
    return RunSpec("class-incremental-cifar100", strategy, device="cpu",
                   bench={"preset": "smoke", "data_dir": str(cifar_dir), **bench})


def test_learning_rate_follows_the_authors_schedule_within_each_task(data):
    stream = _stream(data, epochs_per_increment=200)  # 5 steps per epoch in task 0
    factors = [stream.learning_rate_factor(5 * epoch) for epoch in (0, 59, 60, 119, 120, 159, 160, 199, 200)]
    assert factors == pytest.approx([1, 1, 0.2, 0.2, 0.04, 0.04, 0.008, 0.008, 1])


def test_the_smoke_preset_runs_one_row_per_epoch_with_test_and_validation_accuracy(cifar_dir, tmp_path):
    rows = run(_spec(cifar_dir, "cbp"), tmp_path / "run", progress=False)
    # task 0: 2 epochs of 5 steps; task 1: 2 epochs of 10 steps
    assert rows["step"].tolist() == [5, 10, 20, 30] and rows["task"].tolist() == [0, 0, 1, 1]
    for column in ("test_accuracy", "validation_accuracy", "test_loss", "validation_loss"):
        assert rows[column].notna().all(), column
    assert rows["effective_rank"].notna().tolist() == [True, False, True, False]  # probed at each task start
    assert rows["test_accuracy"].between(0, 1).all()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["performance_metric"] == "selected_test_accuracy"
    best = [rows[rows["task"] == task].sort_values("validation_accuracy", ascending=False, kind="stable").iloc[0]
            for task in (0, 1)]
    assert summary["late_window"] == pytest.approx(best[1]["test_accuracy"])
    assert summary["selected_test_accuracy_per_task"] == pytest.approx([b["test_accuracy"] for b in best])


class _Recorder:
    """Wraps a strategy: the model state at every task start, and after every row."""

    def __init__(self, experiment):
        self.starts, self.started, self.after_rows = [], [], []
        strategy, model = experiment.strategy, experiment.model
        inner = strategy.on_task_start

        def on_task_start(task):
            self.starts.append((task, {k: v.clone() for k, v in model.state_dict().items()}))
            inner(task)
            self.started.append({k: v.clone() for k, v in model.state_dict().items()})

        strategy.on_task_start = on_task_start
        experiment.on_row = lambda rows: self.after_rows.append(
            (rows[0], {k: v.clone() for k, v in model.state_dict().items()}))


@pytest.mark.parametrize("early_stopping", [True, False])
def test_early_stopping_goes_on_from_the_tasks_best_validation_epoch(cifar_dir, early_stopping):
    experiment = prepare(_spec(cifar_dir, early_stopping=early_stopping), progress=False)
    recorder = _Recorder(experiment)
    experiment.run()
    (row0, state0), (row1, state1) = recorder.after_rows[:2]  # the two epochs of task 0
    best = state0 if row0["validation_accuracy"] >= row1["validation_accuracy"] and early_stopping else state1
    task, start = recorder.starts[1]
    assert task == 1
    for key, value in start.items():
        if key.endswith("outputs.count"):
            continue
        assert torch.equal(value, best[key]), key
    if row0["validation_accuracy"] == row1["validation_accuracy"] and early_stopping:
        assert best is state0  # the first of equals is kept


@pytest.mark.parametrize("strategy", ["cbp", "retrain"])
def test_a_resumed_run_writes_the_rows_of_an_uninterrupted_one(cifar_dir, tmp_path, strategy):
    whole = run(_spec(cifar_dir, strategy), tmp_path / "whole", progress=False)
    spec = RunSpec(**{**_spec(cifar_dir, strategy).__dict__, "checkpoint_every": 5, "steps": 10})
    run(spec, tmp_path / "part", progress=False)  # stops at the end of task 0, checkpoint there
    resumed = run(RunSpec(**{**spec.__dict__, "steps": 30}), tmp_path / "part", resume=True, progress=False)
    # the run was cut at the task boundary: the resumed one starts task 1 (early stopping, retraining) itself
    timing = [c for c in whole if "seconds" in c]
    pd.testing.assert_frame_equal(whole.drop(columns=timing), resumed.drop(columns=timing))


def test_retrain_starts_each_task_from_a_fresh_network(cifar_dir):
    from dst.resnet import ResNet18
    from dst.streams.base import derive_seed

    experiment = prepare(_spec(cifar_dir, "retrain"), progress=False)
    recorder = _Recorder(experiment)
    experiment.run()
    assert experiment.strategy.retrains == 1
    fresh = ResNet18(100, 4, generator=torch.Generator().manual_seed(derive_seed(experiment.strategy.seeds[0], 61, 1)))
    after = recorder.started[1]  # right after the strategy's task-1 start
    for key, value in fresh.state_dict().items():
        if not key.endswith("outputs.count"):
            assert torch.equal(after[key], value), key
    assert not torch.equal(recorder.starts[1][1]["stem.0.weight"], after["stem.0.weight"])
    momentum = experiment.optimizer.state[experiment.model.fc.weight]["momentum_buffer"]
    assert momentum.abs().max() > 0  # trained on after the reset


def test_missing_data_and_bad_protocols_are_clear_errors(tmp_path, monkeypatch):
    from dst import benchmarks

    monkeypatch.delenv("DST_CIFAR100_DIR", raising=False)
    with pytest.raises(DataError, match="cifar-100-python.tar.gz"):
        prepare(RunSpec("class-incremental-cifar100", "bp", device="cpu", bench={"preset": "smoke"}), progress=False)
    with pytest.raises(ConfigError, match="multiple of epochs_per_increment"):
        benchmarks.build("class-incremental-cifar100", epochs=4000, epochs_per_increment=300)
    with pytest.raises(ConfigError, match="must be the 20 increments"):
        benchmarks.build("class-incremental-cifar100", epochs=2000)
