"""Comparisons train each arm's seeds as populations: the same run folders as one process per run."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import dst.runner
from comparisons.cli import main
from comparisons.execute import Job, Population, execute_population, populations
from dst.runner import RunSpec

TINY = ["--bench", "bin_size=200", "--bench", "change_every=200", "--bench", "hidden=8",
        "--bench", "probe_size=50", "--steps", "600", "--no-progress", "--workers", "1"]
ARMS = ["--strategies", "bp,cbp", "--set", "cbp.replacement_rate=1e-2", "--seeds", "3"]
TIMING = ["seconds", "seconds_per_step", "probe_seconds"]


def _runs(out: Path) -> dict[str, pd.DataFrame]:
    return {str(p.parent.relative_to(out)): pd.read_csv(p).drop(columns=TIMING) for p in out.glob("runs/*/seed-*/metrics.csv")}


def test_population_runs_write_the_folders_one_process_per_run_writes(tmp_path, capsys):
    assert main([*ARMS, *TINY, "--out", str(tmp_path / "pop")]) == 0
    assert "6 runs (0 already finished, 0 to resume): 2 population(s) on 1 worker process(es)" in capsys.readouterr().out
    assert main([*ARMS, *TINY, "--population", "off", "--out", str(tmp_path / "single")]) == 0
    assert ": 6 run(s) on 1 worker process(es)" in capsys.readouterr().out
    together, alone = _runs(tmp_path / "pop"), _runs(tmp_path / "single")
    assert sorted(together) == sorted(alone) and len(together) == 6
    for name, rows in together.items():
        assert rows["units_replaced"].tolist() == alone[name]["units_replaced"].tolist()
        np.testing.assert_allclose(rows["loss"], alone[name]["loss"], rtol=1e-5)
    assert sum(rows["units_replaced"].sum() for name, rows in together.items() if name.startswith("runs/cbp")) > 0
    assert not list((tmp_path / "pop").glob("runs/*/.population-*"))  # removed once finished
    summaries = pd.read_csv(tmp_path / "pop" / "summary.csv"), pd.read_csv(tmp_path / "single" / "summary.csv")
    assert summaries[0]["arm"].tolist() == summaries[1]["arm"].tolist()


def _jobs(out: Path, strategy: str, seeds, benchmark: str = "bit-flipping") -> list[Job]:
    spec = RunSpec(benchmark, strategy, steps=400, device="cpu")
    return [Job(strategy, seed, out / strategy / f"seed-{seed}", spec) for seed in seeds]


def test_each_arm_becomes_enough_populations_for_the_workers_and_unbatchable_runs_stay_single(tmp_path):
    jobs = _jobs(tmp_path, "bp", range(5)) + _jobs(tmp_path, "cbp", range(5))
    units = populations(jobs, workers=2)
    assert [(unit.label, unit.seeds) for unit in units] == [("bp", (0, 1, 2, 3, 4)), ("cbp", (0, 1, 2, 3, 4))]
    units = populations(jobs[:5], workers=2)  # one arm, two workers: two populations
    assert [unit.seeds for unit in units] == [(0, 1, 2), (3, 4)]
    assert populations(jobs[:1], workers=2) == jobs[:1]  # one seed left: a plain run
    imagenet = _jobs(tmp_path, "bp", range(2), benchmark="continual-imagenet")
    assert populations(imagenet, workers=1) == imagenet
    assert Population("bp", tuple(jobs[i] for i in (0, 2))).out_dir.name.startswith(".population-")
    assert Population("bp", tuple(jobs[:3])).out_dir == tmp_path / "bp" / ".population-0-2"


def test_an_interrupted_population_resumes_from_its_checkpoint(tmp_path):
    bench = {"bin_size": 100, "change_every": 100, "hidden": 8, "probe": False}
    spec = RunSpec("bit-flipping", "cbp", steps=400, device="cpu", checkpoint_every=100, bench=bench,
                   settings={"replacement_rate": 1e-2})
    jobs = tuple(Job("cbp", seed, tmp_path / "runs" / "cbp" / f"seed-{seed}", spec) for seed in (0, 1))
    population = Population("cbp", jobs)
    straight = dst.runner.run(RunSpec(**{**spec.__dict__, "seeds": (0, 1)}), progress=False)
    # as if killed after 2 of 4 bins: the population's checkpoint and the members' rows so far
    half = RunSpec(**{**spec.__dict__, "seeds": (0, 1), "steps": 200})
    dst.runner.run(half, population.out_dir, member_dirs=[job.out_dir for job in jobs], progress=False)
    for job in jobs:
        (job.out_dir / "summary.json").unlink()
    resumed = []
    real = dst.runner.run

    def spy(*args, **kwargs):
        resumed.append(kwargs["resume"])
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dst.runner, "run", spy)
        outcomes = execute_population(population)
    assert resumed == [True] and [o.status for o in outcomes] == ["finished", "finished"]
    for job, rows in zip(jobs, straight):
        written = pd.read_csv(job.out_dir / "metrics.csv")
        assert written["units_replaced"].tolist() == rows["units_replaced"].tolist()
        np.testing.assert_allclose(written["loss"], rows["loss"], rtol=1e-6)
    assert not population.out_dir.exists()


def test_a_diverging_member_of_a_population_is_reported_failed_and_the_others_finish(tmp_path, monkeypatch):
    spec = RunSpec("bit-flipping", "bp", steps=600, device="cpu",
                   bench={"bin_size": 200, "change_every": 200, "hidden": 8, "probe": False})
    jobs = tuple(Job("bp", seed, tmp_path / "bp" / f"seed-{seed}", spec) for seed in (0, 1, 2))
    real = dst.runner.run
    # member 1 gets a step size that diverges (per-member lr, as the population spec allows)
    monkeypatch.setattr(dst.runner, "run", lambda s, *a, **k: real(
        RunSpec(**{**s.__dict__, "bench": {**s.bench, "lr": "0.01,50.0,0.01"}}), *a, **k))
    outcomes = execute_population(Population("bp", jobs))
    assert [o.status for o in outcomes] == ["finished", "failed", "finished"]
    assert "seed 1" in outcomes[1].error and "loss became" in outcomes[1].error
    assert (jobs[0].out_dir / "summary.json").exists() and not (jobs[1].out_dir / "summary.json").exists()


def _summary_row(arm, strategy, late, loss, dead, rank, n=30):
    row = {"arm": arm, "strategy": strategy, "density": 1.0, "n": n, "performance_metric": "loss"}
    for key, (mean, low, high) in {"late_window": late, "plasticity_loss": loss, "final_dead_fraction": dead,
                                   "final_effective_rank": rank}.items():
        row.update({f"{key}_mean": mean, f"{key}_low": low, f"{key}_high": high})
    return row


def test_verdict_states_each_finding_from_the_intervals():
    from comparisons.report import verdict

    summary = pd.DataFrame([
        _summary_row("bp (dense)", "bp", (0.87, 0.74, 1.0), (0.24, 0.10, 0.39), (0.59, 0.51, 0.67), (1.5, 1.2, 1.7)),
        _summary_row("cbp (dense)", "cbp", (0.49, 0.42, 0.57), (0.01, -0.06, 0.08), (0.07, 0.03, 0.10), (3.7, 3.6, 3.9)),
        _summary_row("l2 (dense)", "bp", (0.80, 0.70, 0.90), (-0.2, -0.3, -0.1), (0.5, 0.4, 0.6), (1.6, 1.3, 1.8)),
    ])
    text = verdict(summary)
    assert text.startswith("bp (dense) lost plasticity (plasticity loss 0.2400 [0.1000, 0.3900]: the 95% CI is above 0).")
    assert ("cbp (dense) did not measurably lose plasticity (plasticity loss 0.0100 [-0.0600, 0.0800]: the 95% CI "
            "includes 0); its late-window loss is below bp (dense)'s (0.4900 [0.4200, 0.5700] against 0.8700 "
            "[0.7400, 1.0000], disjoint 95% CIs); its final dead fraction is below") in text
    assert "its final effective rank is above bp (dense)'s (3.7000 [3.6000, 3.9000]" in text
    assert "l2 (dense) got better from the early to the late window" in text
    assert "its late-window loss is not told apart from bp (dense)'s" in text
    assert verdict(summary[summary["arm"] != "bp (dense)"]) != ""  # l2 is a dense bp arm: the baseline
    assert verdict(summary[summary["strategy"] != "bp"]) == ""  # no backprop arm: nothing to state


@pytest.mark.parametrize("name", ["quick", "paper-bit-flipping", "sparse-bit-flipping"])  # MNIST ones need the data
def test_every_bit_flipping_preset_resolves_before_anything_runs(name):
    from comparisons.presets import preset
    from comparisons.spec import resolve

    for comparison in preset(name):
        arms = resolve(comparison)
        assert arms and all(arm.spec.benchmark == comparison.benchmark for arm in arms)


def test_the_paper_presets_hold_the_papers_protocols():
    from comparisons.presets import preset
    from comparisons.spec import resolve

    (flipping,) = preset("paper-bit-flipping")
    assert (flipping.steps, len(flipping.seeds)) == (1_000_000, 100)
    arms = {arm.label: arm.spec for arm in resolve(flipping)}
    assert [spec.strategy for spec in arms.values()] == ["bp", "cbp", "shrink-perturb", "bp", "bp"]
    widths = [tuple(spec.bench["hidden"]) for spec in arms.values()]
    assert widths == [(5,), (5,), (5,), (5,), ()]  # the linear learner has no hidden layer
    assert all(spec.bench["lr"] == 0.01 and spec.bench["bin_size"] == 20_000 for spec in arms.values())
    (narrow,) = preset("paper-permuted-mnist-narrow")
    assert len(narrow.seeds) == 10
    for arm in narrow.arms:  # as given (resolving them reads MNIST)
        bench = arm.bench
        assert (tuple(bench["hidden"]), bench["lr"], bench["batch_size"]) == ((100, 100, 100), 0.003, 1)
        assert (bench["examples_per_task"], bench["tasks"]) == (10_000, 100)
    (quick,) = preset("quick")
    assert (quick.steps, len(quick.seeds), [a.strategy for a in quick.arms]) == (400_000, 30, ["bp", "cbp"])


def test_the_methods_preset_runs_every_registered_method_at_its_defaults_on_both_protocols():
    from comparisons.presets import preset
    from comparisons.spec import resolve
    from dst import strategies

    flipping, mnist = preset("methods")
    assert (flipping.steps, len(flipping.seeds), len(mnist.seeds)) == (1_000_000, 10, 10)
    arms = {arm.label: arm.spec for arm in resolve(flipping)}
    compositions = {"cbp-rigl", "cbp-set", "cbp-srigl", "rigl-utility"}
    sparse = {"set", "rigl", "srigl"}  # connection-level methods: compared per weight budget (sparse-budget)
    topology_free = {"head-reset", "retrain"}  # task baselines: the class-incremental CIFAR preset has them
    methods = set(strategies.available()) - compositions - sparse - topology_free
    assert methods <= {spec.strategy for spec in arms.values()}
    assert arms["crelu (dense)"].bench["activation"] == "crelu" and arms["layer-norm (dense)"].bench["norm"] == "layer"
    assert all(not arm.settings for arm in flipping.arms if arm.strategy not in ("cbp", "plasticity-injection"))
    assert arms["plasticity-injection (dense)"].settings["head_layers"] == 1  # 20-5-1: the output layer
    for arm in mnist.arms:  # as given (resolving them reads MNIST)
        assert (tuple(arm.bench["hidden"]), arm.bench["examples_per_task"], arm.bench["batch_size"]) == ((100,) * 3, 10_000, 1)


def test_the_start_line_counts_the_members_of_a_population_with_a_checkpoint_as_resumable(tmp_path):
    from comparisons.api import prepare_comparison
    from comparisons.cli import _start_line
    from comparisons.presets import free_form

    comparison = free_form("bit-flipping", ["bp"], seeds=(0, 1, 2), steps=400, bench=["hidden=8"])
    prepared = prepare_comparison(comparison, tmp_path / "out")
    (population,) = populations(list(prepared.jobs), workers=1)
    population.out_dir.mkdir(parents=True)
    (population.out_dir / "checkpoint.pt").write_bytes(b"")  # only its presence is read here
    line = _start_line(prepared, 1, False, True)
    assert "3 runs (0 already finished, 3 to resume): 1 population(s)" in line


def test_estimate_measures_every_arm_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "est"
    assert main([*ARMS, "--bench", "hidden=8", "--steps", "5000", "--estimate", "--out", str(out), "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "estimate for" in printed and "3 seeds per arm as one population, 2 worker(s)" in printed
    lines = [line for line in printed.splitlines() if "ms/step" in line]
    assert [line.split()[0] for line in lines] == ["bp", "cbp"]
    assert all("x     5,000 steps" in line for line in lines)
    assert "of wall time" in printed and not out.exists()


def test_estimate_measures_on_one_thread_as_the_workers_train_and_restores_the_count(monkeypatch):
    import torch

    from comparisons import estimate as estimate_module
    from comparisons.api import prepare_comparison
    from comparisons.presets import free_form

    seen = []
    real = estimate_module.prepare
    monkeypatch.setattr(estimate_module, "prepare", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        comparison = free_form("bit-flipping", ["bp"], seeds=(0,), steps=2000, bench=["hidden=4"])
        estimate_module.estimate(prepare_comparison(comparison, "unused-out"), workers=1)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_estimate_times_an_unbatchable_arm_on_one_seed_counts_every_seed_and_stops_at_its_budget(monkeypatch):
    from comparisons import estimate as estimate_module
    from comparisons.api import prepare_comparison
    from comparisons.presets import free_form

    pytest.importorskip("gymnasium", reason='the rl extra (pip install -e ".[test,rl]") is not installed')
    specs = []
    real = estimate_module.prepare
    monkeypatch.setattr(estimate_module, "prepare", lambda spec, **k: specs.append(spec) or real(spec, **k))
    comparison = free_form("slippery-ant", ["bp"], seeds=(0, 1, 2), bench=["preset=smoke", "total_steps=5000",
                                                                        "change_time=1000"])
    table = estimate_module.estimate(prepare_comparison(comparison, "unused-out"), workers=2, budget=0.5)
    assert [spec.seeds for spec in specs] == [(0,)]  # one seed timed: slippery-ant runs one member per run
    (row,) = table.to_dict("records")
    assert row["runs"] == 3 and row["seconds"] == pytest.approx(row["seconds_per_step"] * 5000 * 3)
    assert table.attrs["wall_seconds"] == pytest.approx(row["seconds"] / 2)  # three runs over two workers


def test_the_report_counts_each_arms_weights_and_plots_performance_against_weights_and_cost(tmp_path):
    out = tmp_path / "budget"
    arms = ["--strategies", "bp,rigl", "--bench", "rigl.density=0.5", "--bench", "hidden=16", "--seeds", "2"]
    assert main([*arms, *TINY[:4], *TINY[6:], "--out", str(out)]) == 0  # (TINY without its hidden=8)
    summary = pd.read_csv(out / "summary.csv").set_index("strategy")
    assert summary.loc["bp", "weights"] == 20 * 16 + 16 * 1  # every connection weight, biases not counted
    assert abs(summary.loc["rigl", "weights"] - 336 * 0.5) <= 1  # ERK's exact per-layer counts, rounded
    assert (out / "budget.png").stat().st_size > 10_000
