"""Continual backpropagation and its unit-level relatives, as dst refresh strategies.

Importing this package registers ``cbp`` and ``redo`` in ``dst.strategies``; installed, the package
is also found through the ``dst.strategies`` entry-point group, like any third-party strategy.
"""

from .strategy import CBPConfig, ContinualBackprop, ReDo, ReDoConfig, redraw_fan_in
from .utility import UTILITIES, UnitUtility, incoming_magnitude, outgoing_magnitude

__all__ = [
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
