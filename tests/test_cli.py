import json

import pandas as pd

from dst.cli import main


def test_run_command_writes_metrics_and_config_and_prints_the_bin_table(tmp_path, capsys):
    code = main(["run", "--benchmark", "bit-flipping", "--strategy", "bp", "--steps", "1000", "--seed", "0",
                 "--out", str(tmp_path / "runs/x"), "--bench", "bin_size=250", "--no-progress"])
    result = capsys.readouterr()
    assert code == 0, result.err
    metrics = pd.read_csv(tmp_path / "runs/x/metrics.csv")
    assert list(metrics["step"]) == [250, 500, 750, 1000]
    config = json.loads((tmp_path / "runs/x/config.json").read_text())
    assert config["bench"]["bin_size"] == 250 and config["bench"]["n_bits"] == 20
    assert "step" in result.out and "loss" in result.out and "1000" in result.out


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


def test_resume_with_only_out_continues_a_run_with_non_default_flags(tmp_path, capsys):
    flags = ["--strategy", "cbp", "--seed", "3", "--bench", "hidden=7", "--bench", "bin_size=250",
             "--set", "maturity_threshold=20", "--checkpoint-every", "500", "--no-progress"]
    assert main(["run", *flags, "--steps", "1000", "--out", str(tmp_path / "full")]) == 0
    assert main(["run", *flags, "--steps", "500", "--out", str(tmp_path / "r")]) == 0
    assert main(["run", "--resume", "--out", str(tmp_path / "r"), "--steps", "1000", "--no-progress"]) == 0
    full, resumed = (pd.read_csv(tmp_path / name / "metrics.csv") for name in ("full", "r"))
    columns = ["step", "task", "loss", "units_replaced"]
    pd.testing.assert_frame_equal(full[columns], resumed[columns])
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (config["strategy"], config["seed"], config["bench"]["hidden"]) == ("cbp", 3, [7])
    capsys.readouterr()
    # a flag that contradicts the saved run is named with both values; nothing is touched
    before = (tmp_path / "r" / "metrics.csv").read_text()
    assert main(["run", "--resume", "--out", str(tmp_path / "r"), "--bench", "hidden=9", "--no-progress"]) == 2
    assert "bench.hidden: saved [7], now [9]" in capsys.readouterr().err
    assert (tmp_path / "r" / "metrics.csv").read_text() == before


def test_resume_with_an_unreadable_config_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text("{not json")
    assert main(["run", "--resume", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_a_diverged_run_exits_3_and_names_its_failure_file(tmp_path, capsys):
    assert main(["run", "--steps", "100", "--bench", "lr=1e4", "--out", str(tmp_path / "r"), "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "the loss became" in err and "failure.json" in err
    assert (tmp_path / "r" / "metrics.csv").read_text().startswith("step,task,loss")
