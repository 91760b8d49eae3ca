"""The comparisons CLI end to end on tiny bit-flipping runs: outputs, numbers, resume, failed runs and bad input."""

from __future__ import annotations

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

import dst.runner
from comparisons import api as comparisons_api
from comparisons import report as comparisons_report
from comparisons import mean_ci
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

    def spy(spec, out_dir=None, *, resume=False, progress=True):
        made.append((spec, Path(out_dir), resume))
        return real(spec, out_dir, resume=resume, progress=progress)

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


def test_summary_equals_numbers_recomputed_from_raw_metrics(grid_out):
    summary = pd.read_csv(grid_out / "summary.csv").set_index("arm")
    folders = ["bp_dense", "cbp_replacement_rate=0.0001_dense", "cbp_replacement_rate=0.01_dense"]
    for label, folder in zip(LABELS, folders):
        per_run = {"late_window": [], "plasticity_loss": [], "final_effective_rank": [],
                   "final_dead_fraction": [], "seconds_per_step": []}
        for seed in (0, 1):
            rows = pd.read_csv(grid_out / "runs" / folder / f"seed-{seed}" / "metrics.csv")
            window = math.ceil(0.1 * len(rows))  # last / first 10% of rows, at least one
            late, early = rows["loss"].tail(window).mean(), rows["loss"].head(window).mean()
            per_run["late_window"].append(late)
            per_run["plasticity_loss"].append(early - late)
            per_run["final_effective_rank"].append(rows["effective_rank"].dropna().iloc[-1])
            per_run["final_dead_fraction"].append(rows["dead_fraction"].dropna().iloc[-1])
            per_run["seconds_per_step"].append(rows["seconds"].sum() / rows["step"].iloc[-1])
        for metric, values in per_run.items():
            values = np.array(values)
            half = stats.t.ppf(0.975, len(values) - 1) * stats.sem(values)  # 95% Student-t half-width
            assert summary.loc[label, f"{metric}_mean"] == pytest.approx(values.mean(), rel=1e-9, abs=1e-12), metric
            assert summary.loc[label, f"{metric}_ci95"] == pytest.approx(half, rel=1e-6, abs=1e-12), metric


def test_mean_ci_is_student_t_and_nan_for_one_run():
    mean, half, n = mean_ci([1.0, 2.0, 4.0, float("nan")])
    assert (mean, n) == (pytest.approx(7 / 3), 3)
    assert half == pytest.approx(stats.t.ppf(0.975, 2) * np.std([1, 2, 4], ddof=1) / math.sqrt(3))
    single = mean_ci([5.0])
    assert single[0] == 5.0 and math.isnan(single[1]) and single[2] == 1


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
    for name in ("summary.json", "checkpoint.pt"):
        (run / name).unlink()
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
    assert "quick:" in listing and "set (sparse 0.5)" in listing and "permuted-mnist-cpu" in listing


def test_runs_go_to_worker_processes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dst.runner, "run", lambda *a, **k: pytest.fail("ran in the parent, not in a worker"))
    monkeypatch.setattr(comparisons_api, "write_report", _no_report)
    out = tmp_path / "out"
    assert main(["--strategies", "bp,set", "--seeds", "1", "--workers", "2", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 arms x 1 seeds = 2 runs (0 already finished, 0 to resume), 2 worker process(es)" in printed
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
    for name in ("summary.json", "checkpoint.pt"):
        (run / name).unlink()
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
