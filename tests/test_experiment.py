import json

import pandas as pd
import pytest
from conftest import assert_same_state

import dst
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


def _crash_at(experiment, step: int) -> None:
    """Make ``experiment`` raise KeyboardInterrupt (as Ctrl-C would) right after training step ``step``."""
    after_step = experiment.strategy.after_step

    def crash():
        stats = after_step()
        if experiment.strategy.step == step:
            raise KeyboardInterrupt
        return stats

    experiment.strategy.after_step = crash


def test_resume_after_a_crash_continues_to_exactly_the_uninterrupted_result(tmp_path):
    full = run(_spec(steps=3000), tmp_path / "full", progress=False)

    crashing = prepare(_spec(steps=3000, checkpoint_every=1000), tmp_path / "cut", progress=False)
    _crash_at(crashing, 1700)
    with pytest.raises(KeyboardInterrupt):
        crashing.run()
    # the row at 1500 was written after the checkpoint at 1000; resume drops and recomputes it
    assert list(pd.read_csv(tmp_path / "cut" / "metrics.csv")["step"]) == [500, 1000, 1500]
    resumed = run(_spec(steps=3000, checkpoint_every=1000), tmp_path / "cut", resume=True, progress=False)
    pd.testing.assert_frame_equal(_without_timing(full), _without_timing(resumed), check_dtype=False)
    on_disk = pd.read_csv(tmp_path / "cut" / "metrics.csv")
    pd.testing.assert_frame_equal(_without_timing(full), _without_timing(on_disk), check_dtype=False)


#: Per strategy: settings (and benchmark settings) under which it refreshes often within 600 steps.
REFRESHING = {
    "bp": ({}, {}),
    "cbp": ({"replacement_rate": 0.01, "maturity_threshold": 50}, {}),
    "redo": ({"period": 100, "tau": 0.5}, {}),
    "regrama": ({"period": 100, "tau": 0.5, "window": 10}, {}),
    "snr": ({"threshold": 20.0, "update_every": 1, "min_threshold": 5.0, "tau_max": 500}, {}),
    "set": ({"update_interval": 50}, {"density": 0.5}),
    "rigl": ({"update_interval": 50}, {"density": 0.5}),
    "rigl-utility": ({"update_interval": 50}, {"density": 0.5}),
    "cbp-rigl": ({"update_interval": 50, "replacement_rate": 0.01, "maturity_threshold": 50}, {"density": 0.5}),
    "cbp-set": ({"update_interval": 50, "replacement_rate": 0.01, "maturity_threshold": 50}, {"density": 0.5}),
    "srigl": ({"update_interval": 50}, {"density": 0.5, "distribution": "constant-fan-in"}),
    "cbp-srigl": (
        {"update_interval": 50, "replacement_rate": 0.01, "maturity_threshold": 50},
        {"density": 0.5, "distribution": "constant-fan-in"},
    ),
    "shrink-perturb": ({"noise_std": 1e-3}, {}),
    "l2-init": ({}, {}),
    "head-reset": ({}, {}),
    "weight-clipping": ({"kappa": 1.5}, {}),
    "upgd": ({"sigma": 0.1, "weight_decay": 1e-3}, {}),
    "parseval": ({"strength": 1e-2}, {}),
    "spectral-reg": ({"strength": 1e-2}, {}),
    "hare-tortoise": ({"reset_every": 250}, {}),
    "plasticity-injection": ({"every_task": True, "head_layers": 1}, {}),
    "retrain": ({}, {}),
}


def test_every_registered_strategy_has_a_resume_case():
    assert set(REFRESHING) == set(dst.strategies.available())


