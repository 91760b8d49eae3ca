"""Config: typed, frozen, validated dataclasses that read command-line strings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional

import pytest

from dst.config import Config, parse_assignments, setting
from dst.errors import ConfigError


@dataclass(frozen=True)
class ExampleConfig(Config):
    owner: ClassVar[str] = "strategy 'example'"

    replacement_rate: float = setting(1e-4, low=0.0, high=1.0)
    decay_rate: float = setting(0.99, low=0.0, high=1.0, low_open=True, high_open=True)
    maturity_threshold: int = setting(100, low=1)
    utility: str = setting("contribution", choices=("contribution", "adaptation", "random"))
    fold_bias: bool = setting(True)
    kernel: tuple[int, ...] = setting((3, 3), low=1)
    end_step: Optional[int] = setting(None, low=0)


ACCEPTED = [
    "replacement_rate",
    "decay_rate",
    "maturity_threshold",
    "utility",
    "fold_bias",
    "kernel",
    "end_step",
]


def test_defaults_build_without_arguments():
    config = ExampleConfig()
    assert config.to_dict() == {
        "replacement_rate": 1e-4,
        "decay_rate": 0.99,
        "maturity_threshold": 100,
        "utility": "contribution",
        "fold_bias": True,
        "kernel": (3, 3),
        "end_step": None,
    }


def test_unknown_key_error_names_the_key_and_lists_every_accepted_key():
    with pytest.raises(ConfigError) as info:
        ExampleConfig.from_dict({"replacment_rate": 0.1})
    message = str(info.value)
    assert "'replacment_rate'" in message
    assert "strategy 'example'" in message
    assert "accepted: " + ", ".join(ACCEPTED) in message


def test_several_unknown_keys_are_all_reported():
    with pytest.raises(ConfigError, match=r"unknown settings 'a', 'b'"):
        ExampleConfig.from_dict(a=1, b=2)


def test_config_without_fields_says_it_has_no_settings():
    @dataclass(frozen=True)
    class Empty(Config):
        pass

    with pytest.raises(ConfigError, match=r"none: it has no settings"):
        Empty.from_dict(anything=1)


@pytest.mark.parametrize(
    "key, value, described_range",
    [
        ("replacement_rate", 1.5, "[0.0, 1.0]"),
        ("replacement_rate", -0.1, "[0.0, 1.0]"),
        ("decay_rate", 0.0, "(0.0, 1.0)"),  # open lower bound excludes the bound itself
        ("decay_rate", 1.0, "(0.0, 1.0)"),  # open upper bound excludes the bound itself
        ("maturity_threshold", 0, "[1, inf]"),
        ("kernel", (3, 0), "[1, inf]"),  # every element of a tuple is checked
        ("end_step", -1, "[0, inf]"),
        ("utility", "utilty", "one of 'contribution', 'adaptation', 'random'"),
    ],
)
def test_out_of_range_value_error_names_field_value_and_range(key, value, described_range):
    with pytest.raises(ConfigError) as info:
        ExampleConfig.from_dict({key: value})
    message = str(info.value)
    assert f"{key}=" in message
    assert "out of range" in message
    assert described_range in message


@pytest.mark.parametrize(
    "key, value",
    [
        ("replacement_rate", 0.0),  # closed bounds accept the bounds
        ("replacement_rate", 1.0),
        ("decay_rate", 1e-9),
        ("maturity_threshold", 1),
        ("end_step", 0),
    ],
)
def test_values_on_or_inside_the_bounds_are_accepted(key, value):
    assert getattr(ExampleConfig.from_dict({key: value}), key) == value


def test_nan_is_out_of_range():
    with pytest.raises(ConfigError, match="out of range"):
        ExampleConfig(replacement_rate=float("nan"))


@pytest.mark.parametrize(
    "key, text, expected",
    [
        ("maturity_threshold", "1e3", 1000),
        ("maturity_threshold", "250", 250),
        ("replacement_rate", "1e-5", 1e-5),
        ("replacement_rate", "0.25", 0.25),
        ("fold_bias", "true", True),
        ("fold_bias", "false", False),
        ("fold_bias", "False", False),
        ("kernel", "5,5", (5, 5)),
        ("kernel", "7", (7,)),
        ("end_step", "none", None),
        ("end_step", "2e4", 20000),
        ("utility", "adaptation", "adaptation"),
    ],
)
def test_command_line_strings_are_coerced_to_the_field_type(key, text, expected):
    value = getattr(ExampleConfig.from_dict({key: text}), key)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    "key, text",
    [
        ("maturity_threshold", "1.5"),  # not an integer
        ("maturity_threshold", "ten"),
        ("fold_bias", "maybe"),
        ("replacement_rate", "fast"),
        ("kernel", "5,x"),
    ],
)
def test_uncoercible_string_is_a_config_error_naming_the_field(key, text):
    with pytest.raises(ConfigError, match=rf"bad value '{text}' for '{key}'"):
        ExampleConfig.from_dict({key: text})


def test_bool_is_not_accepted_as_an_integer():
    with pytest.raises(ConfigError, match="maturity_threshold"):
        ExampleConfig(maturity_threshold=True)


def test_config_is_frozen():
    config = ExampleConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.replacement_rate = 0.5  # type: ignore[misc]


def test_to_dict_from_dict_round_trip_gives_an_equal_config():
    config = ExampleConfig.from_dict(
        {"replacement_rate": "1e-3", "kernel": "5,5", "end_step": "10", "fold_bias": "false"}
    )
    again = ExampleConfig.from_dict(config.to_dict())
    assert again == config
    assert again.to_dict() == config.to_dict()
    assert again.kernel == (5, 5) and again.end_step == 10 and again.fold_bias is False


def test_replace_validates_the_new_value():
    config = ExampleConfig()
    assert config.replace(maturity_threshold="20").maturity_threshold == 20
    with pytest.raises(ConfigError, match="out of range"):
        config.replace(maturity_threshold=0)
    with pytest.raises(ConfigError, match="unknown setting 'nope'"):
        config.replace(nope=1)


def test_describe_lists_every_field_with_its_range():
    rows = {row["name"]: row for row in ExampleConfig.describe()}
    assert list(rows) == ACCEPTED
    assert rows["decay_rate"]["range"] == "(0.0, 1.0)"
    assert rows["maturity_threshold"]["default"] == 100


def test_parse_assignments_splits_key_value_pairs_on_the_first_equals():
    assert parse_assignments(["rate=1e-4", " kernel = 5,5", "expr=a=b"]) == {
        "rate": "1e-4",
        "kernel": "5,5",
        "expr": "a=b",
    }


@pytest.mark.parametrize("item", ["noequals", "=value"])
def test_parse_assignments_rejects_items_without_a_key(item):
    with pytest.raises(ConfigError, match=rf"malformed setting '{item}': write it as key=value"):
        parse_assignments([item])


def test_parse_assignments_rejects_a_key_given_twice():
    with pytest.raises(ConfigError, match=r"setting 'rate' given twice"):
        parse_assignments(["rate=1", "rate=2"])
