import json

import pandas as pd
import pytest

from dst.errors import ConfigError, NonFiniteLossError
from dst.experiment import TIMING_COLUMNS
from dst.runner import RunSpec, prepare, run

SMALL = {"bin_size": 500, "change_every": 1000}


def _spec(**changes):
    fields = dict(steps=2000, seed=0, bench=dict(SMALL), device="cpu")
    fields.update(changes)
    return RunSpec(**fields)


def _without_timing(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=list(TIMING_COLUMNS)).reset_index(drop=True)


def test_run_writes_one_row_per_bin_with_the_required_columns(tmp_path):
    df = run(_spec(), tmp_path / "r", progress=False)
    csv = pd.read_csv(tmp_path / "r" / "metrics.csv")
    assert list(csv["step"]) == [500, 1000, 1500, 2000]
    assert list(csv["task"]) == [0, 0, 1, 1]
    assert {"step", "task", "loss", "seconds", "units_replaced", "connections_regrown"} <= set(csv.columns)
    pd.testing.assert_frame_equal(_without_timing(csv), _without_timing(df), check_dtype=False)


def test_config_json_records_every_resolved_setting_defaults_included(tmp_path):
    run(_spec(), tmp_path / "r", progress=False)
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["benchmark"] == "bit-flipping" and saved["strategy"] == "bp" and saved["steps"] == 2000
    assert saved["bench"]["lr"] == 0.01 and saved["bench"]["hidden"] == [5]
    assert saved["bench"]["bin_size"] == 500 and saved["bench"]["flip"] == "one"


def test_the_last_partial_bin_is_logged():
    df = run(_spec(steps=1200), progress=False)
    assert list(df["step"]) == [500, 1000, 1200]


def test_two_runs_with_one_seed_give_identical_rows_but_timing():
    a = run(_spec(), progress=False)
    b = run(_spec(), progress=False)
    pd.testing.assert_frame_equal(_without_timing(a), _without_timing(b))
    c = run(_spec(seed=1), progress=False)
    assert not a["loss"].equals(c["loss"])


def test_resume_after_a_crash_continues_to_exactly_the_uninterrupted_result(tmp_path):
    full = run(_spec(steps=3000), tmp_path / "full", progress=False)

    crashing = prepare(_spec(steps=3000, checkpoint_every=1000), tmp_path / "cut", progress=False)
    after_step = crashing.strategy.after_step

    def crash():
        stats = after_step()
        if crashing.strategy.step == 1700:
            raise KeyboardInterrupt
        return stats

    crashing.strategy.after_step = crash
    with pytest.raises(KeyboardInterrupt):
        crashing.run()
    # the row at 1500 was written after the checkpoint at 1000; resume drops and recomputes it
    assert list(pd.read_csv(tmp_path / "cut" / "metrics.csv")["step"]) == [500, 1000, 1500]
    resumed = run(_spec(steps=3000, checkpoint_every=1000), tmp_path / "cut", resume=True, progress=False)
    pd.testing.assert_frame_equal(_without_timing(full), _without_timing(resumed), check_dtype=False)
    on_disk = pd.read_csv(tmp_path / "cut" / "metrics.csv")
    pd.testing.assert_frame_equal(_without_timing(full), _without_timing(on_disk), check_dtype=False)


def test_a_finished_run_can_be_extended_with_resume(tmp_path):
    full = run(_spec(steps=3000), progress=False)
    run(_spec(steps=2000, checkpoint_every=1000), tmp_path / "r", progress=False)
    longer = run(_spec(steps=3000, checkpoint_every=1000), tmp_path / "r", resume=True, progress=False)
    pd.testing.assert_frame_equal(_without_timing(full), _without_timing(longer), check_dtype=False)


def test_resume_with_other_settings_is_refused(tmp_path):
    run(_spec(checkpoint_every=1000), tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="settings differ.*bench"):
        run(_spec(bench={**SMALL, "lr": 0.1}, checkpoint_every=1000), tmp_path / "r", resume=True, progress=False)


def test_resume_without_checkpoint_says_so(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint.pt"):
        run(_spec(), tmp_path / "r", resume=True, progress=False)


def test_an_existing_run_is_never_overwritten(tmp_path):
    run(_spec(), tmp_path / "r", progress=False)
    before = (tmp_path / "r" / "metrics.csv").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        run(_spec(seed=3), tmp_path / "r", progress=False)
    assert (tmp_path / "r" / "metrics.csv").read_text() == before


def test_unwritable_output_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot write to output directory"):
        run(_spec(), blocker / "run", progress=False)


def test_nan_loss_stops_names_the_step_and_keeps_the_rows_so_far(tmp_path):
    spec = _spec(steps=5000, bench={**SMALL, "lr": 5.0, "bin_size": 5})
    with pytest.raises(NonFiniteLossError) as info:
        run(spec, tmp_path / "r", progress=False)
    step = info.value.step
    assert 5 < step < 5000
    rows = pd.read_csv(tmp_path / "r" / "metrics.csv")
    assert len(rows) > 0 and rows["step"].max() < step
    assert rows["loss"].notna().all()
    assert f"at step {step}" in str(info.value)


@pytest.mark.parametrize("steps", [0, -5])
def test_non_positive_steps_are_rejected(steps):
    with pytest.raises(ConfigError, match="steps must be a positive integer"):
        run(_spec(steps=steps), progress=False)


def test_unknown_benchmark_and_strategy_name_the_alternatives():
    with pytest.raises(ConfigError, match="unknown benchmark 'nope'; available: .*bit-flipping"):
        run(_spec(benchmark="nope"), progress=False)
    with pytest.raises(ConfigError, match="unknown strategy 'nope'; available: .*bp"):
        run(_spec(strategy="nope"), progress=False)


def test_sparse_learner_keeps_its_density_through_a_run():
    experiment = prepare(_spec(bench={**SMALL, "hidden": (50,), "density": 0.2}), progress=False)
    experiment.run()
    masked = experiment.strategy.masked
    assert masked, "density 0.2 must produce masked layers"
    for layer in masked:
        assert (layer.weight[~layer.mask] == 0).all()