@pytest.mark.parametrize("name", sorted(REFRESHING))
def test_every_strategy_resumes_to_exactly_the_uninterrupted_run(tmp_path, name):
    settings, bench = REFRESHING[name]
    # the checkpoint (step 300) comes after a task boundary (200), so task-start state is restored from it
    short = {"bin_size": 100, "change_every": 200}
    spec = _spec(steps=600, strategy=name, settings=settings, bench={**short, **bench}, checkpoint_every=300)
    full = prepare(spec, tmp_path / "full", progress=False)
    (full_rows,) = full.run()
    if name not in ("bp", "l2-init", "shrink-perturb", "head-reset", "weight-clipping", "upgd", "parseval",
                    "spectral-reg", "hare-tortoise", "plasticity-injection", "retrain"):  # these change weights, not the topology
        assert (full_rows["units_replaced"] + full_rows["connections_regrown"]).sum() > 0, "no refresh happened"
    crashing = prepare(spec, tmp_path / "cut", progress=False)
    _crash_at(crashing, 450)
    with pytest.raises(KeyboardInterrupt):
        crashing.run()
    resumed = prepare(spec, tmp_path / "cut", progress=False)
    (resumed_rows,) = resumed.run(resume=True)
    pd.testing.assert_frame_equal(_without_timing(full_rows), _without_timing(resumed_rows), check_dtype=False)
    assert_same_state(full.model.state_dict(), resumed.model.state_dict(), "model")
    assert_same_state(full.optimizer.state_dict(), resumed.optimizer.state_dict(), "optimizer")
    assert_same_state(full.strategy.state_dict(), resumed.strategy.state_dict(), "strategy")


def test_a_finished_run_can_be_extended_with_resume(tmp_path):
    full = run(_spec(steps=3000), progress=False)
    run(_spec(steps=2000, checkpoint_every=1000), tmp_path / "r", progress=False)
    longer = run(_spec(steps=3000, checkpoint_every=1000), tmp_path / "r", resume=True, progress=False)
    pd.testing.assert_frame_equal(_without_timing(full), _without_timing(longer), check_dtype=False)


def test_resume_with_other_settings_is_refused(tmp_path):
    run(_spec(checkpoint_every=1000), tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="settings differ.*bench"):
        run(_spec(bench={**SMALL, "lr": 0.1}, checkpoint_every=1000), tmp_path / "r", resume=True, progress=False)


def test_resume_without_a_checkpoint_runs_again_from_step_0(tmp_path):
    full = run(_spec(), tmp_path / "full", progress=False)
    # a run killed before its first checkpoint: rows on disk, no checkpoint.pt
    crashing = prepare(_spec(checkpoint_every=10_000), tmp_path / "cut", progress=False)
    _crash_at(crashing, 1200)
    with pytest.raises(KeyboardInterrupt):
        crashing.run()
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()
    with pytest.raises(ConfigError, match="no checkpoint.*pass --resume to run it again from step 0"):
        run(_spec(), tmp_path / "cut", progress=False)
    resumed = run(_spec(), tmp_path / "cut", resume=True, progress=False)
    pd.testing.assert_frame_equal(_without_timing(full), _without_timing(resumed), check_dtype=False)
    on_disk = pd.read_csv(tmp_path / "cut" / "metrics.csv")
    pd.testing.assert_frame_equal(_without_timing(full), _without_timing(on_disk), check_dtype=False)


def test_resume_with_other_settings_names_each_changed_value(tmp_path):
    run(_spec(checkpoint_every=1000), tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match=r"bench.lr: saved 0.01, now 0.1; seed: saved 0, now 2\)"):
        run(_spec(seed=2, bench={**SMALL, "lr": 0.1}, checkpoint_every=1000), tmp_path / "r", resume=True,
            progress=False)
    with pytest.raises(ConfigError, match=r"\(strategy: saved 'bp', now 'cbp'\)"):
        run(_spec(strategy="cbp", checkpoint_every=1000), tmp_path / "r", resume=True, progress=False)


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


def test_a_run_that_diverges_before_its_first_bin_leaves_a_header_and_its_reason(tmp_path):
    with pytest.raises(NonFiniteLossError) as info:
        run(_spec(bench={**SMALL, "lr": 1e4}), tmp_path / "r", progress=False)
    rows = pd.read_csv(tmp_path / "r" / "metrics.csv")
    assert rows.empty and {"step", "task", "loss", "units_replaced"} <= set(rows.columns)
    failure = json.loads((tmp_path / "r" / "failure.json").read_text())
    assert failure == {"kind": "non-finite-loss", "error": str(info.value), "step": info.value.step}
    # once the cause is fixed, a rerun in place no longer carries the old failure
    (tmp_path / "r" / "config.json").unlink()
    (tmp_path / "r" / "metrics.csv").unlink()
    run(_spec(), tmp_path / "r", progress=False)
    assert not (tmp_path / "r" / "failure.json").exists()


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
