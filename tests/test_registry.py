"""Strategy registry: build by name, actionable errors, duplicates, and entry-point plug-ins."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
import torch

import dst.strategies
from dst.config import setting
from dst.errors import ConfigError
from dst.refresh import Backprop, RefreshStrategy, StrategyConfig
from dst.registry import Registry



@dataclass(frozen=True)
class PruneConfig(StrategyConfig):
    drop_fraction: float = setting(0.3, low=0.0, high=1.0, low_open=True)
    update_period: int = setting(100, low=1)


class PruneForTest(RefreshStrategy):
    """A strategy with settings, registered only for these tests."""

    Config = PruneConfig


@pytest.fixture
def registered_prune():
    dst.strategies.register("test-prune")(PruneForTest)
    yield "test-prune"
    dst.strategies.registry.unregister("test-prune")


@pytest.fixture
def model_and_optimizer(tiny_mlp):
    model = tiny_mlp()
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_build_bp_gives_a_backprop_strategy_on_the_model(model_and_optimizer):
    model, optimizer = model_and_optimizer
    strategy = dst.strategies.build("bp", model, optimizer, seed=0)
    assert type(strategy) is Backprop
    assert strategy.name == "bp"
    assert strategy.model is model and strategy.optimizer is optimizer
    assert isinstance(strategy.config, Backprop.Config)
    assert "bp" in dst.strategies.available()
    assert "bp" in dst.strategies.registry


def test_unknown_strategy_error_lists_the_available_names(model_and_optimizer, registered_prune):
    with pytest.raises(ConfigError) as info:
        dst.strategies.build("cpb", *model_and_optimizer)
    message = str(info.value)
    assert "unknown strategy 'cpb'" in message
    assert "available: " in message
    listed = message.split("available: ")[1].split(", ")
    assert "bp" in listed and registered_prune in listed
    assert listed == dst.strategies.available()


def test_unknown_setting_error_lists_the_accepted_keys(model_and_optimizer, registered_prune):
    with pytest.raises(ConfigError) as info:
        dst.strategies.build(registered_prune, *model_and_optimizer, drop_fracion=0.5)
    message = str(info.value)
    assert "strategy 'test-prune'" in message
    assert "unknown setting 'drop_fracion'" in message
    assert "accepted: drop_fraction, update_period" in message


def test_settings_are_validated_and_coerced_on_build(model_and_optimizer, registered_prune):
    strategy = dst.strategies.build(registered_prune, *model_and_optimizer, drop_fraction="0.5", update_period="1e3")
    assert strategy.config.drop_fraction == 0.5 and strategy.config.update_period == 1000
    with pytest.raises(ConfigError, match=r"strategy 'test-prune': drop_fraction=0.0 is out of range; it must be \(0.0, 1.0\]"):
        dst.strategies.build(registered_prune, *model_and_optimizer, drop_fraction=0.0)


def test_build_takes_a_config_or_keyword_settings_but_not_both(model_and_optimizer, registered_prune):
    config = dst.strategies.config(registered_prune, drop_fraction=0.2)
    assert isinstance(config, PruneConfig) and config.drop_fraction == 0.2
    strategy = dst.strategies.build(registered_prune, *model_and_optimizer, config=config)
    assert strategy.config is config
    with pytest.raises(ConfigError, match="either config= or keyword settings, not both"):
        dst.strategies.build(registered_prune, *model_and_optimizer, config=config, update_period=5)
    with pytest.raises(ConfigError, match="takes a PruneConfig, got BackpropConfig"):
        dst.strategies.build(registered_prune, *model_and_optimizer, config=Backprop.Config())


def test_registering_a_taken_name_raises_and_keeps_the_original():
    class Impostor(RefreshStrategy):
        """Would shadow plain backprop."""

    with pytest.raises(ConfigError, match=r"strategy name 'bp' is already registered by dst\.refresh\.Backprop"):
        dst.strategies.register("bp")(Impostor)
    assert dst.strategies.get("bp").cls is Backprop


@dataclass(frozen=True)
class WidgetConfig(StrategyConfig):
    size: int = setting(1, low=1)


def test_replace_true_allows_reregistering_a_name():
    registry: Registry = Registry("widget", "dst.test-no-such-group")

    @registry.register("w", WidgetConfig)
    class First(RefreshStrategy):
        pass

    class Second(RefreshStrategy):
        Config = WidgetConfig

    with pytest.raises(ConfigError, match="already registered"):
        registry.register("w")(Second)
    registry.register("w", replace=True)(Second)
    assert registry.get("w").cls is Second
    assert registry.available() == ["w"]
    registry.unregister("w")
    assert registry.available() == []


def test_registering_without_a_config_class_is_an_error():
    registry: Registry = Registry("widget", "dst.test-no-such-group")

    class NoConfig:
        pass

    with pytest.raises(ConfigError, match="give a Config subclass"):
        registry.register("n")(NoConfig)


def test_registered_config_names_its_own_entry_even_when_its_base_belongs_to_another_registry(
    registered_prune,
):
    # PruneConfig's owner is "strategy 'test-prune'"; a subclass registered elsewhere must not inherit it.
    @dataclass(frozen=True)
    class DerivedConfig(PruneConfig):
        pass

    class Derived(RefreshStrategy):
        Config = DerivedConfig

    registry: Registry = Registry("widget", "dst.test-no-such-group")
    registry.register("derived")(Derived)
    with pytest.raises(ConfigError, match=r"^widget 'derived': unknown setting 'x'"):
        registry.config("derived", {"x": 1})
    assert PruneConfig.owner == "strategy 'test-prune'"


def test_available_filters_names_with_a_glob_pattern(registered_prune):
    assert dst.strategies.available("test-*") == ["test-prune"]
    assert "bp" not in dst.strategies.available("test-*")


PLUGIN_MODULE = '''
from dataclasses import dataclass

from dst.config import setting
from dst.refresh import RefreshStrategy, StrategyConfig


@dataclass(frozen=True)
class MyRefreshConfig(StrategyConfig):
    regrow_fraction: float = setting(0.3, low=0.0, high=1.0, low_open=True)


class MyRefresh(RefreshStrategy):
    """A third-party refresh strategy found through the dst.strategies entry-point group."""

    Config = MyRefreshConfig
'''


def _install(tmp_path, monkeypatch, entry_point: str) -> None:
    """'pip-install' a third-party distribution: thirdparty_strategy.py plus its dist-info on sys.path."""
    (tmp_path / "thirdparty_strategy.py").write_text(PLUGIN_MODULE)
    info = tmp_path / "thirdparty_strategy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-strategy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[dst.strategies]\n{entry_point}\n")
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A third-party strategy class under the entry-point group."""
    _install(tmp_path, monkeypatch, "my-refresh = thirdparty_strategy:MyRefresh")
    yield "my-refresh"
    dst.strategies.registry.unregister("my-refresh")
    sys.modules.pop("thirdparty_strategy", None)


