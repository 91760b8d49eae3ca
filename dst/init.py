"""Initialisation bounds shared by the network builders and by the re-initialisation surgery.

Every scheme draws weights from U(-b, b); they differ in the bound b:

- ``kaiming``: b = gain * sqrt(3 / fan_in)            (He et al.; the CBP paper's choice)
- ``lecun``:   b = sqrt(3 / fan_in)                   (gain 1)
- ``xavier``:  b = gain * sqrt(6 / (fan_in + fan_out))
- ``default``: b = 1 / sqrt(fan_in)                   (PyTorch's nn.Linear / nn.Conv2d default)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["INIT_SCHEMES", "activation_gain", "module_gain", "init_bound", "fans", "uniform_"]

INIT_SCHEMES = ("kaiming", "lecun", "xavier", "default")

_GAIN_NAMES = {
    "relu": "relu",
    "leaky_relu": "leaky_relu",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "linear": "linear",
    "identity": "linear",
    "selu": "selu",
    # No closed form in torch for these; the ReLU gain is the usual stand-in.
    "elu": "relu",
    "gelu": "relu",
    "swish": "relu",
    "silu": "relu",
    "crelu": "relu",  # each unit's pair carries its whole input's square: the ReLU gain keeps the variance
}


def activation_gain(activation: str) -> float:
    """The recommended gain for an activation name (``torch.nn.init.calculate_gain``)."""
    try:
        name = _GAIN_NAMES[activation]
    except KeyError:
        raise ConfigError(
            f"no initialisation gain known for activation {activation!r}; "
            f"known: {', '.join(sorted(_GAIN_NAMES))}"
        ) from None
    return nn.init.calculate_gain(name)


_MODULE_GAINS = {
    "ReLU": "relu",
    "LeakyReLU": "leaky_relu",
    "Tanh": "tanh",
    "Sigmoid": "sigmoid",
    "Identity": "linear",
    "SELU": "selu",
    "ELU": "elu",
    "GELU": "gelu",
    "CReLU": "crelu",
    "SiLU": "swish",
}


def module_gain(activation: nn.Module | None) -> float:
    """The gain for an activation module (``None``, a linear unit, has gain 1)."""
    if activation is None:
        return 1.0
    name = _MODULE_GAINS.get(type(activation).__name__)
    if name == "leaky_relu":
        return nn.init.calculate_gain("leaky_relu", activation.negative_slope)
    return activation_gain(name) if name is not None else 1.0


def fans(weight_shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) of a Linear (out, in) or Conv (out, in, *kernel) weight."""
    receptive = math.prod(weight_shape[2:]) if len(weight_shape) > 2 else 1
    return weight_shape[1] * receptive, weight_shape[0] * receptive


def init_bound(scheme: str, fan_in: int, fan_out: int, gain: float = 1.0) -> float:
    """The bound b of U(-b, b) for an initialisation scheme."""
    if scheme == "kaiming":
        return gain * math.sqrt(3.0 / fan_in)
    if scheme == "lecun":
        return math.sqrt(3.0 / fan_in)
    if scheme == "xavier":
        return gain * math.sqrt(6.0 / (fan_in + fan_out))
    if scheme == "default":
        return 1.0 / math.sqrt(fan_in)
    raise ConfigError(f"unknown init scheme {scheme!r}; use one of {', '.join(INIT_SCHEMES)}")


@torch.no_grad()
def uniform_(
    tensor: torch.Tensor,
    scheme: str,
    fan_in: int,
    fan_out: int,
    gain: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill ``tensor`` in place from U(-b, b) with the scheme's bound."""
    bound = init_bound(scheme, fan_in, fan_out, gain)
    return tensor.uniform_(-bound, bound, generator=generator)
