"""Network builders used by the benchmarks: plain ``nn.Sequential`` of Linear/Conv2d and activations.

Weights are drawn from U(-b, b) with the bound of ``init`` (``dst.init``): hidden layers use the gain
of their activation, the output layer the linear gain; biases start at 0. ``init="default"`` keeps
PyTorch's own initialisation. The Sequential layout is what ``Topology.from_model`` discovers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import ConfigError
from .init import activation_gain, fans, uniform_

__all__ = ["mlp", "convnet", "ACTIVATION_MODULES", "initialise"]

ACTIVATION_MODULES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "linear": nn.Identity,
}


def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATION_MODULES[name]()
    except KeyError:
        raise ConfigError(
            f"unknown activation {name!r}; use one of {', '.join(sorted(ACTIVATION_MODULES))}"
        ) from None


@torch.no_grad()
def initialise(layer: nn.Module, init: str, gain: float, generator: torch.Generator | None = None) -> None:
    """Initialise one Linear/Conv2d layer: U(-b, b) weights with the scheme's bound, zero bias."""
    if init == "default":
        return
    fan_in, fan_out = fans(layer.weight.shape)
    uniform_(layer.weight, init, fan_in, fan_out, gain, generator)
    if layer.bias is not None:
        layer.bias.zero_()


def mlp(
    in_features: int,
    hidden: Sequence[int],
    out_features: int,
    activation: str = "relu",
    *,
    init: str = "kaiming",
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """``in -> [Linear, activation] * len(hidden) -> Linear -> out``."""
    layers: list[nn.Module] = []
    width = in_features
    gain = activation_gain(activation)
    for size in hidden:
        linear = nn.Linear(width, size)
        initialise(linear, init, gain, generator)
        layers += [linear, _activation(activation)]
        width = size
    head = nn.Linear(width, out_features)
    initialise(head, init, activation_gain("linear"), generator)
    layers.append(head)
    return nn.Sequential(*layers)


def convnet(
    in_channels: int,
    image_size: int,
    out_features: int,
    channels: Sequence[int] = (32, 64, 128),
    kernel_sizes: Sequence[int] = (5, 3, 3),
    hidden: Sequence[int] = (128, 128),
    activation: str = "relu",
    *,
    init: str = "kaiming",
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """Conv(k) -> act -> MaxPool(2) per channel entry, flatten, then an MLP head.

    The defaults are the continual-ImageNet ConvNet of Dohare et al. (3 conv layers, two hidden
    linear layers of 128).
    """
    if len(channels) != len(kernel_sizes):
        raise ConfigError("convnet: channels and kernel_sizes must have the same length")
    layers: list[nn.Module] = []
    gain = activation_gain(activation)
    width, size = in_channels, image_size
    for out_channels, kernel in zip(channels, kernel_sizes):
        conv = nn.Conv2d(width, out_channels, kernel)
        initialise(conv, init, gain, generator)
        layers += [conv, _activation(activation), nn.MaxPool2d(2)]
        size = (size - kernel + 1) // 2
        if size < 1:
            raise ConfigError(f"convnet: image_size {image_size} is too small for {len(channels)} conv layers")
        width = out_channels
    layers.append(nn.Flatten())
    head = mlp(width * size * size, hidden, out_features, activation, init=init, generator=generator)
    layers += list(head)
    return nn.Sequential(*layers)
