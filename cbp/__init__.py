"""Continual backpropagation and its unit-level relatives, as dst refresh strategies.

Importing this package registers ``cbp``, ``redo``, ``cbp-rigl``, ``cbp-set`` and ``rigl-utility`` in ``dst.strategies``; installed, the package
is also found through the ``dst.strategies`` entry-point group, like any third-party strategy.
"""

from .strategy import CBPConfig, ContinualBackprop, ReDo, ReDoConfig, redraw_fan_in  # noqa: I001 (registers cbp first)
from .compositions import CBPSET, CBPRigL, RigLUtility, RigLUtilityConfig
from .utility import UTILITIES, UnitUtility
from .weights import incoming_magnitude, outgoing_magnitude

__all__ = [
    "CBPRigL",
    "CBPSET",
    "RigLUtility",
    "RigLUtilityConfig",
    "CBPConfig",
    "ContinualBackprop",
    "ReDo",
    "ReDoConfig",
    "UTILITIES",
    "UnitUtility",
    "incoming_magnitude",
    "outgoing_magnitude",
    "redraw_fan_in",
]
