"""SIGTERM (a scheduler's time limit, ``kill``, a job under ``nohup``) stops a command as Ctrl-C does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

from dst.interrupt import sigterm_interrupts
from studies import open_storage, resolve

ROOT = Path(__file__).resolve().parents[1]
RUNNING, FAIL = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL


def _python_m(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.fixture
def leave_nothing_running():
    """Kill what a test's command left behind (its workers are in its process group), pass or fail."""
    started: list[subprocess.Popen] = []
    yield started.append
    for process in started:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
        process.stdout.close()


def _wait_for(ready, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 90
    while not ready():
        assert process.poll() is None, f"the command ended before {what}: {process.communicate()[0]}"
        assert time.monotonic() < deadline, f"no {what} within 90 s"
        time.sleep(0.2)


def test_sigterm_inside_raises_keyboard_interrupt_and_the_previous_handler_comes_back():
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"), sigterm_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # not reached: the handler raises as soon as the signal arrives
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert seen == [signal.SIGTERM]  # outside the block, the handler set before it
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow  # ~17 s; the default suite checks the handler itself above, in process
def test_a_sigterm_comparison_stops_its_workers_records_its_call_and_exits_130(tmp_path, leave_nothing_running):
    out = tmp_path / "out"
    process = _python_m("comparisons", "--strategies", "bp", "--seeds", "2", "--workers", "2",
                        "--population", "off", "--steps", "5000000", "--bench", "hidden=4",
                        "--bench", "probe=false", "--no-progress", "--out", str(out))
    leave_nothing_running(process)
    _wait_for(lambda: len(list(out.glob("runs/*/seed-*/config.json"))) == 2, process, "two runs started")
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 130 and "interrupted" in output, output
    calls = pd.read_csv(out / "wall_times.csv")
    assert len(calls) == 1 and bool(calls["interrupted"].iloc[0]) and calls["finished"].iloc[0] == 0
    sizes = [path.stat().st_size for path in out.glob("runs/*/seed-*/*")]
    time.sleep(1.5)
    assert [path.stat().st_size for path in out.glob("runs/*/seed-*/*")] == sizes  # no worker writes on


@pytest.mark.slow  # ~20 s; the default suite stops a comparison's workers by SIGTERM through the same path
def test_a_sigterm_study_marks_its_workers_running_trials_failed_and_exits_130(tmp_path, leave_nothing_running):
    storage = tmp_path / "s.journal"
    process = _python_m("studies", "tune", "--strategy", "cbp", "--study", "s", "--out", str(tmp_path),
                        "--storage", str(storage), "--trials", "4", "--workers", "2", "--steps", "2000000",
                        "--sampler-seed", "0", "--bench", "bin_size=100", "--bench", "hidden=5",
                        "--bench", "probe=false")
    leave_nothing_running(process)

    def trials() -> list[optuna.trial.FrozenTrial]:
        if not storage.exists():
            return []
        return optuna.load_study(study_name="s", storage=open_storage(resolve(str(storage), ".", "s"),
                                                                      create=False)).trials

    _wait_for(lambda: any(t.state == RUNNING and t.intermediate_values for t in trials()), process,
              "a trial reported a bin")
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=90)[0]
    assert process.returncode == 130 and "interrupted" in output, output
    states = [t.state for t in trials()]
    assert FAIL in states and RUNNING not in states, states  # each worker failed its trial, none left hanging
