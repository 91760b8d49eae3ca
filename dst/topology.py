"""The unit graph: which layer produces each hidden unit, which activation it passes, who consumes it.

A *hidden unit* is an output row of a producer layer (an output channel of a conv). Its activation h
feeds input columns of a consumer layer: one column for linear -> linear, one input channel for
conv -> conv, and a block of ``block`` consecutive columns for conv -> flatten -> linear (PyTorch
flattens channel-major, so channel c owns columns [c*block, (c+1)*block)). A CReLU activation
(:class:`dst.nets.CReLU`) gives each unit two features side by side, so two columns (or channels) each.

``Topology.from_model`` discovers (producer, activation, consumer) triples in sequential MLPs and
ConvNets, in the order the modules are registered. Other models declare their triples explicitly, or
define ``unit_graph()`` returning them (:class:`dst.resnet.ResNet18` does), which ``from_model`` uses.

A normalisation layer between a producer and its activation (Linear -> LayerNorm -> ReLU, Conv2d ->
BatchNorm2d -> ReLU) belongs to the units: it has one weight, bias (and running mean and variance) per
unit, and a unit's surgery resets those entries too (as the authors' CBP code for ResNets does). A
normalisation layer anywhere else between producer and consumer, or one that does not act per unit,
is refused: a reset would leave its statistics stale.
In a population (``MaskedLinear(..., members=S)`` layers) every view below carries the leading member
dimension: ``incoming()`` is (S, units, fan_in), ``outgoing()`` (S, consumer_out, consumer_in),
``member_output`` (S, batch, units). A plain torch model is a population of one and gets the same views
with S = 1 (``dst.population.member_view``), so strategies are written once, on the member layout.
In a population the normalisation must be per member too (:class:`dst.population.MemberLayerNorm`); a
plain normalisation layer, one parameter set for all members, is refused.

Activations are captured with forward hooks only while a strategy has asked for them
(:meth:`Topology.start_capture` / :meth:`Topology.stop_capture`), so steps that need none pay nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import TopologyError
from .masked import MaskedMixin
from .nets import CReLU
from .population import MemberLayerNorm, is_population_module, member_view

__all__ = ["HiddenLayer", "Topology", "ACTIVATIONS", "NORMS"]

#: Modules treated as a unit's activation function (nn.Identity marks a deliberately linear layer).
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Hardtanh,
    nn.Identity,
    CReLU,
)
_WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)
#: Normalisation layers with per-unit parameters (and, for batch norm, per-unit running statistics).
NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, MemberLayerNorm)
_ANY_NORM = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm,
             MemberLayerNorm)


@dataclass(eq=False)
class HiddenLayer:
    """One layer of hidden units: ``producer`` rows -> ``activation`` -> ``consumer`` columns."""

    name: str
    producer: nn.Module
    consumer: nn.Module
    activation: nn.Module | None = None
    block: int = 1
    #: Normalisation between producer and activation, whose per-unit entries are reset with the unit.
    norm: nn.Module | None = None
    #: Latest captured activation (batch, units[, H, W]); set only while capture is on.
    output: torch.Tensor | None = field(default=None, repr=False)

    @property
    def n_units(self) -> int:
        return _units(self.producer)

    @property
    def members(self) -> int:
        """S: the population size (1 for a plain model)."""
        return self.incoming().shape[0]

    def incoming(self) -> torch.Tensor:
        """The producer's weight as (S, units, fan_in[, kh, kw]) (a view: writes go to the weight)."""
        return member_view(self.producer, self.producer.weight)

    def incoming_bias(self) -> torch.Tensor | None:
        """The producer's bias as (S, units), or None."""
        bias = self.producer.bias
        return None if bias is None else member_view(self.producer, bias)

    def incoming_mask(self) -> torch.Tensor | None:
        """The producer's mask as (S, units, fan_in[, kh, kw]), or None for a dense producer."""
        mask = getattr(self.producer, "mask", None)
        return None if mask is None else member_view(self.producer, mask)

    def outgoing(self) -> torch.Tensor:
        """The consumer's weight as (S, consumer_out, consumer_in[, kh, kw])."""
        return member_view(self.consumer, self.consumer.weight)

    def consumer_bias(self) -> torch.Tensor | None:
        """The consumer's bias as (S, consumer_out), or None."""
        bias = self.consumer.bias
        return None if bias is None else member_view(self.consumer, bias)

    @property
    def member_output(self) -> torch.Tensor | None:
        """The latest captured activation as (S, batch, units[, H, W]), or None; after a CReLU each unit's pair
        is a dimension of its own after the units: (S, batch, units, 2[, H, W])."""
        return None if self.output is None else member_view(self.producer, self.output)

    @property
    def is_conv(self) -> bool:
        return isinstance(self.producer, nn.Conv2d)

    @property
    def capture_module(self) -> nn.Module:
        """The module whose forward output is the units' activation h."""
        return self.activation if self.activation is not None else self.producer

    def consumer_columns(self, units: torch.Tensor) -> torch.Tensor:
        """Consumer input indices (dim 1 of its weight) fed by ``units`` (a 1-D long tensor)."""
        if self.block == 1:
            return units
        offsets = torch.arange(self.block, device=units.device)
        return (units[:, None] * self.block + offsets).reshape(-1)

    def outgoing_weights(self) -> torch.Tensor:
        """Consumer weights viewed as (S, consumer_out, units, block * kernel...) for per-unit reductions."""
        weight = self.outgoing()
        return weight.reshape(weight.shape[0], weight.shape[1], self.n_units, -1)


