"""Continual ImageNet-32: the binary-task stream, the end-of-task test in the loop, the benchmark."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from dst.cli import main
from dst.errors import ConfigError, DataError
from dst.experiment import TIMING_COLUMNS, Experiment
from dst.population import cross_entropy_per_member
from dst.refresh import Backprop
from dst.runner import RunSpec, prepare, run
from dst.streams import ContinualImageNetStream

CLASSES = (0, 1, 2, 3, 5, 8)  # 6 classes, numbered with gaps like a partial copy of the data
TINY_NET = {"channels": (4, 4, 4), "hidden": (8, 8), "probe_size": 100}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """``<class>.npy`` files of 700 random images; pixel (0, 0, 0..2) encodes (class, image index)."""
    directory = tmp_path_factory.mktemp("imagenet32")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        images = rng.integers(0, 256, (700, 3, 32, 32), dtype=np.uint8)
        index = np.arange(700)
        images[:, 0, 0, 0], images[:, 0, 0, 1], images[:, 0, 0, 2] = c, index // 256, index % 256
        np.save(directory / f"{c}.npy", images)
    return directory


def image_ids(x: torch.Tensor, scale: float = 1 / 255) -> list[tuple[int, int]]:
    """(class, index in its file) of each image, read from the marker pixels."""
    marks = torch.round(x[:, 0, 0, :3] / scale).long().tolist()
    return [(c, high * 256 + low) for c, high, low in marks]


def checksum(t: torch.Tensor, scale: float = 1) -> int:
    """An order-sensitive integer checksum of a tensor of integers (times ``scale``)."""
    ints = torch.round(t.double().flatten() * scale).long()
    return int((ints * (torch.arange(ints.numel()) % 1009 + 1)).sum())


def stream(data_dir, seed=0, **kwargs) -> ContinualImageNetStream:
    return ContinualImageNetStream(data_dir, seed, **{"epochs": 2, "batch_size": 100, **kwargs})


def test_class_pairs_are_fixed_by_the_seed_distinct_and_use_every_class_once_per_cycle(data_dir):
    a, b, other = stream(data_dir), stream(data_dir), stream(data_dir, seed=1)
    pairs = [a.task_classes(t) for t in range(12)]
    assert pairs == [b.task_classes(t) for t in range(12)]
    assert pairs != [other.task_classes(t) for t in range(12)]
    assert a.tasks_per_cycle == 3
    assert all(first != second for first, second in pairs)
    cycles = [sorted(c for pair in pairs[k : k + 3] for c in pair) for k in range(0, 12, 3)]
    assert all(cycle == list(CLASSES) for cycle in cycles)
    assert len({tuple(pairs[k : k + 3]) for k in range(0, 12, 3)}) > 1  # a fresh permutation per cycle


def test_each_task_shows_every_training_image_once_per_epoch_in_fresh_orders(data_dir):
    s = stream(data_dir, epochs=3)
    assert s.steps_per_epoch == 12 and s.steps_per_task == 36
    batches = s.batches(0)
    task0 = [next(batches) for _ in range(36)]
    assert {task for *_, task in task0} == {0} and next(batches)[2] == 1
    assert task0[0][0].shape == (1, 100, 3, 32, 32) and task0[0][1].shape == (1, 100)
    first, second = s.task_classes(0)
    expected = sorted((c, i) for c in (first, second) for i in range(600))
    epochs = []
    for e in range(3):
        x = torch.cat([x[0] for x, _, _ in task0[12 * e : 12 * (e + 1)]])
        y = torch.cat([y[0] for _, y, _ in task0[12 * e : 12 * (e + 1)]])
        ids = image_ids(x)
        assert sorted(ids) == expected
        assert y.tolist() == [0 if c == first else 1 for c, _ in ids]  # labels by position in the pair
        epochs.append(ids)
    assert epochs[0] != epochs[1] != epochs[2]


def test_batches_resume_exactly_from_any_step(data_dir):
    s = stream(data_dir)
    full = s.batches(0)
    items = [next(full) for _ in range(60)]
    for start in (17, 24, 40):
        resumed = stream(data_dir).batches(start)
        for step in range(start, 60):
            x, y, task = next(resumed)
            assert task == items[step][2] == step // 24
            assert torch.equal(x, items[step][0]) and torch.equal(y, items[step][1])


def test_probe_and_test_batches_hold_the_tasks_images_with_position_labels(data_dir):
    s = stream(data_dir, probe_size=10)
    first, second = s.task_classes(4)
    x, y = s.probe_batch(4)
    assert x.shape == (1, 10, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.tolist() == [[0, 1] * 5]
    assert image_ids(x[0]) == [(c, i) for i in range(5) for c in (first, second)]
    x, y = s.test_batch(4)
    assert x.shape == (1, 200, 3, 32, 32) and y.shape == (1, 200)
    ids = image_ids(x[0])
    assert sorted(ids) == sorted((c, i) for c in (first, second) for i in range(600, 700))
    assert y[0].tolist() == [0 if c == first else 1 for c, _ in ids]
    raw, _ = stream(data_dir, pixel_scale=1.0).test_batch(4)
    torch.testing.assert_close(raw / 255, x)


def test_stream_has_one_member_and_refuses_more_seeds_with_a_fix(data_dir):
    s = stream(data_dir, seed=7)
    assert s.seeds == (7,) and s.members == 1
    assert stream(data_dir, seed=(7,)).task_classes(5) == s.task_classes(5)
    with pytest.raises(ConfigError, match="one member at a time.*run seeds as separate runs"):
        stream(data_dir, seed=(0, 1))
    with pytest.raises(ConfigError, match="at least one seed"):
        stream(data_dir, seed=())


def test_seed_zero_yields_the_same_data_as_before_populations(data_dir):
    """Checksums recorded from the single-seed stream before batches gained the member dimension."""
    s = stream(data_dir, probe_size=10)
    batches = s.batches(0)
    items = [next(batches) for _ in range(60)]
    x, y = torch.cat([x for x, _, _ in items]), torch.cat([y for _, y, _ in items])
    probe_x, probe_y = s.probe_batch(1)
    test_x, test_y = s.test_batch(1)
    assert [s.task_classes(t) for t in range(4)] == [(1, 3), (0, 5), (8, 2), (0, 5)]
    assert (checksum(x, 255), checksum(y)) == (1185903140826, 1501357)
    assert (checksum(probe_x, 255), checksum(probe_y)) == (1966997470, 30)
    assert (checksum(test_x, 255), checksum(test_y)) == (39529985463, 10100)


def test_missing_or_single_class_directory_is_a_clear_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist.*cannot be downloaded"):
        ContinualImageNetStream(tmp_path / "nowhere")
    np.save(tmp_path / "3.npy", np.zeros((700, 3, 32, 32), np.uint8))
    with pytest.raises(DataError, match="at least 2"):
        ContinualImageNetStream(tmp_path)


class _FixedClass(nn.Module):
    """Always predicts class 0; records the inputs it sees in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3 * 32 * 32, 2)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(torch.tensor([1.0, 0.0]))
        self.evaluated: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self.evaluated.append(x)
        return self.head(x.flatten(1))