def test_a_plugin_module_that_registers_nothing_is_named_in_the_error(tmp_path, monkeypatch):
    # the module defines MyRefresh but never registers it under "my-refresh"
    _install(tmp_path, monkeypatch, "my-refresh = thirdparty_strategy")
    try:
        dst.strategies.registry.load_plugins(reload=True)
        with pytest.raises(ConfigError, match=r"unknown strategy 'my-refresh' \(its plug-in failed: "
                                              r"'thirdparty_strategy' loaded but registered no strategy named"):
            dst.strategies.get("my-refresh")
    finally:
        dst.strategies.registry._plugin_errors.pop("my-refresh", None)
        sys.modules.pop("thirdparty_strategy", None)
        dst.strategies.registry.load_plugins(reload=True)


def test_third_party_strategy_is_found_through_its_entry_point(installed_plugin, model_and_optimizer):
    assert installed_plugin not in dst.strategies.registry._entries
    dst.strategies.registry.load_plugins(reload=True)
    assert installed_plugin in dst.strategies.available()

    strategy = dst.strategies.build(installed_plugin, *model_and_optimizer, regrow_fraction="0.5")
    assert type(strategy).__module__ == "thirdparty_strategy"
    assert type(strategy).__name__ == "MyRefresh"
    assert strategy.name == "my-refresh"
    assert strategy.config.regrow_fraction == 0.5
    entry = dst.strategies.get(installed_plugin)
    assert entry.summary.startswith("A third-party refresh strategy")

    # Its settings are validated like any built-in strategy's, with its name in the message.
    with pytest.raises(ConfigError, match=r"strategy 'my-refresh': regrow_fraction=0.0 is out of range"):
        dst.strategies.build(installed_plugin, *model_and_optimizer, regrow_fraction=0.0)
    with pytest.raises(ConfigError, match="accepted: regrow_fraction"):
        dst.strategies.build(installed_plugin, *model_and_optimizer, regrow=0.5)


def test_plugin_is_gone_after_unregister(installed_plugin):
    dst.strategies.registry.load_plugins(reload=True)
    assert installed_plugin in dst.strategies.available()
    dst.strategies.registry.unregister(installed_plugin)
    assert installed_plugin not in dst.strategies.registry._entries
