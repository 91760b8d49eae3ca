"""Run summaries: windows after the first task, plasticity loss positive when lost, overlapping windows."""

import math

import pandas as pd
import pytest

from dst.summary import after_first_task, summarize


def _rows(tasks, values, metric="accuracy"):
    return pd.DataFrame({"step": [100 * (i + 1) for i in range(len(tasks))], "task": tasks, metric: values,
                         "units_replaced": 0, "connections_regrown": 0, "seconds": 1.0})


def test_the_first_task_is_left_out_of_both_windows_and_a_drop_in_accuracy_is_a_positive_loss():
    # task 0 learns from scratch (0.50); then 0.95 falling to 0.85 over 20 tasks
    values = [0.50] + [0.95 - 0.1 * i / 19 for i in range(20)]
    summary = summarize(_rows(list(range(21)), values))
    # 20 rows after the first task, windows of ceil(2.0) = 2 rows
    early, late = (values[1] + values[2]) / 2, (values[-2] + values[-1]) / 2
    assert summary["early_window"] == pytest.approx(early)
    assert summary["late_window"] == pytest.approx(late)
    assert summary["plasticity_loss"] == pytest.approx(early - late) and summary["plasticity_loss"] > 0
    assert summary["windows_overlap"] is False


def test_a_rising_loss_is_a_positive_plasticity_loss():
    values = [3.0] + [0.5 + 0.05 * i for i in range(10)]
    summary = summarize(_rows(list(range(11)), values, metric="loss"))
    assert summary["performance_metric"] == "loss"
    assert summary["plasticity_loss"] == pytest.approx(values[-1] - values[1])  # windows of one row


def test_bins_longer_than_tasks_drop_only_the_bin_that_holds_the_first_task():
    rows = _rows([1, 3, 5, 7], [9.0, 1.0, 2.0, 3.0], metric="loss")
    assert list(after_first_task(rows)["task"]) == [3, 5, 7]
    assert summarize(rows)["early_window"] == 1.0


def test_a_run_of_one_task_keeps_every_row():
    rows = _rows([0, 0, 0], [1.0, 2.0, 3.0], metric="loss")
    assert len(after_first_task(rows)) == 3
    assert summarize(rows)["late_window"] == 3.0


def test_overlapping_windows_give_no_plasticity_loss_and_say_so():
    summary = summarize(_rows([0], [0.7]))
    assert summary["windows_overlap"] is True and math.isnan(summary["plasticity_loss"])
    assert summary["late_window"] == summary["early_window"] == 0.7
