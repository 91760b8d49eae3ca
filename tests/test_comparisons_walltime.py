"""The real wall time of a comparison: one row per call that had runs to do, shown in report.md."""

from __future__ import annotations

import pandas as pd

from comparisons import api as comparisons_api
from comparisons.cli import main

TINY = ["--strategies", "bp", "--workers", "1", "--bench", "bin_size=200", "--bench", "hidden=4",
        "--bench", "probe=false", "--steps", "400", "--no-progress"]


def test_each_call_with_runs_to_do_records_its_wall_time_and_the_report_lists_them(tmp_path):
    out = tmp_path / "out"
    assert main([*TINY, "--seeds", "2", "--out", str(out)]) == 0
    assert main([*TINY, "--seeds", "2", "--out", str(out)]) == 0  # nothing to do: no row
    assert main([*TINY, "--seeds", "3", "--out", str(out)]) == 0  # one more seed: one run to do
    calls = pd.read_csv(out / "wall_times.csv")
    assert list(calls["runs"]) == [2, 1] and list(calls["finished"]) == [2, 1]
    assert list(calls["failed"]) == [0, 0] and not calls["interrupted"].any()
    assert (calls["wall_seconds"] > 0).all() and list(calls["workers"]) == [1, 1]
    assert calls["command"].iloc[1].startswith("python -m comparisons ") and "--seeds 3" in calls["command"].iloc[1]
    pd.to_datetime(calls["started"])  # ISO timestamps
    report = (out / "report.md").read_text()
    assert "## Wall time" in report and "over 2 call(s)" in report and "--seeds 3" in report


def test_an_interrupted_call_is_recorded_as_interrupted_with_the_runs_it_finished(tmp_path, monkeypatch):
    real = comparisons_api.run_jobs

    def interrupted_after_the_runs(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(comparisons_api, "run_jobs", interrupted_after_the_runs)
    out = tmp_path / "out"
    assert main([*TINY, "--seeds", "2", "--out", str(out)]) == 130
    calls = pd.read_csv(out / "wall_times.csv")
    assert len(calls) == 1 and bool(calls["interrupted"].iloc[0])
    assert calls["runs"].iloc[0] == 2 and calls["finished"].iloc[0] == 2 and calls["failed"].iloc[0] == 0
