"""PPO on Slippery Ant: GAE by hand, the update's steps through the strategy, the loop end to end and its resume."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from dst import strategies
from dst.errors import ConfigError
from dst.rl.ppo import ActorCritic, PPOSettings, Rollout, advantages, ppo_update
from dst.runner import RunSpec, prepare, run

pytest.importorskip("gymnasium", reason='the rl extra (pip install -e ".[test,rl]") is not installed')


def test_gae_by_hand_stops_at_an_episode_end():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])  # V(o_0..o_3)
    rewards, dones = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 0.0])
    gamma, lam = 0.5, 0.5
    # t=2: delta = 2 + 0.5 * 4 - 3 = 1 -> A = 1; t=1 (episode end): delta = 0 - 2 = -2 -> A = -2
    # t=0: delta = 1 + 0.5 * 2 - 1 = 1 -> A = 1 + 0.25 * (-2) = 0.5
    advantage, target = advantages(values, rewards, dones, gamma, lam)
    assert advantage.tolist() == [0.5, -2.0, 1.0] and target.tolist() == [1.5, 0.0, 4.0]


def test_unit_graph_covers_both_networks_and_every_minibatch_is_one_strategy_step():
    model = ActorCritic(5, 2, (8, 6), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    cbp = strategies.build("cbp", model, optimizer, replacement_rate=0.2, maturity_threshold=1, seed=0)
    assert [layer.name for layer in cbp.topology] == ["policy.0", "policy.2", "value.0", "value.2"]
    assert [layer.n_units for layer in cbp.topology] == [8, 6, 8, 6]
    steps = 32
    generator = torch.Generator().manual_seed(1)
    rollout = Rollout(torch.randn(steps, 5), torch.randn(steps, 2), torch.randn(steps), torch.randn(steps),
                      (torch.rand(steps) < 0.1).float(), torch.randn(5))
    before = model.log_std.detach().clone()
    result = ppo_update(model, optimizer, cbp, rollout, PPOSettings(epochs=3, minibatches=4), generator)
    assert cbp.step == 12 and int(result["units_replaced"].sum()) > 0
    assert not torch.equal(model.log_std, before) and torch.isfinite(torch.tensor(result["loss"]))


def _spec(strategy="bp", steps=None, **bench):
    return RunSpec("slippery-ant", strategy, steps=steps, device="cpu", bench={"preset": "smoke", **bench},
                   settings={"replacement_rate": 0.01, "maturity_threshold": 5} if strategy == "cbp" else {})


def test_the_smoke_preset_logs_returns_per_bin_and_a_new_task_at_each_friction_change(tmp_path):
    rows = run(_spec("cbp"), tmp_path / "run", progress=False)
    assert rows["step"].tolist() == [100, 200, 300, 400, 500, 600]
    assert rows["task"].is_monotonic_increasing and rows["task"].iloc[-1] >= 2  # change_time 200
    assert rows.groupby("task")["friction"].nunique().eq(1).all() and rows["friction"].nunique() == rows["task"].nunique()
    assert rows["episodes"].sum() > 0 and rows["episodic_return"].notna().any()
    assert rows["effective_rank"].notna().iloc[0]  # probed at the start
    assert rows["units_replaced"].sum() > 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["performance_metric"] == "episodic_return"


def test_a_resumed_run_writes_the_rows_of_an_uninterrupted_one(tmp_path):
    whole = run(_spec("cbp"), tmp_path / "whole", progress=False)
    part = RunSpec(**{**_spec("cbp", steps=350).__dict__, "checkpoint_every": 128})
    # stops inside a rollout and a bin: its last checkpoint is the one at step 256 (a multiple of 128)
    run(part, tmp_path / "cut", progress=False)
    resumed = run(RunSpec(**{**part.__dict__, "steps": 600}), tmp_path / "cut", resume=True, progress=False)
    timing = [c for c in whole if "seconds" in c]
    pd.testing.assert_frame_equal(whole.drop(columns=timing), resumed.drop(columns=timing))


def test_a_change_time_that_the_run_never_reaches_is_refused():
    with pytest.raises(ConfigError, match="change_time .* never change"):
        prepare(_spec(change_time=1000), progress=False)


@pytest.mark.parametrize("bench, message", [
    (dict(batch_size=4), "batch is its rollout"),
    (dict(rollout=100, minibatches=16), "does not split into 16"),
    (dict(schedule="list"), "schedule=list needs frictions"),
    (dict(frictions=(1.0, 0.5)), "add --bench schedule=list"),
    (dict(schedule="list", frictions=(1.0, -1.0)), "must be positive"),
    (dict(friction_range=(2.0, 0.1)), "low <= high"),
])
def test_bad_settings_are_clear_errors(bench, message):
    from dst import benchmarks

    with pytest.raises(ConfigError, match=message):
        benchmarks.build("slippery-ant", **bench)


def test_a_given_friction_list_is_followed_in_order(tmp_path):
    rows = run(_spec(schedule="list", frictions=(0.3, 1.7)), tmp_path / "run", progress=False)
    assert [rows.loc[rows["task"] == task, "friction"].iloc[0] for task in sorted(rows["task"].unique())][:2] == [0.3, 1.7]
