"""Network builders used by the benchmarks: ``nn.Sequential`` of Linear/Conv2d and activations.

Weights are drawn from U(-b, b) with the bound of ``init`` (``dst.init``): hidden layers use the gain
of their activation, the output layer the linear gain; biases start at 0. ``init="default"`` is
PyTorch's own initialisation (weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))), drawn from the
generator. The Sequential layout is what ``Topology.from_model`` discovers.

``mlp(..., generators=[g_0, ..., g_{S-1}])`` builds a population of S members (``MaskedLinear`` layers
with ``members=S``): member s is initialised from ``g_s`` with exactly the draws a population of one
built from ``[g_s]`` makes, layer by layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .errors import ConfigError
from .init import activation_gain, fans, uniform_
from .masked import MaskedLinear
from .population import MemberLayerNorm

__all__ = ["mlp", "convnet", "ACTIVATION_MODULES", "NORMS", "initialise", "ActiveOutputs", "use_outputs"]

#: hidden-layer normalisations of :func:`mlp` (``layer``: a LayerNorm over the units, before the activation)
NORMS = ("none", "layer")

class CReLU(nn.Module):
    """Concatenated ReLU (Shang et al. 2016; against loss of plasticity, Abbas et al. 2023): each unit x gives
    two outputs, relu(x) and relu(-x), side by side, so the next layer takes twice the features and no unit
    is ever silent. Unit i's pair is features 2i and 2i + 1 of dimension ``dim`` (the last for linear
    layers, the channels, -3, for conv maps): the unit graph sees one unit with a block of two columns."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack((x.clamp(min=0), (-x).clamp(min=0)), self.dim).flatten(
            self.dim - 1 if self.dim < 0 else self.dim, self.dim if self.dim < 0 else self.dim + 1)

    def per_unit(self, output: torch.Tensor) -> torch.Tensor:
        """The output with each unit's pair in a dimension of its own after the units (a view)."""
        return output.unflatten(self.dim, (-1, 2))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class ActiveOutputs(nn.Module):
    """Passes on the first ``count`` of the outputs (the classes seen so far in a class-incremental stream);
    the loop sets ``count`` at each task start (:func:`use_outputs`). ``count`` is a buffer, saved with the
    model; forward reads a Python copy of it, so that it costs no device synchronisation."""

    def __init__(self, total: int) -> None:
        super().__init__()
        self.total = self._count = total
        self.register_buffer("count", torch.tensor(total))
        self.register_load_state_dict_post_hook(lambda module, keys: module.set_count(int(module.count)))

    def set_count(self, count: int) -> None:
        if not 0 < count <= self.total:
            raise ConfigError(f"the stream asks for {count} outputs of a model with {self.total}")
        self._count = count
        self.count.fill_(count)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._count == self.total else x[..., : self._count]

    def extra_repr(self) -> str:
        return f"{self._count} of {self.total}"


def use_outputs(model: nn.Module, count: int) -> None:
    """Let ``model``'s :class:`ActiveOutputs` pass on its first ``count`` outputs."""
    found = [module for module in model.modules() if isinstance(module, ActiveOutputs)]
    if not found:
        raise ConfigError(f"the stream's classes grow by task, but {type(model).__name__} has no ActiveOutputs "
                          "layer to restrict its outputs to the classes seen; end the model with dst.nets.ActiveOutputs")
    for module in found:
        module.set_count(count)


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
    "crelu": CReLU,
}


def _activation(name: str, conv: bool = False) -> nn.Module:
    if name == "crelu":
        return CReLU(-3 if conv else -1)
    try:
        return ACTIVATION_MODULES[name]()
    except KeyError:
        raise ConfigError(
            f"unknown activation {name!r}; use one of {', '.join(sorted(ACTIVATION_MODULES))}"
        ) from None


@torch.no_grad()
def initialise(layer: nn.Module, init: str, gain: float, generator: torch.Generator | None = None) -> None:
    """Initialise one plain Linear/Conv2d layer: U(-b, b) weights with the scheme's bound, zero bias."""
    _initialise(layer.weight, layer.bias, init, gain, generator)


@torch.no_grad()
def _initialise(
    weight: torch.Tensor, bias: torch.Tensor | None, init: str, gain: float, generator: torch.Generator | None
) -> None:
    """U(-b, b) weights with the scheme's bound and a zero bias; ``default`` is PyTorch's nn.Linear /
    nn.Conv2d initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the weight and then the bias."""
    fan_in, fan_out = fans(weight.shape)
    if init == "default":
        bound = 1.0 / math.sqrt(fan_in)
        weight.uniform_(-bound, bound, generator=generator)
        if bias is not None:
            bias.uniform_(-bound, bound, generator=generator)
        return
    uniform_(weight, init, fan_in, fan_out, gain, generator)
    if bias is not None:
        bias.zero_()


def mlp(
    in_features: int,
    hidden: Sequence[int],
    out_features: int,
    activation: str = "relu",
    *,
    init: str = "kaiming",
    norm: str = "none",
    generator: torch.Generator | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> nn.Sequential:
    """``in -> [Linear, (LayerNorm,) activation] * len(hidden) -> Linear -> out``; a population of
    ``len(generators)`` members when ``generators`` is given (then inputs are (members, batch, in)).
    ``norm="layer"`` puts a LayerNorm over each hidden layer's units before its activation (scale 1, shift 0;
    one per member in a population, :class:`dst.population.MemberLayerNorm`)."""
    if norm not in NORMS:
        raise ConfigError(f"mlp: unknown norm {norm!r}; use one of {', '.join(NORMS)}")
    if generators is not None and (generator is not None or not generators):
        raise ConfigError("mlp: give one generator, or a non-empty list of one generator per member")
    members = None if generators is None else len(generators)
    outputs = 2 if activation == "crelu" else 1  # features per hidden unit
    inputs = [in_features, *(outputs * width for width in hidden)]
    gains = [activation_gain(activation)] * len(hidden) + [activation_gain("linear")]
    linears = [
        nn.Linear(n_in, n_out) if members is None else MaskedLinear(n_in, n_out, members=members, device="meta")
        for n_in, n_out in zip(inputs, [*hidden, out_features])
    ]
    if members is None:
        for linear, gain in zip(linears, gains):
            initialise(linear, init, gain, generator)
    else:
        linears = [linear.to_empty(device="cpu") for linear in linears]
        for member, member_generator in enumerate(generators):  # type: ignore[arg-type]
            for linear, gain in zip(linears, gains):
                bias = None if linear.bias is None else linear.bias[member]
                _initialise(linear.weight[member], bias, init, gain, member_generator)
    layers: list[nn.Module] = []
    for linear, width in zip(linears[:-1], hidden):
        layers.append(linear)
        if norm == "layer":
            layers.append(nn.LayerNorm(width) if members is None else MemberLayerNorm(width, members))
        layers.append(_activation(activation))
    layers.append(linears[-1])
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
    outputs = 2 if activation == "crelu" else 1  # feature maps per channel
    for out_channels, kernel in zip(channels, kernel_sizes):
        conv = nn.Conv2d(width, out_channels, kernel)
        initialise(conv, init, gain, generator)
        layers += [conv, _activation(activation, conv=True), nn.MaxPool2d(2)]
        size = (size - kernel + 1) // 2
        if size < 1:
            raise ConfigError(f"convnet: image_size {image_size} is too small for {len(channels)} conv layers")
        width = outputs * out_channels
    layers.append(nn.Flatten())
    head = mlp(width * size * size, hidden, out_features, activation, init=init, generator=generator)
    layers += list(head)
    return nn.Sequential(*layers)