def test_loop_tests_each_finished_task_once_on_its_held_out_images(data_dir):
    s = stream(data_dir, epochs=1)  # 12 steps per task
    model = _FixedClass()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    experiment = Experiment(
        s, model, optimizer, Backprop(model, optimizer, seed=0), steps=29, loss_fn=cross_entropy_per_member,
        task_type="classification", bin_size=6, progress=False,
    )
    (rows,) = experiment.run()
    assert list(rows["step"]) == [6, 12, 18, 24, 29]
    tested = rows["test_accuracy"].notna()
    assert list(tested) == [False, True, False, True, False]  # the third task never finished
    assert list(rows.loc[tested, "test_accuracy"]) == [0.5, 0.5]  # 100 of 200 test images are class 0
    assert rows.loc[tested, "test_loss"].notna().all()
    assert len(model.evaluated) == 2 and model.training
    for task, x in enumerate(model.evaluated):
        assert torch.equal(x, s.test_batch(task)[0][0])  # the plain model sees the only member's images


class _WithoutTest:
    """The same stream without test_batch: the loop must not test it."""

    def __init__(self, inner: ContinualImageNetStream) -> None:
        self.inner = inner
        self.steps_per_task, self.device, self.batch_size = inner.steps_per_task, inner.device, inner.batch_size

    def batches(self, start_step: int = 0):
        return self.inner.batches(start_step)


