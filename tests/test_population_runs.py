"""Population runs end to end: member s of ``--seeds`` is the run of seed s alone, one run directory each."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dst.cli import main
from dst.errors import ConfigError
from dst.experiment import TIMING_COLUMNS
from dst.runner import RunSpec, member_dir, prepare, run

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"bin_size": 250, "change_every": 500, "probe_size": 100}

#: strategy -> (settings, bench) under which it refreshes often within 1,500 steps
CASES = {
    "bp": ({}, {}),
    "cbp": ({"replacement_rate": 0.02, "maturity_threshold": 20}, {}),
    "redo": ({"period": 100, "tau": 0.5}, {}),
    "set": ({"update_interval": 50}, {"density": 0.5}),
    "rigl": ({"update_interval": 50}, {"density": 0.5}),
    "cbp-rigl": ({"update_interval": 50, "replacement_rate": 0.02, "maturity_threshold": 20}, {"density": 0.5}),
    "srigl": ({"update_interval": 50, "gamma_sal": 0.6}, {"density": 0.5, "distribution": "constant-fan-in"}),
    "shrink-perturb": ({"noise_std": 1e-3}, {}),
    "l2-init": ({}, {}),
    "head-reset": ({}, {}),
}


def _drop_timing(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in TIMING_COLUMNS if c in frame]).reset_index(drop=True)


def _assert_same_run(single: pd.DataFrame, member: pd.DataFrame) -> None:
    """Identical counts per bin, losses and metrics equal to 1e-5 relative."""
    single, member = _drop_timing(single), _drop_timing(member)
    assert list(single.columns) == list(member.columns)
    for column in ("step", "task", "units_replaced", "connections_regrown"):
        assert list(single[column]) == list(member[column]), column
    pd.testing.assert_frame_equal(single, member, check_dtype=False, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_member_s_of_a_population_is_the_run_of_seed_s_alone(tmp_path, name):
    settings, bench = CASES[name]
    bench = {**SMALL, "hidden": (8,), **bench}
    frames = run(RunSpec("bit-flipping", name, steps=1500, seeds=(4, 1, 7), bench=bench, settings=settings,
                         device="cpu"), tmp_path / "pop", progress=False)
    if name in ("cbp", "redo", "set", "rigl", "cbp-rigl", "srigl"):
        refreshed = sum(int((f["units_replaced"] + f["connections_regrown"]).sum()) for f in frames)
        assert refreshed > 0, "no refresh happened: the comparison would prove nothing"
    single = run(RunSpec("bit-flipping", name, steps=1500, seed=1, bench=bench, settings=settings, device="cpu"),
                 progress=False)
    _assert_same_run(single, frames[1])
    on_disk = pd.read_csv(member_dir(tmp_path / "pop", 1) / "metrics.csv")
    _assert_same_run(single, on_disk)


def test_each_member_writes_what_a_single_run_writes(tmp_path):
    out = tmp_path / "pop"
    run(RunSpec("bit-flipping", "cbp", steps=500, seeds=(0, 1), bench=SMALL, device="cpu"), out, progress=False)
    single = tmp_path / "single"
    run(RunSpec("bit-flipping", "cbp", steps=500, seed=1, bench=SMALL, device="cpu"), single, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["population.json", "seed-0", "seed-1"]
    files = {p.name for p in member_dir(out, 1).iterdir()}
    assert files == {p.name for p in single.iterdir()} == {"metrics.csv", "config.json", "summary.json"}
    assert json.loads((member_dir(out, 1) / "config.json").read_text()) == json.loads((single / "config.json").read_text())
    member_summary = json.loads((member_dir(out, 1) / "summary.json").read_text())
    single_summary = json.loads((single / "summary.json").read_text())
    assert set(member_summary) == set(single_summary)
    for key, value in single_summary.items():
        if key == "seconds_per_step":
            continue
        if isinstance(value, float):
            assert member_summary[key] == pytest.approx(value, rel=1e-5, nan_ok=True), key
        else:
            assert member_summary[key] == value, key


def test_per_member_settings_reach_their_member_only(tmp_path):
    bench = {**SMALL, "hidden": (8,)}
    rates = [0.001, 0.05, 0.01]
    frames = run(RunSpec("bit-flipping", "cbp", steps=1000, seeds=(0, 1, 2), bench=bench, device="cpu",
                         settings={"replacement_rate": ",".join(map(str, rates)), "maturity_threshold": 20}),
                 tmp_path / "pop", progress=False)
    for seed, rate in enumerate(rates):
        config = json.loads((member_dir(tmp_path / "pop", seed) / "config.json").read_text())
        assert config["settings"]["replacement_rate"] == rate and config["seed"] == seed
    middle = run(RunSpec("bit-flipping", "cbp", steps=1000, seed=1, bench=bench, device="cpu",
                         settings={"replacement_rate": 0.05, "maturity_threshold": 20}), progress=False)
    _assert_same_run(middle, frames[1])
    # another value for member 1 leaves members 0 and 2 exactly as they were
    other = run(RunSpec("bit-flipping", "cbp", steps=1000, seeds=(0, 1, 2), bench=bench, device="cpu",
                        settings={"replacement_rate": [0.001, 0.2, 0.01], "maturity_threshold": 20}), progress=False)
    for member in (0, 2):
        pd.testing.assert_frame_equal(_drop_timing(frames[member]), _drop_timing(other[member]))
    assert other[1]["units_replaced"].sum() > frames[1]["units_replaced"].sum()


def test_per_member_learning_rates(tmp_path):
    bench = {**SMALL, "lr": "0.01,0.003"}
    frames = run(RunSpec("bit-flipping", "bp", steps=500, seeds=(0, 1), bench=bench, device="cpu"),
                 tmp_path / "pop", progress=False)
    single = run(RunSpec("bit-flipping", "bp", steps=500, seed=1, bench={**SMALL, "lr": 0.003}, device="cpu"),
                 progress=False)
    _assert_same_run(single, frames[1])
    assert json.loads((member_dir(tmp_path / "pop", 1) / "config.json").read_text())["bench"]["lr"] == 0.003


def test_a_diverging_member_stops_alone_and_keeps_its_rows(tmp_path):
    bench = {**SMALL, "bin_size": 5, "lr": "0.01,5.0,0.01"}
    frames = run(RunSpec("bit-flipping", "bp", steps=2000, seeds=(0, 1, 2), bench=bench, device="cpu"),
                 tmp_path / "pop", progress=False)
    failure = json.loads((member_dir(tmp_path / "pop", 1) / "failure.json").read_text())
    assert failure["kind"] == "non-finite-loss" and "seed 1" in failure["error"]
    assert 5 < failure["step"] < 2000
    assert frames[1]["step"].max() < failure["step"] and frames[1]["loss"].notna().all()
    assert not (member_dir(tmp_path / "pop", 1) / "summary.json").exists()
    for member in (0, 2):
        assert frames[member]["step"].max() == 2000 and np.isfinite(frames[member]["loss"]).all()
        assert (member_dir(tmp_path / "pop", member) / "summary.json").exists()
    alone = run(RunSpec("bit-flipping", "bp", steps=2000, seed=2, bench={**bench, "lr": 0.01}, device="cpu"),
                progress=False)
    _assert_same_run(alone, frames[2])


@pytest.mark.parametrize(
    "spec, message",
    [
        (dict(seeds=()), "at least one seed"),
        (dict(seeds=(1, 1)), "appear twice"),
        (dict(seeds=(0, 1, 2), settings={"replacement_rate": "0.1,0.2"}), "has 2 values but the population has 3"),
        (dict(seeds=(0, 1), settings={"utility": "contribution,adaptation"}), "not numeric"),
        (dict(seeds=(0, 1), bench={"hidden": [5, 7]}), None),
        (dict(seeds=(0, 1), bench={"n_bits": "20,21"}), "per-member values are for strategy settings and lr"),
    ],
)
def test_bad_population_input_is_a_clear_error(spec, message, tmp_path):
    fields = dict(benchmark="bit-flipping", strategy="cbp", steps=10, bench=SMALL, device="cpu")
    fields.update(spec)
    fields["bench"] = {**SMALL, **spec.get("bench", {})}
    if message is None:  # a tuple setting given as a list is that tuple, for every member
        prepare(RunSpec(**fields), progress=False)
        return
    with pytest.raises(ConfigError, match=message):
        prepare(RunSpec(**fields), tmp_path / "out", progress=False)  # folders named by seed


def test_a_benchmark_that_cannot_batch_refuses_a_population(tmp_path):
    with pytest.raises(ConfigError, match="one member at a time.*separate runs"):
        prepare(RunSpec("continual-imagenet", "bp", steps=10, seeds=(0, 1), device="cpu",
                        bench={"data_dir": str(tmp_path)}), progress=False)


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dst", "run", "--no-progress", *args], capture_output=True,
                          text=True, cwd=ROOT, **kwargs)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seeds", "3:3"], "is empty"),
        (["--seeds", "5:2"], "is empty"),
        (["--seeds", "a:b"], "give a range A:B"),
        (["--seeds", "0:2", "--seed", "1"], "not both"),
    ],
)
def test_cli_bad_seeds_exit_2_naming_the_fix(tmp_path, capsys, flags, message):
    assert main(["run", "--no-progress", *flags, "--steps", "10", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # three processes, ~25 s; test_comparisons_populations resumes an interrupted population in process
def test_cli_population_resumes_exactly_after_kill_9(tmp_path):
    flags = ["--strategy", "cbp", "--seeds", "0,3,5", "--set", "replacement_rate=0.01,0.02,0.03",
             "--set", "maturity_threshold=20", "--bench", "bin_size=250", "--bench", "hidden=8",
             "--bench", "probe_size=100", "--bench", "change_every=1000", "--steps", "3000", "--checkpoint-every", "500"]
    full = _cli(*flags, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    process = subprocess.Popen([sys.executable, "-m", "dst", "run", "--no-progress", *flags, "--out",
                                str(tmp_path / "cut")], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "cut" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed mid-way"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (member_dir(tmp_path / "cut", 0) / "summary.json").exists()
    resumed = _cli("--resume", "--out", str(tmp_path / "cut"))
    assert resumed.returncode == 0, resumed.stderr
    for seed in (0, 3, 5):
        a = pd.read_csv(member_dir(tmp_path / "full", seed) / "metrics.csv")
        b = pd.read_csv(member_dir(tmp_path / "cut", seed) / "metrics.csv")
        pd.testing.assert_frame_equal(_drop_timing(a), _drop_timing(b))
