"""Continual problems: each yields (x, y, task) batches, deterministically from a seed."""

from .base import Stream, derive_seed
from .bit_flipping import BitFlippingStream, LTUTarget

__all__ = ["Stream", "derive_seed", "BitFlippingStream", "LTUTarget"]
