"""studies: search spaces from config metadata, objectives, storages, workers, resume, reports.

Trials are tiny (bit-flipping, 200-1000 steps, 5 hidden units, 100-step bins) so the whole file runs in
about a minute; the PostgreSQL tests share a server they start (tests/postgres_server.py), and killed
workers are real processes killed with SIGKILL mid-trial.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
import pytest
import sqlalchemy.exc
from postgres_server import (  # tests/ is on sys.path under pytest
    MISSING_MESSAGE,
    PostgresServer,
)

import dst
import studies.study
import studies.trial
from dst.errors import ConfigError
from studies import (
    build_space,
    directions,
    objective_values,
    open_storage,
    parse_objectives,
    requeue_running,
    resolve,
)
from studies.cli import main
from studies.sampler import make_sampler
from studies.trial import StudySettings, TrialObjective

ROOT = Path(__file__).resolve().parents[1]
BENCH = ["--bench", "bin_size=100", "--bench", "change_every=200", "--bench", "probe_size=50", "--bench", "hidden=5"]
COMPLETE, RUNNING, FAIL = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING,
                           optuna.trial.TrialState.FAIL)
FINISHED = (COMPLETE, optuna.trial.TrialState.PRUNED)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def tune(out: Path, *extra: str, trials: int = 3, steps: int = 400, study: str = "s") -> list[str]:
    return ["tune", "--strategy", "cbp", "--study", study, "--out", str(out), "--trials", str(trials),
            "--steps", str(steps), "--sampler-seed", "0", *BENCH, *extra]


def load(storage: str, name: str = "s") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(resolve(storage, ".", name), create=False))


def python_m_studies(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "studies", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def error_of(argv: list[str], capsys, status: int = 2) -> str:
    assert main(argv) == status
    return capsys.readouterr().err


def running_trial_with_a_bin(study: optuna.Study, pids: set[int], alive: Callable[[], bool], *,
                             worker_completed_one: bool = False) -> optuna.trial.FrozenTrial:
    """Poll until a trial run by one of ``pids`` is RUNNING and has reported a bin: mid-trial, the moment to
    kill its worker. With ``worker_completed_one``, only a trial whose worker has completed another before."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        trials = study.get_trials()
        completed_by = {t.user_attrs.get("worker") for t in trials if t.state == COMPLETE}
        for trial in trials:
            worker = trial.user_attrs.get("worker", "")
            ours = worker.rsplit(":", 1)[-1] in {str(p) for p in pids}
            if trial.state == RUNNING and trial.intermediate_values and ours and (
                    worker in completed_by or not worker_completed_one):
                return trial
        assert alive(), "a worker ended before it could be killed mid-trial"
        time.sleep(0.02)
    pytest.fail("no trial reported a bin within 60 s")