def _units(module: nn.Module) -> int:
    """Output units (rows, channels) of a Linear/Conv2d, plain or population."""
    return module.weight.shape[1 if is_population_module(module) else 0]


def _inputs(module: nn.Module) -> int:
    """Input columns (channels) of a Linear/Conv2d, plain or population."""
    return module.weight.shape[2 if is_population_module(module) else 1]


def _validate_norm(name: str, producer: nn.Module, norm: nn.Module) -> None:
    """Check that ``norm`` keeps one set of parameters per unit of ``producer``."""
    if isinstance(norm, MemberLayerNorm):
        if norm.members != getattr(producer, "members", None) or norm.units != _units(producer):
            raise TopologyError(
                f"{name}: a MemberLayerNorm of {norm.units} units x {norm.members} members after a producer of "
                f"{_units(producer)} units x {getattr(producer, 'members', None)} members; they must match"
            )
        return
    if is_population_module(producer):
        raise TopologyError(
            f"{name}: {type(norm).__name__} after a population layer has one parameter set for all members; "
            "use dst.population.MemberLayerNorm (one per member), or build the model from plain torch layers "
            "(a population of one)"
        )
    units = producer.weight.shape[0]
    if isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm2d)):
        per_unit = norm.num_features == units
    elif isinstance(norm, nn.GroupNorm):
        per_unit = norm.num_channels == units
    elif isinstance(norm, nn.LayerNorm):
        per_unit = isinstance(producer, nn.Linear) and tuple(norm.normalized_shape) == (units,)
    else:
        per_unit = False
    if not per_unit:
        raise TopologyError(
            f"{name}: {type(norm).__name__} after the producer does not keep one parameter set per unit "
            f"({units} units), so a unit reset would leave it stale; use BatchNorm1d/2d, GroupNorm or a "
            "LayerNorm over the units, or declare the hidden layers explicitly"
        )


def _validate_pair(name: str, producer: nn.Module, consumer: nn.Module, activation: nn.Module | None = None) -> int:
    """Check that producer's units match consumer's inputs and return the block size (a CReLU activation
    gives each unit two features, so two consumer columns or channels)."""
    if getattr(producer, "members", None) != getattr(consumer, "members", None):
        raise TopologyError(
            f"{name}: producer has members={getattr(producer, 'members', None)} but its consumer has "
            f"members={getattr(consumer, 'members', None)}; a population's layers all have the same members"
        )
    units = _units(producer)
    outputs = 2 if isinstance(activation, CReLU) else 1  # features per unit
    doubled = "" if outputs == 1 else f" ({outputs * units} after its CReLU)"
    if isinstance(consumer, nn.Conv2d):
        if not isinstance(producer, nn.Conv2d):
            raise TopologyError(f"{name}: a linear layer cannot feed a conv layer in a unit graph")
        if consumer.groups != 1 or consumer.in_channels != outputs * units:
            raise TopologyError(
                f"{name}: producer has {units} channels{doubled} but the consumer conv takes "
                f"{consumer.in_channels} (groups={consumer.groups})"
            )
        return outputs
    columns = _inputs(consumer)
    if isinstance(producer, nn.Conv2d):
        if columns % (outputs * units) != 0:
            raise TopologyError(
                f"{name}: consumer takes {columns} inputs, not a multiple of the producer's {units} "
                f"channels{doubled}; declare the hidden layers explicitly"
            )
        return columns // units
    if columns != outputs * units:
        raise TopologyError(
            f"{name}: producer has {units} units{doubled} but the consumer takes {columns} inputs; "
            "declare the hidden layers explicitly"
        )
    return outputs


