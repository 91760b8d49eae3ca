"""The comparisons CLI end to end on tiny bit-flipping runs: outputs, numbers, intervals, resume, failed runs
and bad input."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import dst.benchmarks
import dst.runner
import dst.strategies
from comparisons import api as comparisons_api
from comparisons import bootstrap_interval
from comparisons import cli as comparisons_cli
from comparisons import execute as comparisons_execute
from comparisons import plots as comparisons_plots
from comparisons import report as comparisons_report
from comparisons import tables as comparisons_tables
from comparisons.cli import main

TINY = ["--bench", "bin_size=200", "--bench", "change_every=200", "--bench", "hidden=8",
        "--bench", "probe_size=50", "--steps", "600", "--no-progress"]
GRID = ["--strategies", "bp,cbp", "--grid", "cbp.replacement_rate=1e-4,1e-2", "--seeds", "2", "--workers", "1", *TINY]
LABELS = ["bp (dense)", "cbp replacement_rate=0.0001 (dense)", "cbp replacement_rate=0.01 (dense)"]
ROOT = Path(__file__).resolve().parents[1]


def _no_report(out, fmt="csv"):
    """Stands in for write_report where a test is about runs, not plots (plots cost seconds)."""
    return {"summary": pd.DataFrame(), "states": pd.DataFrame(columns=["arm", "seed", "state", "reason"]), "paths": []}


@pytest.fixture(scope="module")
def grid_out(tmp_path_factory) -> Path:
    """One small grid comparison (3 arms x 2 seeds), run once through the CLI entry function."""
    out = tmp_path_factory.mktemp("grid") / "out"
    assert main([*GRID, "--out", str(out)]) == 0
    return out


@pytest.fixture
def calls(monkeypatch) -> list[tuple[dst.runner.RunSpec, Path, bool]]:
    """Every dst.runner.run call made in this process (spec, out_dir, resume); the runs still happen."""
    made: list[tuple[dst.runner.RunSpec, Path, bool]] = []
    real = dst.runner.run

    def spy(spec, out_dir=None, *, resume=False, progress=True, member_dirs=None):
        made.append((spec, Path(out_dir), resume))
        return real(spec, out_dir, resume=resume, progress=progress, member_dirs=member_dirs)

    monkeypatch.setattr(dst.runner, "run", spy)
    monkeypatch.setattr(comparisons_api, "write_report", _no_report)
    return made


def _copy(grid_out: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(grid_out, out)
    return out


def test_grid_expands_into_labelled_arms_with_one_folder_per_seed(grid_out):
    record = json.loads((grid_out / "comparison.json").read_text())
    assert [arm["label"] for arm in record["arms"]] == LABELS
    assert record["arms"][2]["resolved_settings"]["replacement_rate"] == 0.01
    summaries = sorted(grid_out.glob("runs/*/seed-*/summary.json"))
    assert len(summaries) == 6
    assert (grid_out / "runs" / "cbp_replacement_rate=0.01_dense" / "seed-1" / "metrics.csv").exists()
    summary = pd.read_csv(grid_out / "summary.csv")
    assert summary["arm"].tolist() == LABELS
    assert summary["n"].tolist() == [2, 2, 2]
    assert set(summary["performance_metric"]) == {"loss"}


def test_summary_means_and_bounds_are_those_of_the_runs(grid_out):
    """Each arm's ``_mean`` is the mean of its runs' numbers (the unit metrics recomputed from metrics.csv, the
    windowed ones from summary.json: dst's windows are tested in test_summary.py), and with two seeds the
    95% percentile bootstrap interval is exactly [smaller, larger]: the resampled means are a, (a+b)/2 and b
    with probabilities 1/4, 1/2, 1/4, so the 2.5% and 97.5% quantiles are a and b."""
    summary = pd.read_csv(grid_out / "summary.csv").set_index("arm")
    assert not [c for c in summary.columns if c.endswith("_ci95")]
    folders = ["bp_dense", "cbp_replacement_rate=0.0001_dense", "cbp_replacement_rate=0.01_dense"]
    for label, folder in zip(LABELS, folders):
        per_run = {"late_window": [], "plasticity_loss": [], "final_effective_rank": [],
                   "final_dead_fraction": [], "seconds_per_step": []}
        for seed in (0, 1):
            run = grid_out / "runs" / folder / f"seed-{seed}"
            rows = pd.read_csv(run / "metrics.csv")
            written = json.loads((run / "summary.json").read_text())
            per_run["late_window"].append(written["late_window"])
            per_run["plasticity_loss"].append(written["plasticity_loss"])
            per_run["final_effective_rank"].append(rows["effective_rank"].dropna().iloc[-1])
            per_run["final_dead_fraction"].append(rows["dead_fraction"].dropna().iloc[-1])
            per_run["seconds_per_step"].append(rows["seconds"].sum() / rows["step"].iloc[-1])
        for metric, values in per_run.items():
            row = summary.loc[label]
            assert row[f"{metric}_mean"] == pytest.approx(np.mean(values), rel=1e-9, abs=1e-12), metric
            assert row[f"{metric}_low"] == pytest.approx(min(values), rel=1e-9, abs=1e-12), metric
            assert row[f"{metric}_high"] == pytest.approx(max(values), rel=1e-9, abs=1e-12), metric
        assert not summary.loc[label, "windows_overlap"]


# -- intervals: 95% percentile bootstrap over seeds of the mean ------------------------------------------------


def _exact_percentile_interval(values: list[float]) -> tuple[float, float]:
    """The 2.5% and 97.5% quantiles of the exact bootstrap distribution of the mean: every one of the n^n
    equally likely resamples enumerated (the smallest mean whose cumulative probability reaches q)."""
    means = np.sort([np.mean(draw) for draw in itertools.product(values, repeat=len(values))])
    cumulative = np.arange(1, len(means) + 1) / len(means)
    return tuple(float(means[np.searchsorted(cumulative, q)]) for q in (0.025, 0.975))


def test_bootstrap_interval_of_equal_seeds_is_the_mean_itself_and_undefined_for_one_run():
    assert bootstrap_interval([0.1, 0.1, 0.1]) == (0.1, 0.1, 0.1, 3)
    assert bootstrap_interval([1.0] * 30) == (1.0, 1.0, 1.0, 30)  # a dead fraction of 1 stays 1, not 1 + 1e-16
    mean, low, high, n = bootstrap_interval([5.0, float("nan")])
    assert (mean, n) == (5.0, 1) and math.isnan(low) and math.isnan(high)
    assert all(math.isnan(v) for v in bootstrap_interval([])[:3])


@pytest.mark.parametrize("values, bounds", [([0.0, 0.0, 1.0], (0.0, 1.0)),  # a fraction: within [0, 1]
                                            ([0.0, 0.0, 5.0], (0.0, 5.0)),  # a loss: never below 0
                                            ([1.0, 2.0, 4.0, 8.0], (1.5, 6.5))])
def test_bootstrap_interval_equals_exact_enumeration_of_all_resamples(values, bounds):
    assert _exact_percentile_interval(values) == pytest.approx(bounds)  # worked out by hand, too
    mean, low, high, n = bootstrap_interval(values)
    assert (mean, n) == (pytest.approx(np.mean(values)), len(values))
    assert (low, high) == pytest.approx(bounds, abs=1e-12)
    half = stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values))  # Student-t
    if min(values) == 0.0:  # where a Student-t interval leaves the range, this one does not
        assert mean - half < 0.0 <= low


def test_per_task_table_averages_each_run_over_its_task_then_the_runs():
    rows = [  # arm, seed, task, value, finished
        ("a", 0, 0, 1.0, True), ("a", 0, 0, 3.0, True), ("a", 0, 1, 10.0, True),
        ("a", 1, 0, 4.0, True), ("a", 1, 1, 20.0, True), ("a", 1, 1, float("nan"), True),
        ("a", 2, 0, 100.0, False),  # unfinished: left out
        ("b", 0, 0, 7.0, True),
    ]
    runs = pd.DataFrame(rows, columns=["arm", "seed", "task", "episodic_return", "finished"])
    table = comparisons_tables.per_task_table(runs, "episodic_return")
    assert list(zip(table["arm"], table["task"], table["n"])) == [("a", 0, 2), ("a", 1, 2), ("b", 0, 1)]
    assert table["mean"].tolist() == [3.0, 15.0, 7.0]  # a, task 0: runs' means 2 and 4; task 1: 10 and 20
    assert (table["low"][:2] >= [2.0, 10.0]).all() and (table["high"][:2] <= [4.0, 20.0]).all()
    assert math.isnan(table["low"][2])  # one run: no interval
    assert comparisons_tables.per_task_table(runs.drop(columns="task"), "episodic_return").empty


def test_bootstrap_interval_agrees_with_scipy_percentile_bootstrap():
    values = np.random.default_rng(3).exponential(size=12)  # skewed, as losses across seeds often are
    scipy_ci = stats.bootstrap((values,), np.mean, n_resamples=10_000, method="percentile",
                               rng=np.random.default_rng(7)).confidence_interval
    _, low, high, _ = bootstrap_interval(values)
    tolerance = 0.15 * stats.sem(values)  # Monte Carlo error of either: ~0.03 standard errors; Student t and
    # BCa intervals differ from the percentile one by 0.2-0.5 here
    assert low == pytest.approx(scipy_ci.low, abs=tolerance)
    assert high == pytest.approx(scipy_ci.high, abs=tolerance)
    assert (high - values.mean()) > (values.mean() - low)  # asymmetric, like the data


def test_bootstrap_interval_is_reproducible_from_its_seed():
    values = list(np.random.default_rng(5).random(12))  # many distinct resample means: any redraw moves the bounds
    first = bootstrap_interval(values)
    comparisons_tables._resample_weights.cache_clear()  # drawn afresh: the same only because seeded
    assert bootstrap_interval(values) == first
    assert bootstrap_interval(values[::-1]) == first  # and independent of the seeds' order


def _skewed_runs() -> pd.DataFrame:
    """One arm, 3 seeds, 5 bins: per bin a loss of 0, 0.01 and 5 and a dead fraction of 0, 0 and 1, where a
    Student-t band (mean ± 4.3 s / sqrt(3)) reaches below 0 and above 1."""
    rows = [{"arm": "a", "seed": seed, "step": 100 * (b + 1), "loss": (0.0, 0.01, 5.0)[seed],
             "dead_fraction": (0.0, 0.0, 1.0)[seed]} for seed in range(3) for b in range(5)]
    return pd.DataFrame(rows)


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures the plot functions draw, kept open instead of written to disk."""
    kept = []

    def keep(fig, path):
        kept.append(fig)
        return Path(path)

    monkeypatch.setattr(comparisons_plots, "_save", keep)
    yield kept
    for fig in kept:
        comparisons_plots.plt.close(fig)


def _band_limits(ax) -> tuple[float, float]:
    """Lowest and highest y of the axes' filled bands."""
    ys = np.concatenate([path.vertices[:, 1] for band in ax.collections for path in band.get_paths()])
    return float(ys.min()), float(ys.max())


def test_plot_bands_stay_inside_the_range_of_a_loss_and_a_fraction(figures, tmp_path):
    runs, arms = _skewed_runs(), [{"label": "a", "resolved_bench": {}}]
    comparisons_plots.plot_performance(runs, arms, "loss", tmp_path / "performance.png")
    comparisons_plots.plot_metrics(runs, arms, tmp_path / "metrics.png")
    loss_axes, metric_axes = figures[0].axes[0], figures[1].axes[0]
    assert metric_axes.get_title() == "dead_fraction"
    assert _band_limits(loss_axes) == pytest.approx((0.0, 5.0))  # the bootstrap bounds, min and max for n = 3
    assert _band_limits(metric_axes) == pytest.approx((0.0, 1.0))
    assert "bootstrap" in loss_axes.get_title()


def test_grid_error_bars_are_the_asymmetric_bootstrap_bounds(figures, tmp_path):
    arms = [{"label": f"cbp r={rate}", "strategy": "cbp", "grid": {"replacement_rate": rate}, "resolved_bench": {}}
            for rate in (1e-4, 1e-2)]
    summary = pd.DataFrame({"arm": [a["label"] for a in arms], "late_window_mean": [0.2, 0.5],
                            "late_window_low": [0.0, 0.45], "late_window_high": [0.9, 0.6]})
    comparisons_plots.plot_grids(summary, arms, tmp_path, "loss")
    (ax,) = figures[0].axes
    segments = np.concatenate([bars.get_segments() for bars in ax.collections])
    spans = sorted((float(s[:, 1].min()), float(s[:, 1].max())) for s in segments)
    np.testing.assert_allclose(spans, [(0.0, 0.9), (0.45, 0.6)], atol=1e-12)  # from low to high, not mean ± x


@pytest.mark.parametrize("name", ["performance.png", "metrics.png", "grid_cbp_replacement_rate.png"])
def test_plots_are_valid_png_images(grid_out, name):
    import matplotlib.image

    path = grid_out / name
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 1024
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.01  # not a blank canvas


def test_combined_table_has_every_row_and_the_setting_columns(grid_out):
    runs = pd.read_csv(grid_out / "runs.csv")
    assert {"arm", "strategy", "seed", "finished", "settings.replacement_rate", "settings.maturity_threshold",
            "bench.hidden", "bench.lr", "bench.density", "loss", "effective_rank"} <= set(runs.columns)
    total = sum(len(pd.read_csv(p)) for p in grid_out.glob("runs/*/seed-*/metrics.csv"))
    assert len(runs) == total == 6 * 3
    cbp = runs[runs["strategy"] == "cbp"]
    assert sorted(cbp["settings.replacement_rate"].unique()) == [1e-4, 1e-2]
    assert runs[runs["strategy"] == "bp"]["settings.replacement_rate"].isna().all()
    assert (runs["bench.hidden"].astype(str) == "8").all()


def test_report_names_arms_directions_and_embeds_plots(grid_out):
    report = (grid_out / "report.md").read_text()
    assert report.startswith("# Comparison")
    assert "--grid cbp.replacement_rate=1e-4,1e-2" in report
    for label in LABELS:
        assert f"| {label} |" in report
    for name in ("performance.png", "metrics.png", "grid_cbp_replacement_rate.png"):
        assert f"]({name})" in report
    assert "late-window loss** (lower is better)" in report


PLASTICITY_HEADER = "plasticity loss (lower is better: >0 = lost)"


def test_report_says_which_interval_and_that_plasticity_loss_is_lower_is_better(grid_out):
    report = (grid_out / "report.md").read_text()
    assert "95% percentile bootstrap over seeds, 10,000 resamples, seed 0" in report
    assert f"| {PLASTICITY_HEADER} |" in report
    assert "**plasticity loss** (lower is better)" in report and "late minus early loss" in report
    summary = pd.read_csv(grid_out / "summary.csv")
    cells = comparisons_report.display_frame(summary)
    assert PLASTICITY_HEADER in cells.columns
    row = summary.iloc[0]
    assert cells["late-window loss"][0] == (f"{comparisons_report._number(row['late_window_mean'])} "
                                            f"[{comparisons_report._number(row['late_window_low'])}, "
                                            f"{comparisons_report._number(row['late_window_high'])}]")
    assert "| n/a (one window) |" not in report and "Plasticity loss is n/a" not in report
    for metric in ("loss", "accuracy", "test_accuracy"):  # whatever the performance measure
        assert comparisons_tables.better_direction("plasticity_loss", metric) == "lower"


def test_rerun_skips_finished_runs_and_redoes_only_a_deleted_one(grid_out, tmp_path, calls):
    out = _copy(grid_out, tmp_path)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed-*/summary.json")}
    assert main([*GRID, "--out", str(out)]) == 0
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    shutil.rmtree(out / "runs" / "cbp_replacement_rate=0.01_dense" / "seed-1")
    assert main([*GRID, "--out", str(out)]) == 0
    assert [(c[0].strategy, c[0].settings["replacement_rate"], c[0].seed, c[2]) for c in calls] == [
        ("cbp", 0.01, 1, False)]
    assert (out / "runs" / "cbp_replacement_rate=0.01_dense" / "seed-1" / "summary.json").exists()


def test_interrupted_run_resumes_from_its_checkpoint(grid_out, tmp_path, calls):
    out = _copy(grid_out, tmp_path)
    run = out / "runs" / "bp_dense" / "seed-0"
    full = pd.read_csv(run / "metrics.csv")
    shutil.rmtree(run)
    spec = dst.runner.RunSpec("bit-flipping", "bp", steps=400, seed=0, device="auto", checkpoint_every=200,
                              bench={"bin_size": "200", "change_every": "200", "hidden": "8", "probe_size": "50"})
    dst.runner.run(spec, run, progress=False)  # as if stopped after 2 of 3 bins
    (run / "summary.json").unlink()
    calls.clear()
    assert main([*GRID, "--out", str(out)]) == 0
    assert [(c[1], c[2]) for c in calls] == [(run, True)]
    resumed = pd.read_csv(run / "metrics.csv")
    assert len(resumed) == 3
    pd.testing.assert_frame_equal(resumed.drop(columns=["seconds", "seconds_per_step", "probe_seconds"]),
                                  full.drop(columns=["seconds", "seconds_per_step", "probe_seconds"]))


def test_half_written_run_without_checkpoint_starts_afresh(grid_out, tmp_path, calls):
    out = _copy(grid_out, tmp_path)
    run = out / "runs" / "bp_dense" / "seed-1"
    for name in ("summary.json", "checkpoint.pt"):  # a member of a population has no checkpoint of its own
        (run / name).unlink(missing_ok=True)
    (run / "metrics.csv").write_text("step,task,loss\n200,0,9.9\n")
    assert main([*GRID, "--out", str(out)]) == 0
    assert [(c[1], c[2]) for c in calls] == [(run, False)]
    assert len(pd.read_csv(run / "metrics.csv")) == 3


def test_a_failing_run_is_reported_and_the_others_finish(tmp_path, monkeypatch, capsys):
    real = dst.runner.run

    def flaky(spec, out_dir=None, *, resume=False, progress=True):
        if spec.strategy == "cbp":
            raise FloatingPointError("the loss became nan")
        return real(spec, out_dir, resume=resume, progress=progress)

    monkeypatch.setattr(dst.runner, "run", flaky)
    monkeypatch.setattr(comparisons_api, "write_report", _no_report)
    out = tmp_path / "out"
    assert main(["--strategies", "bp,cbp", "--seeds", "1", "--workers", "1", *TINY, "--out", str(out)]) == 1
    assert "failed: cbp (dense) seed 0: FloatingPointError: the loss became nan" in capsys.readouterr().err
    assert (out / "runs" / "bp_dense" / "seed-0" / "summary.json").exists()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--strategies", "bp,cbp", "--set", "cbp.replacement_ratee=1e-5"],
         ["unknown setting 'replacement_ratee'", "accepted: replacement_rate"]),
        (["--strategies", "bp,nosuch"], ["unknown strategy 'nosuch'", "available: ", "cbp"]),
        (["--benchmark", "nosuch", "--strategies", "bp"], ["unknown benchmark 'nosuch'", "bit-flipping"]),
        (["--strategies", "cbp", "--grid", "cbp.replacement_rate=1e-4,2"],
         ["--grid cbp.replacement_rate=2", "out of range", "[0.0, 1.0]"]),
        (["--strategies", "bp,cbp", "--set", "rigl.drop_fraction=0.1"], ["'rigl'", "not compared here", "bp, cbp"]),
        (["--strategies", "bp,rigl", "--bench", "density=1"], ["'rigl'", "needs a sparse net"]),
        (["--strategies", "bp", "--bench", "hiden=8"], ["unknown setting 'hiden'", "accepted:"]),
        (["--strategies", "bp", "--seeds", "two"], ["--seeds 'two'"]),
        (["--strategies", "bp", "--seeds", "5-2"], ["--seeds '5-2'", "A <= B"]),
        (["--strategies", "bp,cbp", "--arms", "cbp,redo*"], ["--arms 'redo*' matches no arm", "bp, cbp"]),
        (["--preset", "quick", "--strategies", "bp"], ["--preset fixes"]),
    ],
)
def test_bad_input_is_one_clear_line_and_starts_no_run(argv, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dst.runner, "run", lambda *a, **k: pytest.fail("a run started despite bad input"))
    out = tmp_path / "out"
    assert main([*argv, "--steps", "600", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err
    assert not (out / "runs").exists()


def test_arms_and_a_seed_range_run_part_of_a_preset_in_the_whole_presets_folders(tmp_path, monkeypatch):
    """--arms keeps the matching arms of each comparison of a preset and drops a comparison left with none
    (here the MNIST one, which is then not even prepared); the part lands in the folder the whole preset
    would use, so that one report covers the parts."""
    ran = []

    def fake_run(item, **kwargs):
        ran.append((item.comparison.name, [arm.arm.name for arm in item.arms], item.out, item.comparison.seeds))
        return {"outcomes": [], "summary": pd.DataFrame(), "paths": [],
                "states": pd.DataFrame(columns=["arm", "seed", "state", "reason"])}

    monkeypatch.setattr(comparisons_cli, "run_prepared", fake_run)
    monkeypatch.setattr(comparisons_cli, "format_summary", lambda *a: "")
    out = tmp_path / "budget"
    argv = ["--preset", "sparse-budget", "--no-progress", "--out", str(out)]
    assert main([*argv, "--arms", "b1x-dense-*,b5x-erk5x-cbp", "--seeds", "3-5"]) == 0
    assert main([*argv, "--arms", "b25x-fanin10x-srigl", "--seeds", "0,7"]) == 0
    assert ran == [
        ("sparse-budget-bit-flipping", ["b1x-dense-bp", "b1x-dense-cbp", "b5x-erk5x-cbp"],
         out / "sparse-budget-bit-flipping", (3, 4, 5)),
        ("sparse-budget-bit-flipping", ["b25x-fanin10x-srigl"], out / "sparse-budget-bit-flipping", (0, 7)),
    ]


def _count_calls(monkeypatch, name: str, counts: dict[str, int]) -> None:
    """Count the calls of ``comparisons.execute.<name>`` from wherever a comparisons module calls it."""
    real = getattr(comparisons_execute, name)
    counts[name] = 0

    def counted(*args, **kwargs):
        counts[name] += 1
        return real(*args, **kwargs)

    for module in (comparisons_execute, comparisons_api, comparisons_cli):
        if getattr(module, name, None) is real:
            monkeypatch.setattr(module, name, counted)


def test_each_arm_is_resolved_once_before_the_runs(tmp_path, monkeypatch):
    """Planning 3 arms builds each arm's benchmark exactly once, and plans and records the comparison once,
    before the first run (dst.runner.run builds its own, not counted: it is replaced here)."""
    real_build, built = dst.benchmarks.build, []

    def counting_build(name, **overrides):
        built.append(overrides.get("hidden"))  # each arm has its own width: which arm's benchmark this is
        return real_build(name, **overrides)

    at_runs = []
    monkeypatch.setattr(dst.benchmarks, "build", counting_build)
    monkeypatch.setattr(dst.runner, "run", lambda *a, **k: at_runs.append(list(built)) or pd.DataFrame())
    monkeypatch.setattr(comparisons_api, "write_report", _no_report)
    counts: dict[str, int] = {}
    for name in ("plan", "record_comparison"):
        _count_calls(monkeypatch, name, counts)
    argv = ["--strategies", "bp,cbp,set", "--seeds", "2", "--workers", "1", *TINY, "--bench", "bp.hidden=6",
            "--bench", "cbp.hidden=7", "--bench", "set.hidden=9", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert at_runs == [["6", "7", "9"]] * 3  # 3 arms (a population of 2 seeds each), each arm's benchmark built once before them
    assert counts == {"plan": 1, "record_comparison": 1}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--strategies", "bp,cbp", "--grid", "cbp.maturity_threshold=10,20", "--set", "cbp.replacement_rate=2"],
         "arm 'cbp maturity_threshold=10' (strategy cbp): strategy 'cbp': replacement_rate=2.0 is out of range; "
         "it must be [0.0, 1.0]"),
        (["--preset", "sparse-bit-flipping", "--bench", "static-sparse.lr=0"],
         "arm 'static-sparse' (strategy bp): benchmark 'bit-flipping': lr=0.0 is out of range; it must be (0.0, inf]"),
    ],
)
def test_a_bad_setting_names_its_arm_before_any_run_folder_exists(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dst.runner, "run", lambda *a, **k: pytest.fail("a run started despite a bad setting"))
    out = tmp_path / "out"
    assert main([*argv, "--steps", "600", "--seeds", "1", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not out.exists()


@pytest.mark.parametrize("verbose", [False, True])
def test_an_unexpected_error_in_resolving_an_arm_is_shown_not_skipped(verbose, tmp_path, monkeypatch, capsys):
    """A strategy whose constructor raises something dst does not raise on purpose (here a RuntimeError)
    stops the comparison before any run, naming the arm and the exception and asking for a bug report;
    -v adds the traceback."""
    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(dst.strategies.get("cbp").cls, "__init__", broken)
    monkeypatch.setattr(dst.runner, "run", lambda *a, **k: pytest.fail("a run started despite the error"))
    out = tmp_path / "out"
    assert main(["--strategies", "bp,cbp", *TINY, *(["-v"] if verbose else []), "--out", str(out)]) == 3
    err = capsys.readouterr().err
    error, hint = err.splitlines()[-2:]
    assert error == "error: arm 'cbp' (strategy cbp): RuntimeError: boom"
    assert "most likely a bug" in hint and "please report it" in hint
    assert ("Traceback (most recent call last)" in err) == verbose
    assert not out.exists()


def test_changed_settings_under_a_recorded_label_are_a_conflict(grid_out, tmp_path, monkeypatch, capsys):
    out = _copy(grid_out, tmp_path)
    monkeypatch.setattr(dst.runner, "run", lambda *a, **k: pytest.fail("a run started despite the conflict"))
    assert main([*GRID, "--set", "cbp.maturity_threshold=5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "arm 'cbp replacement_rate=0.0001 (dense)' is recorded" in err
    assert "settings.maturity_threshold 100 -> 5" in err


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import fails, as where pyarrow is absent
    monkeypatch.setattr(dst.runner, "run", lambda *a, **k: pytest.fail("a run started"))
    assert main(["--strategies", "bp", *TINY, "--format", "parquet", "--out", str(tmp_path / "o")]) == 2
    assert "pip install pyarrow" in capsys.readouterr().err


def test_report_subcommand_and_preset_listing(grid_out, tmp_path, capsys):
    out = _copy(grid_out, tmp_path)
    for name in ("summary.csv", "runs.csv", "report.md", "performance.png"):
        (out / name).unlink()
    assert main(["report", "--out", str(out)]) == 0
    assert {"summary.csv", "runs.csv", "report.md", "performance.png"} <= {p.name for p in out.iterdir()}
    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    assert "quick:" in listing and "set (sparse 0.3)" in listing and "permuted-mnist-cpu" in listing


def test_runs_go_to_worker_processes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dst.runner, "run", lambda *a, **k: pytest.fail("ran in the parent, not in a worker"))
    monkeypatch.setattr(comparisons_api, "write_report", _no_report)
    out = tmp_path / "out"
    assert main(["--strategies", "bp,set", "--seeds", "1", "--workers", "2", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 arms x 1 seeds = 2 runs (0 already finished, 0 to resume): 2 run(s) on 2 worker process(es)" in printed
    summaries = sorted(out.glob("runs/*/seed-0/summary.json"))
    assert [p.parent.parent.name for p in summaries] == ["bp_dense", "set_sparse_0.5"]
    assert json.loads((summaries[1].parent / "config.json").read_text())["bench"]["density"] == 0.5


def test_module_exits_2_with_one_line_and_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-m", "comparisons", "--strategies", "bp,nosuch", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: unknown strategy 'nosuch'") and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


# -- runs that failed, were killed, or never wrote a row ----------------------------------------------------

DAMAGED, DAMAGED_LABEL = "cbp_replacement_rate=0.01_dense", LABELS[2]
HEADER = "step,task,loss,units_replaced,connections_regrown,seconds,seconds_per_step\n"
NAN = {"error": "the loss became nan at step 17; the run stopped and the metrics written so far are kept.",
       "step": 17, "kind": "non-finite-loss"}
NO_ROWS = "no rows yet (killed or still running before its first bin)"
#: case -> (metrics.csv text, failure.json text or None, state, reason the report gives)
DAMAGE = {
    "0-byte metrics.csv (old dst, diverged or killed)": ("", None, "no rows", NO_ROWS),
    "header-only metrics.csv and failure.json (diverged)": (HEADER, json.dumps(NAN), "failed",
                                                            f"failed: {NAN['error']}"),
    "header-only metrics.csv, no failure.json (killed)": (HEADER, None, "no rows", NO_ROWS),
    "corrupt failure.json": (HEADER, '{"error": "the loss bec', "failed",
                             "failed: failure.json is unreadable (JSONDecodeError: "),
}


def _damage(run: Path, metrics: str, failure: str | None) -> None:
    """Make ``run`` look like a run that stopped before its first bin: no summary, no checkpoint, no rows."""
    for name in ("summary.json", "checkpoint.pt"):  # a member of a population has no checkpoint of its own
        (run / name).unlink(missing_ok=True)
    (run / "metrics.csv").write_text(metrics)
    if failure is not None:
        (run / "failure.json").write_text(failure)


@pytest.fixture
def no_plots(monkeypatch):
    """write_report without its plots (seconds each) where a test is about tables and report.md."""
    monkeypatch.setattr(comparisons_report, "plot_performance", lambda *a, **k: None)
    monkeypatch.setattr(comparisons_report, "plot_metrics", lambda *a, **k: None)
    monkeypatch.setattr(comparisons_report, "plot_grids", lambda *a, **k: [])


def _assert_other_arms_unchanged(out: Path, grid_out: Path) -> pd.DataFrame:
    """The summary of every undamaged arm is what it was before the damage; returns the new summary."""
    after = pd.read_csv(out / "summary.csv").set_index("arm")
    before = pd.read_csv(grid_out / "summary.csv").set_index("arm")
    pd.testing.assert_frame_equal(after.drop(DAMAGED_LABEL), before.drop(DAMAGED_LABEL))
    return after


@pytest.mark.parametrize("case", list(DAMAGE))
def test_report_lists_a_damaged_run_with_its_reason_and_summarises_the_rest(case, grid_out, tmp_path, no_plots,
                                                                             capsys):
    metrics, failure, state, reason = DAMAGE[case]
    out = _copy(grid_out, tmp_path)
    _damage(out / "runs" / DAMAGED / "seed-1", metrics, failure)
    assert main(["report", "--out", str(out)]) == (1 if state == "failed" else 0)
    assert f"{DAMAGED_LABEL} seed 1: {reason}" in capsys.readouterr().out
    assert f"| {DAMAGED_LABEL} | 1 | {state} | {reason}" in (out / "report.md").read_text()
    summary = _assert_other_arms_unchanged(out, grid_out)
    row = summary.loc[DAMAGED_LABEL]
    assert (row["n"], row["failed"], row["unfinished"]) == ((1, 1, 0) if state == "failed" else (1, 0, 1))
    kept = json.loads((out / "runs" / DAMAGED / "seed-0" / "summary.json").read_text())
    assert row["late_window_mean"] == pytest.approx(kept["late_window"])


@pytest.mark.parametrize("case", list(DAMAGE))
def test_rerun_keeps_a_failed_run_failed_and_redoes_a_killed_one(case, grid_out, tmp_path, calls, no_plots,
                                                                 monkeypatch, capsys):
    metrics, failure, state, reason = DAMAGE[case]
    monkeypatch.setattr(comparisons_api, "write_report", comparisons_report.write_report)  # the report too
    out = _copy(grid_out, tmp_path)
    run = out / "runs" / DAMAGED / "seed-1"
    full = pd.read_csv(run / "metrics.csv").drop(columns=["seconds", "seconds_per_step", "probe_seconds"])
    _damage(run, metrics, failure)
    if state != "failed":  # killed before its first bin: cleared and started again, as any half-written run
        assert main([*GRID, "--out", str(out)]) == 0
        assert [(c[1], c[2]) for c in calls] == [(run, False)]
    else:  # a diverged run would diverge again: reported failed, not redone, until --retry-failed
        assert main([*GRID, "--out", str(out)]) == 1
        assert calls == []
        captured = capsys.readouterr()
        assert f"failed: {DAMAGED_LABEL} seed 1: {reason.removeprefix('failed: ')}" in captured.err
        assert "--retry-failed" in captured.err
        assert "1 failed before: kept as failed" in captured.out
        assert f"{DAMAGED_LABEL} seed 1: {reason}" in captured.out
        row = _assert_other_arms_unchanged(out, grid_out).loc[DAMAGED_LABEL]
        assert (row["n"], row["failed"]) == (1, 1)
        assert (run / "failure.json").exists() and not (run / "summary.json").exists()
        assert main([*GRID, "--retry-failed", "--out", str(out)]) == 0
        assert [(c[1], c[2]) for c in calls] == [(run, False)]
        assert not (run / "failure.json").exists()
    assert (run / "summary.json").exists()
    redone = pd.read_csv(run / "metrics.csv").drop(columns=["seconds", "seconds_per_step", "probe_seconds"])
    pd.testing.assert_frame_equal(redone, full)
    row = _assert_other_arms_unchanged(out, grid_out).loc[DAMAGED_LABEL]
    assert (row["n"], row["failed"], row["unfinished"]) == (2, 0, 0)


def _one_window(run: Path) -> None:
    """Make ``run``'s summary.json say what dst writes when the early and late windows share rows."""
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "plasticity_loss": math.nan, "windows_overlap": True}))


def test_an_arm_whose_windows_coincide_says_so_instead_of_a_number(grid_out, tmp_path, no_plots, capsys):
    out = _copy(grid_out, tmp_path)
    for seed in (0, 1):
        _one_window(out / "runs" / DAMAGED / f"seed-{seed}")
    assert main(["report", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = pd.read_csv(out / "summary.csv").set_index("arm")
    assert summary["windows_overlap"].tolist() == [False, False, True]
    assert math.isnan(summary.loc[DAMAGED_LABEL, "plasticity_loss_mean"])
    cells = comparisons_report.display_frame(summary.reset_index()).set_index("arm")[PLASTICITY_HEADER]
    assert cells[DAMAGED_LABEL] == "n/a (one window)"
    assert cells.drop(DAMAGED_LABEL).str.match(r"^-?\d").all()  # the other arms keep their numbers
    report = (out / "report.md").read_text()
    assert f"| {DAMAGED_LABEL} | 2 |" in report and "| n/a (one window) |" in report
    assert f"Plasticity loss is n/a (one window) for {DAMAGED_LABEL}: " in report
    assert "the early and late windows coincide" in report
    assert "n/a (one window)" in printed and "nan" not in printed.split("\n(mean")[0]


def test_a_run_of_one_bin_is_reported_as_one_window_end_to_end(tmp_path, no_plots):
    """A real one-bin run: dst marks its windows as overlapping, and the report says so."""
    out = tmp_path / "out"
    argv = ["--strategies", "bp", "--seeds", "1", "--workers", "1", *TINY, "--steps", "200", "--out", str(out)]
    assert main(argv) == 0
    written = json.loads((out / "runs" / "bp_dense" / "seed-0" / "summary.json").read_text())
    assert written["windows_overlap"] is True and math.isnan(written["plasticity_loss"])
    report = (out / "report.md").read_text()
    assert f"| {PLASTICITY_HEADER} |" in report and "| n/a (one window) |" in report
    assert "Plasticity loss is n/a (one window) for bp (dense)" in report


def test_an_arm_whose_every_run_failed_still_appears_and_plots_are_drawn(grid_out, tmp_path, capsys):
    out = _copy(grid_out, tmp_path)
    for seed in (0, 1):
        _damage(out / "runs" / DAMAGED / f"seed-{seed}", HEADER, json.dumps(NAN))
    for name in ("performance.png", "metrics.png", "grid_cbp_replacement_rate.png"):
        (out / name).unlink()
    assert main(["report", "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    for seed in (0, 1):
        assert f"{DAMAGED_LABEL} seed {seed}: failed: {NAN['error']}" in printed
        assert f"| {DAMAGED_LABEL} | {seed} | failed | failed: {NAN['error']}" in report
    row = _assert_other_arms_unchanged(out, grid_out).loc[DAMAGED_LABEL]
    assert (row["n"], row["failed"], row["unfinished"]) == (0, 2, 0)
    assert math.isnan(row["late_window_mean"])
    assert "4 of 6 started runs finished" in report
    for name in ("performance.png", "metrics.png", "grid_cbp_replacement_rate.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_a_diverging_arm_is_reported_failed_and_a_rerun_does_not_redo_it(tmp_path, monkeypatch, capsys):
    """A real divergence (learning rate 1e6: the loss is infinite within the first bin). dst records it in
    failure.json and leaves a header-only metrics.csv; the comparison reports it and keeps the other arm."""
    monkeypatch.setattr(comparisons_report, "plot_metrics", lambda *a, **k: None)  # one plot is enough here
    out = tmp_path / "out"
    argv = ["--strategies", "bp,cbp", "--bench", "cbp.lr=1e6", "--seeds", "1", "--workers", "1", *TINY,
            "--out", str(out)]
    assert main(argv) == 1
    assert "failed: cbp (dense) seed 0: NonFiniteLossError: the loss became" in capsys.readouterr().err
    run = out / "runs" / "cbp_dense" / "seed-0"
    failure = json.loads((run / "failure.json").read_text())
    assert failure["kind"] == "non-finite-loss" and failure["error"].startswith("the loss became")
    assert isinstance(failure["step"], int) and 1 <= failure["step"] <= 200
    lines = (run / "metrics.csv").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("step,")
    summary = pd.read_csv(out / "summary.csv").set_index("arm")
    assert summary.loc["bp (dense)", "n"] == 1 and summary.loc["cbp (dense)", ["n", "failed"]].tolist() == [0, 1]
    assert f"| cbp (dense) | 0 | failed | failed: {failure['error']}" in (out / "report.md").read_text()
    assert (out / "performance.png").exists()
    monkeypatch.setattr(dst.runner, "run", lambda *a, **k: pytest.fail("a diverged run was redone"))
    assert main(argv) == 1
    assert main(["report", "--out", str(out)]) == 1


def test_a_summary_json_from_before_oriented_plasticity_loss_is_taken_afresh_from_its_metrics(grid_out, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(grid_out, out)
    run = out / "runs" / comparisons_tables.dir_name(LABELS[0]) / "seed-0"
    today = json.loads((run / "summary.json").read_text())
    legacy = {k: v for k, v in today.items() if k != "windows_overlap"}
    legacy["plasticity_loss"] = -1234.0  # the old sign and windows: not what today's rules give
    (run / "summary.json").write_text(json.dumps(legacy))
    summaries = comparisons_tables.run_summaries(out)
    row = summaries[(summaries["arm"] == LABELS[0]) & (summaries["seed"] == 0)].iloc[0]
    assert row["plasticity_loss"] == pytest.approx(today["plasticity_loss"], nan_ok=True)
    assert row["windows_overlap"] == today["windows_overlap"]
