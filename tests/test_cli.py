import json
import subprocess
import sys

import pandas as pd

from dst.cli import main


def _dst(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "dst", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_run_command_writes_metrics_and_config_and_prints_the_bin_table(tmp_path):
    result = _dst(
        "run", "--benchmark", "bit-flipping", "--strategy", "bp", "--steps", "1000", "--seed", "0",
        "--out", "runs/x", "--bench", "bin_size=250", "--no-progress", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    metrics = pd.read_csv(tmp_path / "runs/x/metrics.csv")
    assert list(metrics["step"]) == [250, 500, 750, 1000]
    config = json.loads((tmp_path / "runs/x/config.json").read_text())
    assert config["bench"]["bin_size"] == 250 and config["bench"]["n_bits"] == 20
    assert "step" in result.stdout and "loss" in result.stdout and "1000" in result.stdout


def test_strategies_command_lists_each_strategy_with_its_settings(capsys):
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("bp:") or "\nbp:" in out


def test_benchmarks_command_lists_settings_with_defaults(capsys):
    assert main(["benchmarks"]) == 0
    out = capsys.readouterr().out
    assert "bit-flipping:" in out and "lr = 0.01" in out


def test_bad_settings_exit_2_with_a_message_naming_the_problem(tmp_path, capsys):
    assert main(["run", "--steps", "10", "--bench", "lrr=0.1", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "unknown setting 'lrr'" in err and "accepted:" in err
    assert main(["run", "--steps", "10", "--bench", "density=1.5", "--out", str(tmp_path / "b")]) == 2
    assert "density=1.5 is out of range" in capsys.readouterr().err
    assert main(["run", "--steps", "10", "--set", "novalue", "--out", str(tmp_path / "c")]) == 2
    assert "key=value" in capsys.readouterr().err
    assert not (tmp_path / "a" / "metrics.csv").exists()