class Topology:
    """The hidden layers of a model, and activation capture for the strategies that need it.

    ``Topology.from_model(model)`` discovers the triples lazily, on first use of :attr:`hidden_layers`,
    so strategies that never touch units (plain backprop, SET, RigL) work on any model.
    ``Topology(model, [("fc1", "act1", "fc2"), ...])`` declares them explicitly by module name; the
    activation may be ``None`` to capture the producer's output.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[tuple[str, str | None, str]] | Sequence[HiddenLayer] | None = None,
    ) -> None:
        self.model = model
        self._declared = layers
        self._layers: list[HiddenLayer] | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @classmethod
    def from_model(cls, model: nn.Module) -> "Topology":
        """The model's own declaration (its ``unit_graph()``) when it has one, else discovery."""
        declare = getattr(model, "unit_graph", None)
        return cls(model, declare()) if callable(declare) else cls(model)

    # -- discovery ----------------------------------------------------------------------------
    @property
    def hidden_layers(self) -> list[HiddenLayer]:
        if self._layers is None:
            self._layers = self._declare() if self._declared is not None else self._discover()
        return self._layers

    def _declare(self) -> list[HiddenLayer]:
        layers = []
        for item in self._declared or ():
            if isinstance(item, HiddenLayer):
                item.block = _validate_pair(item.name, item.producer, item.consumer, item.activation)
                if item.norm is not None:
                    _validate_norm(item.name, item.producer, item.norm)
                layers.append(item)
                continue
            try:
                producer_name, activation_name, consumer_name = item
            except (TypeError, ValueError):
                raise TopologyError(
                    f"a declared hidden layer must be (producer, activation, consumer) names, got {item!r}"
                ) from None
            modules = dict(self.model.named_modules())
            for module_name in (producer_name, activation_name, consumer_name):
                if module_name is not None and module_name not in modules:
                    raise TopologyError(f"declared module {module_name!r} is not in the model")
            producer, consumer = modules[producer_name], modules[consumer_name]
            for role, module in (("producer", producer), ("consumer", consumer)):
                if not isinstance(module, _WEIGHT_LAYERS):
                    raise TopologyError(f"{role} {module!r} must be an nn.Linear or nn.Conv2d")
            activation = modules[activation_name] if activation_name is not None else None
            block = _validate_pair(producer_name, producer, consumer, activation)
            layers.append(HiddenLayer(producer_name, producer, consumer, activation, block))
        return layers

    def _discover(self) -> list[HiddenLayer]:
        layers: list[HiddenLayer] = []
        producer_name, producer, activation, norm = None, None, None, None
        for name, module in self.model.named_modules():
            if any(True for _ in module.children()):
                continue  # containers: only leaves take part
            if isinstance(module, _WEIGHT_LAYERS):
                if producer is not None:
                    if activation is None:
                        raise TopologyError(
                            f"no activation module between {producer_name!r} and {name!r}. If the model "
                            "applies its activation functionally (F.relu), declare the hidden layers "
                            "explicitly with Topology(model, [(producer, activation, consumer), ...]); "
                            "mark a deliberately linear layer with nn.Identity()."
                        )
                    block = _validate_pair(producer_name, producer, module, activation)
                    layers.append(HiddenLayer(producer_name, producer, module, activation, block, norm=norm))
                producer_name, producer, activation, norm = name, module, None, None
            elif isinstance(module, _ANY_NORM) and producer is not None:
                if activation is not None or norm is not None:
                    raise TopologyError(
                        f"{name!r} normalises the units of {producer_name!r} after their activation (or after "
                        "another normalisation); only one normalisation between a producer and its activation "
                        "is supported (Linear/Conv2d -> norm -> activation), since a unit reset would leave "
                        "this one's statistics stale"
                    )
                _validate_norm(producer_name, producer, module)
                norm = module
            elif isinstance(module, ACTIVATIONS) and producer is not None and activation is None:
                activation = module
        return layers

    # -- views --------------------------------------------------------------------------------
    def weight_layers(self) -> list[nn.Module]:
        """Every Linear/Conv2d (masked or not) in registration order."""
        return [m for m in self.model.modules() if isinstance(m, _WEIGHT_LAYERS)]

    def masked_layers(self) -> list[MaskedMixin]:
        """The layers carrying a mask."""
        return [m for m in self.model.modules() if isinstance(m, MaskedMixin) and m.mask is not None]

    def __len__(self) -> int:
        return len(self.hidden_layers)

    def __iter__(self) -> Iterator[HiddenLayer]:
        return iter(self.hidden_layers)

    def __repr__(self) -> str:
        parts = [
            f"{layer.name}: {layer.n_units} units -> {type(layer.consumer).__name__}"
            + (f" (block {layer.block})" if layer.block != 1 else "")
            for layer in self.hidden_layers
        ]
        return f"Topology({'; '.join(parts)})"

    # -- activation capture -------------------------------------------------------------------
    @property
    def capturing(self) -> bool:
        return bool(self._handles)

    def start_capture(self) -> None:
        """Store each hidden layer's activation on every forward pass from now on."""
        if self._handles:
            return
        for layer in self.hidden_layers:

            per_unit = layer.activation.per_unit if isinstance(layer.activation, CReLU) else None

            def hook(module, inputs, output, layer=layer, per_unit=per_unit):
                output = output.detach()
                layer.output = output if per_unit is None else per_unit(output)  # a CReLU unit's pair after it

            self._handles.append(layer.capture_module.register_forward_hook(hook))

    def stop_capture(self) -> None:
        """Remove the hooks and drop stored activations."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self._layers or ():
            layer.output = None

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[HiddenLayer]]:
        """``with topology.capture() as layers: model(x)`` then read ``layer.output``."""
        already = self.capturing
        self.start_capture()
        try:
            yield self.hidden_layers
        finally:
            if not already:
                # keep the outputs readable after the block; only remove the hooks
                for handle in self._handles:
                    handle.remove()
                self._handles.clear()