def test_testing_at_task_ends_leaves_training_unchanged(data_dir):
    def losses(wrap):
        spec = RunSpec("continual-imagenet", "cbp", steps=30, bench={"data_dir": str(data_dir), "epochs": 1,
                       "batch_size": 100, "bin_size": 6, "probe": False, **TINY_NET}, device="cpu")
        e = prepare(spec, progress=False)
        stream = _WithoutTest(e.stream) if wrap else e.stream
        (rows,) = Experiment(stream, e.model, e.optimizer, e.strategy, steps=30, loss_fn=e.loss_fn,
                             task_type="classification", bin_size=6, progress=False).run()
        return rows

    tested, untested = losses(False), losses(True)
    assert "test_accuracy" in tested and "test_accuracy" not in untested
    pd.testing.assert_series_equal(tested["loss"], untested["loss"])


def _spec(data_dir, **changes):
    bench = {"data_dir": str(data_dir), "epochs": 1, "batch_size": 50, "tasks": 2, **TINY_NET}
    return RunSpec("continual-imagenet", "bp", bench=bench, device="cpu", **changes)


def test_benchmark_runs_two_tasks_end_to_end_and_summarises_test_accuracy(data_dir, tmp_path):
    rows = run(_spec(data_dir), tmp_path / "r", progress=False)
    assert list(rows["step"]) == [24, 48] and list(rows["task"]) == [0, 1]
    assert rows["test_accuracy"].between(0, 1).all() and rows["effective_rank"].notna().all()
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["performance_metric"] == "test_accuracy"
    assert summary["late_window"] == pytest.approx(rows["test_accuracy"].iloc[-1])


def test_resumed_run_reproduces_the_test_accuracies(data_dir, tmp_path):
    full = run(_spec(data_dir, steps=72), tmp_path / "full", progress=False)
    first = run(_spec(data_dir, steps=48, checkpoint_every=24), tmp_path / "cut", progress=False)
    assert len(first) == 2
    resumed = run(_spec(data_dir, steps=72, checkpoint_every=24), tmp_path / "cut", resume=True, progress=False)
    columns = [c for c in full.columns if c not in TIMING_COLUMNS]
    pd.testing.assert_frame_equal(full[columns], resumed[columns], check_dtype=False)


def test_cli_runs_the_benchmark_and_prints_test_accuracy(data_dir, tmp_path, capsys):
    settings = [f"data_dir={data_dir}", "epochs=1", "batch_size=100", "tasks=2", "channels=4,4,4", "hidden=8,8",
                "probe_size=100"]
    bench = [arg for setting in settings for arg in ("--bench", setting)]
    out = tmp_path / "runs" / "x"
    assert main(["run", "--benchmark", "continual-imagenet", "--strategy", "bp", *bench, "--out", str(out),
                 "--no-progress"]) == 0
    assert "test_accuracy" in capsys.readouterr().out
    assert len(pd.read_csv(out / "metrics.csv")) == 2


def test_benchmark_without_data_dir_says_the_data_cannot_be_downloaded(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("DST_IMAGENET_DIR", raising=False)
    assert main(["run", "--benchmark", "continual-imagenet", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    message = capsys.readouterr().err
    assert "cannot be downloaded" in message and "data_dir" in message and "DST_IMAGENET_DIR" in message
    assert not (tmp_path / "r").exists()


def test_benchmark_reads_the_directory_from_the_environment(data_dir, monkeypatch):
    monkeypatch.setenv("DST_IMAGENET_DIR", str(data_dir))
    spec = RunSpec("continual-imagenet", "bp", steps=12,
                   bench={"epochs": 1, "batch_size": 100, "probe": False, **TINY_NET}, device="cpu")
    rows = run(spec, progress=False)
    assert rows["test_accuracy"].notna().tolist() == [True]
    assert Counter(rows["task"]) == {0: 1}
