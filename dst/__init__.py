"""dst: topology refresh for continual learning.

Continual backpropagation (unit-level) and dynamic sparse training (connection-level) are two refresh
strategies over one masked-layer abstraction, one strategy registry and one experiment loop, all on the
member layout of populations (``dst.population``): S learners in one batched pass.
"""

from . import (
    baselines, benchmarks, init, methods, metrics, nets, optim, population, prune_regrow, runner, sparsity, srigl,
    strategies, streams,
)
from .config import Config, setting
from .experiment import Experiment
from .errors import ConfigError, DataError, DSTError, NonFiniteLossError, TopologyError
from .masked import MaskedConv2d, MaskedLinear, apply_masks, mask_gradients, masked_layers, sparsify
from .optim import ElementwiseAdam, build_optimizer
from .optim_state import reset_optimizer_state
from .population import MemberRandom, forward
from .refresh import NO_REFRESH, RefreshStats, RefreshStrategy, StrategyConfig
from .surgery import UnitSelection, replace_units
from .runner import RunSpec
from .topology import HiddenLayer, Topology

__version__ = "0.1.0"

__all__ = [
    "Config",
    "Experiment",
    "RunSpec",
    "baselines",
    "benchmarks",
    "runner",
    "streams",
    "ConfigError",
    "DataError",
    "DSTError",
    "ElementwiseAdam",
    "HiddenLayer",
    "MaskedConv2d",
    "MaskedLinear",
    "MemberRandom",
    "NO_REFRESH",
    "NonFiniteLossError",
    "RefreshStats",
    "RefreshStrategy",
    "StrategyConfig",
    "Topology",
    "TopologyError",
    "UnitSelection",
    "apply_masks",
    "build_optimizer",
    "init",
    "mask_gradients",
    "masked_layers",
    "metrics",
    "nets",
    "optim",
    "forward",
    "population",
    "prune_regrow",
    "replace_units",
    "reset_optimizer_state",
    "setting",
    "sparsify",
    "sparsity",
    "srigl",
    "strategies",
]
