"""The comparisons CLI end to end on tiny bit-flipping runs: outputs, numbers, resume and bad input."""

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
from comparisons import mean_ci
from comparisons.cli import main

TINY = ["--bench", "bin_size=200", "--bench", "change_every=200", "--bench", "hidden=8",
        "--bench", "probe_size=50", "--steps", "600", "--no-progress"]
GRID = ["--strategies", "bp,cbp", "--grid", "cbp.replacement_rate=1e-4,1e-2", "--seeds", "2", "--workers", "1", *TINY]
LABELS = ["bp (dense)", "cbp replacement_rate=0.0001 (dense)", "cbp replacement_rate=0.01 (dense)"]
ROOT = Path(__file__).resolve().parents[1]


def _no_report(out, fmt="csv"):
    """Stands in for write_report where a test is about runs, not plots (plots cost seconds)."""
    return {"summary": pd.DataFrame(), "paths": []}


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
