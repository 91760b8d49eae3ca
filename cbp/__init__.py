"""Continual backpropagation and its unit-level relatives, as dst refresh strategies.

Importing this package registers ``cbp``, ``redo``, ``regrama``, ``snr``, ``cbp-rigl``, ``cbp-set`` and ``rigl-utility`` in
``dst.strategies``; installed, the package is also found through the ``dst.strategies`` entry-point group,
like any third-party strategy.

Every strategy here refreshes a population (S members, 1 for a plain torch model) in one pass: per-unit
statistics are (S, units) tensors, per-member counts host arrays (S,), and each member may have its own
value of every numeric setting.
"""

from .strategy import CBPConfig, ContinualBackprop, redraw_fan_in  # noqa: I001 (registers cbp first)
from .redo import ReDo, ReDoConfig
from .regrama import ReGraMa, ReGraMaConfig
from .snr import SNR, SNRConfig
from .compositions import CBPSET, CBPRigL, RigLUtility, RigLUtilityConfig
from .turnover import Turnover
from .utility import UTILITIES, UnitUtility
from .weights import WeightFactors, weight_factors

__all__ = [
    "CBPRigL",
    "CBPSET",
    "RigLUtility",
    "RigLUtilityConfig",
    "CBPConfig",
    "ContinualBackprop",
    "ReDo",
    "ReDoConfig",
    "ReGraMa",
    "ReGraMaConfig",
    "SNR",
    "SNRConfig",
    "Turnover",
    "UTILITIES",
    "UnitUtility",
    "WeightFactors",
    "redraw_fan_in",
    "weight_factors",
]
