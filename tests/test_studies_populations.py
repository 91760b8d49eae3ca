"""Studies on populations: a trial's seeds train together, and --batch trains several trials together,
with the values, pruning and divergence of trials run one seed and one trial at a time."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from dst.errors import ConfigError
from studies import run_study
from studies.space import build_space
from studies.study import check_batch
from studies.trial import StudySettings, TrialObjective

BENCH = {"bin_size": "100", "change_every": "100", "probe_size": "50", "hidden": "5"}
PARAMS = [{"replacement_rate": 1e-2, "maturity_threshold": 20}, {"replacement_rate": 1e-4, "maturity_threshold": 50},
          {"replacement_rate": 3e-3, "maturity_threshold": 10}]


def _settings(seeds: int = 2, steps: int = 400, only=("replacement_rate", "maturity_threshold"),
              **space) -> StudySettings:
    built = build_space("cbp", "bit-flipping", bench=BENCH, only=list(only), **space)
    return StudySettings("cbp", "bit-flipping", steps=steps, seed=0, seeds=seeds, objectives=("late_window",),
                         directions=("minimize",), space=built.to_dict(), pruner="none", warmup=0.5)


def _study(name: str, params: list[dict]) -> optuna.Study:
    study = optuna.create_study(study_name=name, pruner=optuna.pruners.NopPruner())
    for values in params:
        study.enqueue_trial(values)
    return study


def test_a_trials_seeds_trained_as_one_population_give_the_values_of_one_seed_after_another(tmp_path, monkeypatch):
    settings = _settings()
    assert settings.population
    together = _study("together", PARAMS[:1])
    together.optimize(TrialObjective(settings, tmp_path / "a", target=5), n_trials=1)
    monkeypatch.setattr(StudySettings, "population", property(lambda self: False))
    apart = _study("apart", PARAMS[:1])
    apart.optimize(TrialObjective(settings, tmp_path / "b", target=5), n_trials=1)
    assert together.trials[0].value == pytest.approx(apart.trials[0].value, rel=1e-5)
    seed_values = together.trials[0].user_attrs["seed_values"]["late_window"]
    assert seed_values == pytest.approx(apart.trials[0].user_attrs["seed_values"]["late_window"], rel=1e-5)
    assert together.trials[0].value == pytest.approx(sum(seed_values) / 2)
    assert (tmp_path / "a" / "together" / "trial-0" / "seed-1" / "summary.json").exists()


def test_a_batch_of_trials_in_one_population_gives_each_trial_its_own_values(tmp_path):
    settings = _settings()
    batched, alone = _study("batched", PARAMS), _study("alone", PARAMS)
    assert run_study(batched, settings, None, target=3, out=tmp_path / "a", batch=3) == 3
    alone.optimize(TrialObjective(settings, tmp_path / "b", target=3), n_trials=3)
    assert [t.params for t in batched.trials] == [t.params for t in alone.trials] == PARAMS
    for together, apart in zip(batched.trials, alone.trials):
        assert together.state == optuna.trial.TrialState.COMPLETE
        assert together.value == pytest.approx(apart.value, rel=1e-5)
        assert together.intermediate_values.keys() == apart.intermediate_values.keys()
    assert len({t.value for t in batched.trials}) == 3  # the settings differ, so the values do
    assert not list((tmp_path / "a" / "batched").glob("batch-*/checkpoint.pt"))
    from studies.report import write_report

    for key, value in settings.attrs().items():
        batched.set_user_attr(key, value)
    write_report(batched, tmp_path / "report")
    best = batched.best_trial
    values = best.user_attrs["seed_values"]["late_window"]
    text = (tmp_path / "report" / "report.md").read_text()
    assert f"late_window over 2 seeds: std {float(np.std(values, ddof=1)):.4g}" in text


def test_a_pruned_trial_of_a_batch_stops_alone_and_the_others_complete(tmp_path):
    class PruneTrialOne(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            return trial.number == 1 and trial.last_step is not None and trial.last_step >= 200

    settings = _settings()
    study = optuna.create_study(study_name="pruned", pruner=PruneTrialOne())
    for values in PARAMS:
        study.enqueue_trial(values)
    run_study(study, settings, None, target=3, out=tmp_path, batch=3)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                      optuna.trial.TrialState.COMPLETE]
    assert max(study.trials[1].intermediate_values) == 200 and max(study.trials[0].intermediate_values) == 400


def test_a_diverging_trial_of_a_batch_is_pruned_as_diverged(tmp_path):
    settings = _settings(only=("replacement_rate", "maturity_threshold", "bench.lr"), params=["bench.lr=1e-3:100:log"])
    check_batch(settings, 2)  # lr is per member: allowed
    study = _study("diverging", [{**PARAMS[0], "bench.lr": 0.01}, {**PARAMS[1], "bench.lr": 50.0}])
    run_study(study, settings, None, target=2, out=tmp_path, batch=2)
    first, second = study.trials
    assert first.state == optuna.trial.TrialState.COMPLETE
    assert second.state == optuna.trial.TrialState.PRUNED and "loss became" in second.user_attrs["diverged"]


@pytest.mark.parametrize(
    "space, benchmark, message",
    [
        (dict(params=["utility=contribution,adaptable_contribution"]), "bit-flipping", "utility is a categorical"),
        (dict(params=["bench.density=0.1:0.9"]), "bit-flipping", "bench.density is a benchmark setting other than lr"),
        ({}, "continual-imagenet", "trains one member at a time"),
    ],
)
def test_batch_refuses_what_members_of_one_population_cannot_differ_in(space, benchmark, message):
    only = ["replacement_rate", *[p.split("=")[0] for p in space.get("params", [])]]
    built = build_space("cbp", "bit-flipping", bench=BENCH, only=only, **space)
    settings = StudySettings("cbp", benchmark, steps=400, seed=0, seeds=2, objectives=("late_window",),
                             directions=("minimize",), space=built.to_dict(), pruner="none", warmup=0.5)
    with pytest.raises(ConfigError, match=message):
        check_batch(settings, 2)
    check_batch(settings, 1)  # one trial at a time: anything goes


def test_batch_below_one_is_a_clear_error_before_any_trial(tmp_path, capsys):
    from studies.cli import main

    code = main(["tune", "--study", "b", "--out", str(tmp_path), "--trials", "2", "--steps", "200", "--batch", "0",
                 "--bench", "bin_size=100"])
    assert code == 2
    assert "--batch must be at least 1, got 0" in capsys.readouterr().err
    assert not list(tmp_path.glob("b/trial-*"))
