"""Exceptions with messages a researcher can act on."""

from __future__ import annotations

__all__ = ["DSTError", "ConfigError", "TopologyError", "NonFiniteLossError", "DataError"]


class DSTError(Exception):
    """Base class of every error the framework raises on purpose."""


class ConfigError(DSTError, ValueError):
    """An unknown setting, a value outside its range, or settings that contradict each other."""


class TopologyError(DSTError, ValueError):
    """The unit graph of a model cannot be discovered or is inconsistent."""


class DataError(DSTError, OSError):
    """A data file is missing, truncated or corrupt."""


class NonFiniteLossError(DSTError, FloatingPointError):
    """Training produced a NaN or infinite loss."""

    def __init__(self, step: int, value: float, member: str = ""):
        self.step = step
        self.value = value
        self.member = member
        who = f"{member}: " if member else ""
        super().__init__(
            f"{who}the loss became {value} at step {step}; the run stopped and the metrics written so far "
            "are kept. Lower the learning rate, or check the data and the strategy settings."
        )