def copy_study(journal_study: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(journal_study, out)
    return out


def ask_running(out: Path, worker: str) -> optuna.trial.FrozenTrial:
    """A RUNNING trial of the journal study in ``out`` recorded as run by ``worker`` (host:pid)."""
    study = load(str(out / "s.journal"))
    trial = study.ask({"replacement_rate": optuna.distributions.FloatDistribution(1e-6, 1e-2, log=True)})
    trial.set_user_attr("worker", worker)
    return study.trials[trial.number]


# -- search spaces ------------------------------------------------------------------------------------------


def test_default_space_is_every_declared_search_range_of_the_strategy():
    space = build_space("cbp", "bit-flipping")
    params = {p.name: p for p in space.params}
    assert set(params) == {"replacement_rate", "maturity_threshold", "decay_rate"}
    assert params["replacement_rate"].kind == "float" and params["replacement_rate"].log
    assert params["maturity_threshold"].kind == "int" and (params["maturity_threshold"].low, params["maturity_threshold"].high) == (10, 10_000)
    assert not params["decay_rate"].log


def test_param_overrides_set_ranges_choices_fixed_values_and_bench_fields():
    space = build_space(
        "cbp", "bit-flipping",
        ["replacement_rate=1e-6:1e-3:log", "maturity_threshold=10:1000", "utility=contribution,adaptable_contribution",
         "decay_rate=0.95", "bench.density=0.05:0.5", "bench.lr"],
        bench={"hidden": "5"},
    )
    params = {p.name: p for p in space.params}
    assert (params["replacement_rate"].low, params["replacement_rate"].high, params["replacement_rate"].log) == (1e-6, 1e-3, True)
    assert params["maturity_threshold"].kind == "int" and not params["maturity_threshold"].log
    assert params["utility"].choices == ("contribution", "adaptable_contribution")
    assert (params["bench.density"].low, params["bench.density"].high) == (0.05, 0.5)
    assert params["bench.lr"].log and (params["bench.lr"].low, params["bench.lr"].high) == (1e-4, 1e-1)
    assert "decay_rate" not in params and space.settings == {"decay_rate": 0.95}
    assert space.bench == {"hidden": (5,)}
    only = build_space("cbp", "bit-flipping", only=["replacement_rate", "maturity_threshold"])
    assert [p.name for p in only.params] == ["replacement_rate", "maturity_threshold"]


@pytest.mark.parametrize(
    "params, only, message",
    [
        (["nope=1:2"], None, "unknown parameter 'nope'"),
        (["replacement_rate=0.5:2"], None, "valid range of replacement_rate, which is [0.0, 1.0]"),
        (["decay_rate=0.5:1.0"], None, "valid range of decay_rate, which is [0.0, 1.0)"),
        (["bench.density=0:0.5"], None, "valid range of bench.density, which is (0.0, 1.0]"),
        (["maturity_threshold=1.5:20"], None, "integer field"),
        (["utility=contribution,bogus"], None, "utility='bogus' is out of range"),
        (["decay_rate=0.9:0.95"], ["replacement_rate"], "--only leaves out"),
    ],
)
def test_bad_search_spaces_are_errors_that_name_the_field(params, only, message):
    with pytest.raises(ConfigError) as err:
        build_space("cbp", "bit-flipping", params, only)
    assert message in str(err.value)
    if "unknown" in message:
        assert "accepted: replacement_rate, maturity_threshold" in str(err.value) and "bench.density" in str(err.value)


@dataclass(frozen=True)
class ToyConfig(dst.StrategyConfig):
    period: int = dst.setting(50, low=1, search=(10, 100), log=True, help="steps between nothing")
    scale: float = dst.setting(0.5, low=0.0, high=1.0, search=(0.1, 0.9), help="unused")
    mode: str = dst.setting("a", choices=("a", "b"), search=("a", "b"), help="categorical")


class ToyRefresh(dst.RefreshStrategy):
    """A third-party strategy that refreshes nothing."""

    Config = ToyConfig

    def after_step(self):
        super().after_step()
        return dst.NO_REFRESH


@pytest.fixture
def toy_strategy():
    dst.strategies.register("toy-refresh")(ToyRefresh)
    yield "toy-refresh"
    dst.strategies.registry.unregister("toy-refresh")


def test_a_third_party_strategy_is_tunable_from_its_config_metadata(toy_strategy, tmp_path):
    space = build_space(toy_strategy, "bit-flipping")
    kinds = {p.name: p.kind for p in space.params}
    assert kinds == {"period": "int", "scale": "float", "mode": "categorical"}
    assert main(["tune", "--strategy", toy_strategy, "--study", "toy", "--out", str(tmp_path), "--trials", "2",
                 "--steps", "200", *BENCH]) == 0
    trials = load(str(tmp_path / "toy.journal"), "toy").trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert all(t.params["mode"] in ("a", "b") and 10 <= t.params["period"] <= 100 for t in trials)
    config = json.loads((tmp_path / "toy" / "trial-1" / "config.json").read_text())
    assert config["strategy"] == toy_strategy and config["settings"]["period"] == trials[1].params["period"]


# -- objectives and the trial -------------------------------------------------------------------------------


def test_objective_directions_follow_the_task_type_and_unknown_names_are_listed():
    assert directions(["late_window"], "bit-flipping") == ["minimize"]
    assert directions(["late_window", "effective_rank"], "permuted-mnist") == ["maximize", "maximize"]
    with pytest.raises(ConfigError, match="valid objectives: late_window, plasticity_loss, effective_rank"):
        parse_objectives("late_window,accuracy")
    with pytest.raises(ConfigError, match="needs the probe"):
        directions(["dead_fraction"], "bit-flipping", {"probe": "false"})
    # summarize orients plasticity loss (> 0: lost) for losses and accuracies alike; studies take it as it is
    summary = {"performance_metric": "loss", "plasticity_loss": 0.5, "late_window": 1.5}
    assert objective_values(summary, ["plasticity_loss", "late_window"]) == [0.5, 1.5]
    assert objective_values({**summary, "performance_metric": "accuracy", "plasticity_loss": 0.2},
                            ["plasticity_loss"]) == [0.2]


def test_on_row_sees_every_row_and_an_exception_it_raises_stops_the_run(tmp_path):
    spec = dst.runner.RunSpec("bit-flipping", "cbp", steps=500, bench={"bin_size": 100, "probe_size": 50, "hidden": (5,)})
    seen: list[list[dict]] = []
    rows = dst.runner.run(spec, progress=False, on_row=seen.append)
    assert [len(members) for members in seen] == [1] * 5  # a population of one: one row per bin
    assert [members[0]["step"] for members in seen] == list(rows["step"]) == [100, 200, 300, 400, 500]

    def stop(members):
        if members[0]["step"] == 200:
            raise optuna.TrialPruned("enough")

    with pytest.raises(optuna.TrialPruned):
        dst.runner.run(spec, tmp_path / "run", progress=False, on_row=stop)
    assert list(pd.read_csv(tmp_path / "run" / "metrics.csv")["step"]) == [100, 200]


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_trial_reports_every_bin_but_is_pruned_only_after_the_warmup(tmp_path):
    space = build_space("cbp", "bit-flipping", bench={"bin_size": "100", "probe_size": "50", "hidden": "5"})
    settings = StudySettings("cbp", "bit-flipping", steps=600, seed=0, seeds=2, objectives=("late_window",),
                             directions=("minimize",), space=space.to_dict(), pruner="median", warmup=0.5)
    study = optuna.create_study(pruner=AlwaysPrune(), study_name="p")
    study.optimize(TrialObjective(settings, tmp_path, target=10), n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert sorted(trial.intermediate_values) == [100, 200, 300]  # pruned at the first bin at or after 50%
    assert len(pd.read_csv(tmp_path / "p" / "trial-0" / "seed-0" / "metrics.csv")) == 3


class PruneFrom(optuna.pruners.BasePruner):
    """Prunes every trial from its cumulative step ``step`` on."""

    def __init__(self, step: int) -> None:
        self.step = step

    def prune(self, study, trial) -> bool:
        return trial.last_step is not None and trial.last_step >= self.step


@pytest.mark.parametrize("seeds", [1, 2])
def test_a_trial_that_ran_all_its_steps_completes_even_if_the_pruner_says_prune(tmp_path, seeds):
    space = build_space("cbp", "bit-flipping", bench={"bin_size": "100", "probe_size": "50", "hidden": "5"})
    settings = StudySettings("cbp", "bit-flipping", steps=200, seed=0, seeds=seeds, objectives=("late_window",),
                             directions=("minimize",), space=space.to_dict(), pruner="median", warmup=0.5)
    assert settings.population == (seeds > 1)  # 2 seeds train together: the trial's last step is 200
    study = optuna.create_study(pruner=PruneFrom(200), study_name="last")  # prunes at the last step only
    study.optimize(TrialObjective(settings, tmp_path, target=10), n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert max(trial.intermediate_values) == 200  # the last row was reported, and judged
    trial_0 = tmp_path / "last" / "trial-0"
    runs = [trial_0] if seeds == 1 else [trial_0 / f"seed-{seed}" for seed in range(seeds)]
    values = [objective_values(json.loads((run / "summary.json").read_text()), ["late_window"])[0] for run in runs]
    assert trial.value == pytest.approx(sum(values) / len(values))


# -- tune, continue, report ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def journal_study(tmp_path_factory) -> Path:
    """A finished 3-trial study on the default journal storage (shared; tests copy it before changing it)."""
    out = tmp_path_factory.mktemp("journal")
    assert main(tune(out)) == 0
    return out


def test_tune_runs_a_study_on_the_journal_and_records_its_settings(journal_study):
    study = load(str(journal_study / "s.journal"))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    attrs = study.user_attrs
    assert (attrs["strategy"], attrs["benchmark"], attrs["steps"], attrs["objectives"]) == ("cbp", "bit-flipping", 400, ["late_window"])
    assert {p["name"] for p in attrs["space"]["params"]} == {"replacement_rate", "maturity_threshold", "decay_rate"}
    for trial in study.trials:
        rows = pd.read_csv(journal_study / "s" / f"trial-{trial.number}" / "metrics.csv")
        assert sorted(trial.intermediate_values) == list(rows["step"]) == [100, 200, 300, 400]
        assert trial.value == pytest.approx(rows["loss"].iloc[-1])  # late window of 4 rows: the last one


def test_report_writes_best_trials_importances_plots_and_markdown(journal_study, tmp_path, capsys):
    assert main(["report", "--study", "s", "--out", str(journal_study)]) == 0
    assert "optuna-dashboard" in capsys.readouterr().out
    best = json.loads((journal_study / "best.json").read_text())
    study = load(str(journal_study / "s.journal"))
    assert best["best"]["number"] == study.best_trial.number and best["best"]["params"] == study.best_trial.params
    assert best["best"]["bench"]["bin_size"] == 100
    assert len(pd.read_csv(journal_study / "trials.csv")) == 3
    importances = pd.read_csv(journal_study / "importances.csv")
    assert set(importances["param"]) == {"replacement_rate", "maturity_threshold", "decay_rate"}
    for name in ("history.png", "params.png"):
        data = (journal_study / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1024
    assert "![history](history.png)" in (journal_study / "report.md").read_text()
    # and a study with a single trial says why it has no importances
    assert main(tune(tmp_path, trials=1, study="one")) == 0
    assert main(["report", "--study", "one", "--out", str(tmp_path)]) == 0
    assert "at least 2 completed trials" in (tmp_path / "report.md").read_text()


def test_rerunning_tune_continues_the_study_to_the_new_target(journal_study, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(journal_study, out)
    before = load(str(out / "s.journal")).trials
    capsys.readouterr()
    assert main(tune(out, trials=5)) == 0
    assert "3 of 5 trials finished, 0 running; 2 to run" in capsys.readouterr().out
    after = load(str(out / "s.journal")).trials
    assert len(after) == 5 and all(t.state in FINISHED for t in after)
    assert [(t.params, t.value) for t in after[:3]] == [(t.params, t.value) for t in before]
    assert main(tune(out, trials=5)) == 0 and len(load(str(out / "s.journal")).trials) == 5  # target reached
    message = error_of(tune(out, trials=6, steps=800), capsys)
    assert "created with other settings; steps: recorded 400, given 800" in message
    assert len(load(str(out / "s.journal")).trials) == 5  # nothing ran, nothing was lost


def test_a_new_study_refuses_the_run_directories_of_a_deleted_one_and_says_what_to_do(tmp_path, capsys):
    assert main(tune(tmp_path, trials=1, steps=200)) == 0
    (tmp_path / "s.journal").unlink()  # starting over: the old runs are still in OUT/s/trial-N
    message = error_of(tune(tmp_path, trials=1, steps=200), capsys)
    assert "already holds a run of an earlier study named 's'" in message
    assert "another --out or --study" in message
    assert "--resume" not in message  # `studies` has no --resume: dst's hint would be a dead end
    assert len(pd.read_csv(tmp_path / "s" / "trial-0" / "metrics.csv")) == 2  # nothing was overwritten


def test_multi_objective_study_is_not_pruned_and_reports_a_pareto_front(tmp_path, capsys):
    assert main(tune(tmp_path, "--objective", "late_window,seconds_per_step", trials=2, steps=200)) == 0
    assert "not pruned" in capsys.readouterr().out
    study = load(str(tmp_path / "s.journal"))
    assert len(study.directions) == 2 and "cannot prune" in study.user_attrs["pruning"]
    assert all(not t.intermediate_values for t in study.trials)
    assert main(["report", "--study", "s", "--out", str(tmp_path)]) == 0
    best = json.loads((tmp_path / "best.json").read_text())
    assert {r["number"] for r in best["pareto_front"]} == {t.number for t in study.best_trials}
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"


# -- a resumed seeded study continues its sampler's sequence ------------------------------------------------

SEQUENCE = 5  # trials of the seeded studies below


class QuickTPE(optuna.samplers.TPESampler):
    """TPE that models the results from its third trial on (Optuna's default waits for 10)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(n_startup_trials=2, **kwargs)


def quick_models(patch: pytest.MonkeyPatch) -> None:
    """TPE proper and the median pruner both act within a few trials (the pruner from the second one)."""
    patch.setattr(optuna.samplers, "TPESampler", QuickTPE)
    patch.setattr(studies.study, "STARTUP_TRIALS", 1)


def seeded(out: Path, sampler: str, *extra: str, trials: int = SEQUENCE) -> list[str]:
    return tune(out, "--sampler", sampler, *extra, trials=trials, steps=300)


def finished_trials(out: Path) -> list[tuple]:
    """(params, state, value, intermediate values) of the finished trials in the order they were numbered."""
    return [(t.params, t.state, t.value, t.intermediate_values) for t in load(str(out / "s.journal")).trials
            if t.state in FINISHED]


def distinct(params: list[dict]) -> bool:
    return len({json.dumps(p, sort_keys=True) for p in params}) == len(params)


def test_a_seeded_trial_draws_from_its_sample_index_whatever_the_runs_brackets_or_queued_trials():
    def objective(trial: optuna.Trial) -> float:
        value = trial.suggest_float("x", 0.0, 1.0) + trial.suggest_int("n", 1, 100)
        trial.report(value, 1)
        trial.should_prune()  # Hyperband's first judgement splits the trials into brackets
        return value

    def study(storage: optuna.storages.BaseStorage) -> optuna.Study:  # a new sampler, as in a new process
        return optuna.create_study(storage=storage, study_name="t", load_if_exists=True,
                                   sampler=make_sampler("random", 7, storage),
                                   pruner=optuna.pruners.HyperbandPruner(1, 81))  # the sampler sees one bracket

    one_go = optuna.storages.InMemoryStorage()
    study(one_go).optimize(objective, n_trials=12)
    in_parts = optuna.storages.InMemoryStorage()
    study(in_parts).enqueue_trial({"x": 0.5, "n": 3})
    study(in_parts).optimize(objective, n_trials=5)
    study(in_parts).optimize(objective, n_trials=8)
    trials = study(in_parts).trials
    assert trials[0].params == {"x": 0.5, "n": 3}  # the queued trial took no index: the sampled ones are as in one go
    assert [t.params for t in trials[1:]] == [t.params for t in study(one_go).trials]
    assert distinct([t.params for t in trials])  # was: the second part replayed the first's draws


@pytest.fixture(scope="module")
def in_one_go(tmp_path_factory) -> Callable[[str], list[tuple]]:
    """``finished_trials`` of the seeded study of SEQUENCE trials run in one go, per sampler (run once)."""
    runs: dict[str, list[tuple]] = {}

    def get(sampler: str) -> list[tuple]:
        if sampler not in runs:
            out = tmp_path_factory.mktemp(f"one-go-{sampler}")
            with pytest.MonkeyPatch.context() as patch:
                quick_models(patch)
                assert main(seeded(out, sampler)) == 0
            runs[sampler] = finished_trials(out)
        return runs[sampler]

    return get


def stopping_at(number: int, stop: Callable[[], None]) -> Callable[..., pd.DataFrame]:
    """``studies.trial.run`` that calls ``stop()`` when trial ``number`` starts its run (its settings sampled)."""
    real = studies.trial.run

    def run(spec, out_dir, **kwargs):
        if Path(out_dir).name == f"trial-{number}":
            stop()
        return real(spec, out_dir, **kwargs)

    return run


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_seeded_study_extended_in_a_later_run_ends_with_the_trials_of_one_run_in_one_go(
        sampler, in_one_go, tmp_path, monkeypatch):
    quick_models(monkeypatch)
    # stopped after TPE's two random startup trials and its first modelled one, then extended
    assert main(seeded(tmp_path, sampler, trials=3)) == 0
    assert main(seeded(tmp_path, sampler)) == 0  # a new process would build a new sampler the same way
    resumed, one_go = finished_trials(tmp_path), in_one_go(sampler)
    assert [t[0] for t in resumed] == [t[0] for t in one_go]  # was: trials 3, 4 drew trial 0's and 1's (random)
    assert resumed == one_go  # so the same states, values and pruning decisions
    assert distinct([t[0] for t in resumed])
    if sampler == "tpe":  # TPE proper (from trial 2) and the pruner were exercised
        assert any(state == optuna.trial.TrialState.PRUNED for _, state, _, _ in resumed)


def test_a_killed_trial_requeued_leaves_the_seeded_sequence_as_in_one_go(in_one_go, tmp_path, monkeypatch):
    quick_models(monkeypatch)

    def dies_at_trial_3() -> None:  # a worker killed mid-trial (forked: the patch stays in the child)
        studies.trial.run = stopping_at(3, lambda: os._exit(9))
        main(seeded(tmp_path, "tpe"))

    process = multiprocessing.get_context("fork").Process(target=dies_at_trial_3)
    process.start()
    try:
        process.join(timeout=60)
    finally:
        process.kill()
        process.join()
    assert process.exitcode == 9
    killed = load(str(tmp_path / "s.journal")).trials[3]
    assert killed.state == RUNNING and killed.params == in_one_go("tpe")[3][0]
    assert main(seeded(tmp_path, "tpe", "--requeue-running")) == 0
    trials = load(str(tmp_path / "s.journal")).trials
    assert trials[4].system_attrs["failed_trial"] == 3 and trials[4].params == killed.params
    assert finished_trials(tmp_path) == in_one_go("tpe")  # the retry took no place in the sampled sequence


def test_a_seeded_study_interrupted_mid_trial_proposes_new_settings_on_rerun(in_one_go, tmp_path, monkeypatch):
    quick_models(monkeypatch)

    def interrupt() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(studies.trial, "run", stopping_at(1, interrupt))
    assert main(seeded(tmp_path, "random", trials=SEQUENCE - 1)) == 130
    monkeypatch.setattr(studies.trial, "run", dst.runner.run)
    assert main(seeded(tmp_path, "random", trials=SEQUENCE - 1)) == 0
    trials = load(str(tmp_path / "s.journal")).trials
    assert trials[1].state == FAIL and distinct([t.params for t in trials])  # was: the rerun replayed trial 0
    one_go = [t[0] for t in in_one_go("random")]
    # random draws depend on the sampled trial's index alone: the interrupted trial's settings are not
    # proposed again, the rerun goes on with those of the next indices
    assert trials[1].params == one_go[1] and [t[0] for t in finished_trials(tmp_path)] == one_go[:1] + one_go[2:]


# -- dead workers, parallel workers -------------------------------------------------------------------------


def kill_tune_mid_trial(storage: str, argv: list[str]) -> optuna.trial.FrozenTrial:
    """Run ``studies tune argv`` in a forked process (it starts in milliseconds: the imports are done) and
    kill it with SIGKILL in the middle of a trial; returns that trial as it was just before the kill."""
    process = multiprocessing.get_context("fork").Process(target=main, args=(argv,))
    process.start()
    try:
        killed = running_trial_with_a_bin(load(storage), {process.pid}, process.is_alive)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.join(timeout=30)
    return killed


def test_killed_trial_is_failed_requeued_and_the_study_reaches_its_target(tmp_path):
    url = f"sqlite:///{tmp_path / 'k.db'}"  # an RDB storage, so trials send heartbeats
    options = ("--storage", url, "--heartbeat-interval", "1", "--grace-period", "2")
    assert main(tune(tmp_path, *options, trials=1, steps=1000)) == 0  # one finished trial first
    first = load(url).trials[0]
    killed = kill_tune_mid_trial(url, tune(tmp_path, *options, trials=2, steps=1000))
    assert load(url).trials[killed.number].state == optuna.trial.TrialState.RUNNING  # left behind by the kill
    assert main(tune(tmp_path, *options, trials=2, steps=1000)) == 0  # fails the dead trial, runs it again
    trials = load(url).trials
    assert (trials[0].params, trials[0].value) == (first.params, first.value)
    assert trials[killed.number].state == optuna.trial.TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].params == killed.params and retried[0].state in FINISHED
    assert sum(t.state in FINISHED for t in trials) == 2


def test_tune_fails_and_names_the_fix_while_a_killed_worker_holds_a_trial_on_journal_storage(
        journal_study, tmp_path, capsys):
    out = copy_study(journal_study, tmp_path)
    journal = str(out / "s.journal")
    killed = kill_tune_mid_trial(journal, tune(out, trials=4))
    before = load(journal).trials
    assert before[killed.number].state == RUNNING  # journal storage has no heartbeat to free it
    capsys.readouterr()
    message = error_of(tune(out, trials=4), capsys, status=1)  # was: exit 0 with 3 of 4 trials
    assert "has 3 of 4 finished trials" in message and f"trial {killed.number} (worker " in message
    assert "no longer runs on this machine (killed mid-trial)" in message and "--requeue-running" in message
    assert [(t.state, t.value) for t in load(journal).trials] == [(t.state, t.value) for t in before]  # untouched
    assert main(tune(out, "--requeue-running", trials=4)) == 0
    trials = load(journal).trials
    assert trials[killed.number].state == FAIL and sum(t.state in FINISHED for t in trials) == 4
    assert trials[-1].system_attrs["failed_trial"] == killed.number and trials[-1].state in FINISHED
    assert trials[-1].params == killed.params


def test_tune_fails_saying_a_worker_elsewhere_may_still_finish_its_trial(journal_study, tmp_path, capsys):
    out = copy_study(journal_study, tmp_path)
    ask_running(out, "another-machine:4242")
    message = error_of(tune(out, trials=4), capsys, status=1)
    assert "3 of 4 finished trials" in message and "trial 3 (worker another-machine:4242)" in message
    assert "may still be running it: wait for that worker to finish" in message and "--requeue-running" in message
    assert len(load(str(out / "s.journal")).trials) == 4  # nothing started, nothing failed


def test_tune_waits_for_a_live_worker_and_takes_over_when_its_trial_fails(journal_study, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="studies")
    out = copy_study(journal_study, tmp_path)
    other = subprocess.Popen(["sleep", "60"])  # the process of another worker on this machine
    theirs = ask_running(out, f"{socket.gethostname()}:{other.pid}")
    # that worker is interrupted after a while: Optuna marks its trial FAIL
    interrupt = threading.Timer(1.5, lambda: load(str(out / "s.journal")).tell(theirs.number, state=FAIL))
    interrupt.start()
    try:
        assert main(tune(out, trials=4)) == 0  # was: exit 0 at once, 3 of 4 trials
    finally:
        interrupt.cancel()
        other.kill()
        other.wait()
    trials = load(str(out / "s.journal")).trials
    assert trials[theirs.number].state == FAIL and sum(t.state in FINISHED for t in trials) == 4
    assert f"waiting for trial {theirs.number} (worker" in caplog.text


def test_requeue_running_leaves_alone_a_trial_whose_worker_still_runs_on_this_machine(journal_study, tmp_path):
    out = copy_study(journal_study, tmp_path)
    other, gone = subprocess.Popen(["sleep", "60"]), subprocess.Popen(["true"])
    gone.wait()
    try:
        live = ask_running(out, f"{socket.gethostname()}:{other.pid}")
        dead = ask_running(out, f"{socket.gethostname()}:{gone.pid}")
        assert requeue_running(load(str(out / "s.journal"))) == [dead.number]
    finally:
        other.kill()
        other.wait()
    trials = load(str(out / "s.journal")).trials
    assert (trials[live.number].state, trials[dead.number].state) == (RUNNING, FAIL)
    assert trials[-1].state == optuna.trial.TrialState.WAITING  # queued again, for the next worker
    assert trials[-1].system_attrs["failed_trial"] == dead.number


@pytest.fixture(scope="module")
def postgres_url():
    server = PostgresServer()
    if not server.available:
        if os.environ.get("DST_SKIP_POSTGRES") == "1":
            pytest.skip("DST_SKIP_POSTGRES=1: PostgreSQL tests skipped")
        pytest.fail(MISSING_MESSAGE)
    with server as url:
        yield url


def test_two_workers_on_postgresql_complete_the_target_together(postgres_url, tmp_path):
    assert main(tune(tmp_path, "--storage", postgres_url, trials=1, steps=800, study="pg")) == 0
    workers = [python_m_studies("worker", "--study", "pg", "--storage", postgres_url, "--trials", "6",
                                "--threads", "1") for _ in range(2)]
    try:
        outputs = [w.communicate(timeout=120)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert [w.returncode for w in workers] == [0, 0], outputs
    trials = load(postgres_url, "pg").trials
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == 6 and len({t.number for t in trials}) == len(trials)
    by_worker = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in finished[1:]}
    assert by_worker == {str(w.pid) for w in workers}, outputs


@pytest.mark.slow  # ~25 s; the default suite kills a trial on the journal file and runs two workers on PostgreSQL
def test_a_worker_killed_mid_trial_on_postgresql_loses_and_repeats_nothing(postgres_url, tmp_path):
    beats = ("--heartbeat-interval", "1", "--grace-period", "2")
    assert main(tune(tmp_path, "--storage", postgres_url, "--pruner", "none", *beats, trials=1, steps=400,
                     study="kill")) == 0
    workers = [python_m_studies("worker", "--study", "kill", "--storage", postgres_url, "--trials", "4",
                                "--threads", "1", *beats) for _ in range(2)]
    study = load(postgres_url, "kill")
    try:  # kill a worker mid-trial after it completed one: that one must survive
        killed = running_trial_with_a_bin(study, {w.pid for w in workers},
                                          lambda: all(w.poll() is None for w in workers), worker_completed_one=True)
        before = {t.number: (t.state, t.value) for t in study.get_trials(states=(COMPLETE,))}
        victim = next(w for w in workers if killed.user_attrs["worker"] == f"{socket.gethostname()}:{w.pid}")
        survivor = next(w for w in workers if w is not victim)
        victim.send_signal(signal.SIGKILL)
        output = survivor.communicate(timeout=60)[0]
    finally:
        for w in workers:
            w.kill()
            w.wait()
    assert victim.returncode == -signal.SIGKILL and survivor.returncode == 0, output
    trials = load(postgres_url, "kill").trials
    assert trials[killed.number].state == FAIL  # the heartbeat went silent: failed by the survivor ...
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert [(t.state, t.params) for t in retried] == [(COMPLETE, killed.params)]  # ... re-queued, run once
    assert {t.number: (t.state, t.value) for t in trials if t.number in before} == before  # none lost
    complete = [t for t in trials if t.state == COMPLETE]
    assert len(complete) == 4 and len({json.dumps(t.params, sort_keys=True) for t in complete}) == 4


def test_a_storage_that_stops_answering_mid_run_is_a_one_line_error_and_keeps_finished_trials(tmp_path, capsys,
                                                                                               monkeypatch):
    url = f"sqlite:///{tmp_path / 'lost.db'}"
    assert main(tune(tmp_path, "--storage", url, trials=1, steps=200)) == 0
    first = load(url).trials[0]

    def server_gone(*args, **kwargs):  # what psycopg2 raises through SQLAlchemy once the server is down
        raise sqlalchemy.exc.OperationalError("INSERT ...", {},
                                              Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_intermediate_value", server_gone)
    message = error_of(tune(tmp_path, "--storage", url, trials=2, steps=200), capsys)  # was: a traceback
    assert f"lost the study storage {url} mid-run: server closed the connection unexpectedly" in message
    assert "rerun the same command" in message and len(message.strip().splitlines()) == 1
    monkeypatch.undo()
    kept = load(url).trials[0]
    assert (kept.state, kept.value) == (COMPLETE, first.value)


@pytest.mark.slow
def test_a_postgresql_server_stopped_mid_trial_and_restarted_continues_the_study(tmp_path, capsys):
    server = PostgresServer()
    if not server.available:
        pytest.skip(MISSING_MESSAGE)
    with server as url:
        options = ("--storage", url, "--heartbeat-interval", "1", "--grace-period", "2")
        assert main(tune(tmp_path, *options, trials=1, steps=3000)) == 0
        argv = tune(tmp_path, *options, trials=2, steps=3000)
        first = load(url).trials[0]
        result: list[int] = []
        run = threading.Thread(target=lambda: result.append(main(argv)))
        run.start()
        study = load(url)
        cut = running_trial_with_a_bin(study, {os.getpid()}, run.is_alive)
        server.halt()
        run.join(timeout=60)
        assert result == [2]
        assert "lost the study storage" in capsys.readouterr().err
        server.resume()
        assert main(argv) == 0  # the cut trial's heartbeat is stale: it is failed and run again
        trials = load(url).trials
    assert (trials[0].state, trials[0].value) == (COMPLETE, first.value)
    assert trials[cut.number].state == FAIL
    assert [(t.state, t.params) for t in trials if t.system_attrs.get("failed_trial") == cut.number] == [
        (COMPLETE, cut.params)]
    assert sum(t.state == COMPLETE for t in trials) == 2


# -- clear errors -------------------------------------------------------------------------------------------


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    assert "unknown strategy 'nope'; available: bp, cbp" in error_of(tune(tmp_path, "--strategy", "nope"), capsys)
    assert "unknown parameter 'nope'" in error_of(tune(tmp_path, "--param", "nope=1:2"), capsys)
    assert "valid objectives: late_window" in error_of(tune(tmp_path, "--objective", "late"), capsys)
    assert "--sampler-seed must be a non-negative integer, got -1" in error_of(tune(tmp_path, "--sampler-seed", "-1"), capsys)
    assert "valid range of maturity_threshold, which is [0, inf]" in error_of(
        tune(tmp_path, "--param", "maturity_threshold=-5:10"), capsys)
    assert "SQLite takes one process at a time" in error_of(
        ["worker", "--study", "s", "--storage", f"sqlite:///{tmp_path / 'x.db'}"], capsys)
    assert "journal file" in error_of(tune(tmp_path, "--storage", f"sqlite:///{tmp_path / 'x.db'}", "--workers", "2"), capsys)
    started = time.monotonic()
    message = error_of(tune(tmp_path, "--storage", "postgresql://nobody@127.0.0.1:1/x"), capsys)
    assert time.monotonic() - started < 10
    assert "cannot open study storage postgresql://nobody@127.0.0.1:1/x" in message and "server is running" in message
    assert "no study storage at" in error_of(["worker", "--study", "s", "--out", str(tmp_path / "none")], capsys)
    assert not list(tmp_path.glob("*.journal"))  # no failed command left a storage behind


def test_a_plasticity_loss_study_on_runs_too_short_for_two_windows_says_why_without_a_traceback(tmp_path, capfd):
    # 300 steps in bins of 100 with tasks of 200: one row after the first task, so the windows coincide
    assert main(tune(tmp_path, "--objective", "plasticity_loss", trials=1, steps=300)) == 2
    output = "".join(capfd.readouterr())  # file-descriptor level: Optuna's log handler holds the real stderr
    assert "no value for plasticity_loss" in output and "a late window that do not overlap" in output
    assert "Traceback" not in output  # optuna's failed-trial warning keeps its message, not its traceback
