"""Masked layers: the one abstraction every topology refresh works on.

``MaskedLinear`` and ``MaskedConv2d`` are ``nn.Linear`` / ``nn.Conv2d`` with a boolean ``mask`` buffer
shaped like ``weight`` (``None`` for a dense layer, which then costs nothing). The forward pass is the
parent's plain ``F.linear`` / ``F.conv2d`` on a weight whose masked entries are zero, so backward
produces the *dense* gradient: RigL reads it before :func:`mask_gradients` zeroes the masked entries
(the strategies' ``before_step``). With the masked gradient zero and the masked weight zero, every
optimizer state at a masked position stays zero for SGD (momentum, weight decay), Adam and AdamW.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .errors import ConfigError

__all__ = [
    "MaskedLinear",
    "MaskedConv2d",
    "MaskedMixin",
    "masked_layers",
    "mask_gradients",
    "apply_masks",
    "mask_of",
    "sparsify",
]

# Parameter -> owning masked layer. Optimizers that keep per-element clocks (dst.optim.ElementwiseAdam)
# look masks up here; a weak reference to the module survives `.to(device)`, which replaces buffers.
# Keyed by identity: a plain WeakKeyDictionary compares tensor keys with `==`, which is elementwise.
_OWNERS: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def mask_of(param: torch.Tensor) -> torch.Tensor | None:
    """The mask of the masked layer that owns ``param`` as its weight, or ``None``."""
    ref = _OWNERS.get(param)
    module = ref() if ref is not None else None
    if module is None or module.weight is not param:
        return None
    return module.mask


class MaskedMixin:
    """Mask bookkeeping shared by MaskedLinear and MaskedConv2d."""

    weight: nn.Parameter
    mask: torch.Tensor | None
    #: S for a population layer (weight (S, out, in)); None for a plain layer.
    members: int | None = None

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Install (or remove, with ``None``) the mask and zero the masked weights."""
        if mask is None:
            self._buffers["mask"] = None
            return
        if mask.shape != self.weight.shape:
            raise ConfigError(
                f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(self.weight.shape)}"
            )
        mask = mask.to(device=self.weight.device, dtype=torch.bool)
        self._buffers["mask"] = mask
        _OWNERS[self.weight] = weakref.ref(self)
        self.apply_mask()

    @property
    def is_sparse(self) -> bool:
        return self.mask is not None

    @property
    def density(self) -> float:
        if self.mask is None:
            return 1.0
        return float(self.mask.sum()) / self.mask.numel()

    @property
    def active_connections(self) -> int:
        return self.weight.numel() if self.mask is None else int(self.mask.sum())

    def _multiplier(self, like: torch.Tensor) -> torch.Tensor:
        """The mask as 1.0 / 0.0 in ``like``'s dtype, cached until the mask is replaced or changed in place
        (its ``_version``): a multiply by a float mask costs a fifth of one by a boolean mask on the CPU."""
        mask = self.mask
        assert mask is not None
        cached = self.__dict__.get("_float_mask")
        if (cached is None or cached[0] is not mask or cached[1] != mask._version
                or cached[2].dtype != like.dtype or cached[2].device != like.device):
            cached = (mask, mask._version, mask.to(like.dtype))
            self.__dict__["_float_mask"] = cached
        return cached[2]

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero the weights at masked positions."""
        if self.mask is not None:
            self.weight.mul_(self._multiplier(self.weight))

    @torch.no_grad()
    def mask_grad(self) -> None:
        """Zero the gradient at masked positions (call after backward, before the optimizer step)."""
        if self.mask is not None and self.weight.grad is not None:
            self.weight.grad.mul_(self._multiplier(self.weight.grad))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        key = prefix + "mask"
        if key in state_dict and self.mask is None and state_dict[key] is not None:
            # A dense layer receiving a sparse state: take the mask's shape first, then load it.
            self.set_mask(torch.ones_like(self.weight, dtype=torch.bool))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]
        if self.mask is not None:
            _OWNERS[self.weight] = weakref.ref(self)

    def _mask_repr(self) -> str:
        return "" if self.mask is None else f", density={self.density:.4f}"


class _MemberLinear(torch.autograd.Function):
    """y_s = x_s W_s^T + b_s for every member s (one batched product), with the gradients written out:
    for a batch of one the weight gradient g_s^T x_s is an outer product, far cheaper as a broadcast
    multiply than as S tiny matrix products (what autograd of ``baddbmm`` runs)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            transposed = grad.transpose(1, 2)
            grad_weight = transposed * x if x.shape[1] == 1 else torch.bmm(transposed, x)
        grad_bias = grad.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


class MaskedLinear(MaskedMixin, nn.Linear):
    """``nn.Linear`` with an optional boolean connection mask.

    With ``members=S`` it is a population layer: weight (S, out, in), bias (S, out), mask (S, out, in),
    input (S, batch, in) -> output (S, batch, out), one batched matmul for all members. Each member
    starts from PyTorch's default initialisation, drawn from ``generators[s]`` when given.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        mask: torch.Tensor | None = None,
        device=None,
        dtype=None,
        *,
        members: int | None = None,
        generators: Sequence[torch.Generator] | None = None,
    ) -> None:
        if members is None:
            super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        else:
            if isinstance(members, bool) or not isinstance(members, int) or members < 1:
                raise ConfigError(f"members must be a positive integer, got {members!r}")
            super().__init__(in_features, out_features, bias=bias, device="meta", dtype=dtype)
            factory = dict(device=device, dtype=dtype)
            self.weight = nn.Parameter(torch.empty(members, out_features, in_features, **factory))
            self.bias = nn.Parameter(torch.empty(members, out_features, **factory)) if bias else None
        self.members = members
        if members is not None:
            self.reset_members(generators)
        self.register_buffer("mask", None)
        if mask is not None:
            self.set_mask(mask)

    @torch.no_grad()
    def reset_members(self, generators: Sequence[torch.Generator] | None = None) -> None:
        """PyTorch's default initialisation, U(-1/sqrt(in), 1/sqrt(in)), per member from its generator."""
        assert self.members is not None
        if generators is not None and len(generators) != self.members:
            raise ConfigError(f"{len(generators)} generators for a layer of {self.members} members")
        bound = 1.0 / math.sqrt(self.in_features)
        for s in range(self.members):
            generator = None if generators is None else generators[s]
            self.weight[s].uniform_(-bound, bound, generator=generator)
            if self.bias is not None:
                self.bias[s].uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compact = self.__dict__.get("compact")  # a sparse backend's state (dst.backends), while in use
        if compact is not None and compact.active:
            if self.members is not None:
                return compact.apply(x)
            return compact.apply(x.reshape(1, -1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)
        if self.members is None:
            return F.linear(x, self.weight, self.bias)
        if x.dim() != 3 or x.shape[0] != self.members or x.shape[2] != self.in_features:
            raise ConfigError(
                f"a population layer of {self.members} members takes inputs shaped (members, batch, "
                f"{self.in_features}), got {tuple(x.shape)}"
            )
        return _MemberLinear.apply(x, self.weight, self.bias)

    @classmethod
    def from_dense(cls, layer: nn.Linear, mask: torch.Tensor | None = None) -> "MaskedLinear":
        """Wrap an existing layer, sharing its Parameter objects (an existing optimizer keeps working)."""
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        new.weight = layer.weight
        new.bias = layer.bias
        new.set_mask(mask)
        return new

    def extra_repr(self) -> str:
        members = "" if self.members is None else f", members={self.members}"
        return super().extra_repr() + members + self._mask_repr()


class MaskedConv2d(MaskedMixin, nn.Conv2d):
    """``nn.Conv2d`` with an optional boolean connection mask over (out, in, kh, kw)."""

    def __init__(self, *args, mask: torch.Tensor | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", None)
        if mask is not None:
            self.set_mask(mask)

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, mask: torch.Tensor | None = None) -> "MaskedConv2d":
        new = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            device="meta",
        )
        new.weight = layer.weight
        new.bias = layer.bias
        new.set_mask(mask)
        return new

    def extra_repr(self) -> str:
        return super().extra_repr() + self._mask_repr()


def masked_layers(model: nn.Module) -> Iterator[MaskedMixin]:
    """The layers of ``model`` that carry a mask (dense layers are skipped)."""
    for module in model.modules():
        if isinstance(module, MaskedMixin) and module.mask is not None:
            yield module


def mask_gradients(model: nn.Module) -> None:
    for layer in masked_layers(model):
        layer.mask_grad()


def apply_masks(model: nn.Module) -> None:
    for layer in masked_layers(model):
        layer.apply_mask()


def sparsify(
    model: nn.Module,
    density: float = 0.1,
    distribution: str = "erk",
    *,
    dense_first: bool = False,
    dense_last: bool = False,
    skip: tuple[str, ...] = (),
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Convert ``model``'s Linear/Conv2d layers to masked layers in place and return ``model``.

    ``density`` is the global fraction of active weights over the layers that are sparsified;
    ``distribution`` (``uniform``, ``er``, ``erk``, ``constant-fan-in``) spreads it over layers
    (``dst.sparsity``). Layers named in ``skip`` and, with ``dense_first``/``dense_last``, the first/last
    layer stay dense and are not part of the budget. Each layer gets exactly ``round(density_l * numel)``
    active weights at random positions (with ``constant-fan-in``, exactly ``fan_in_l`` in every unit's row)
    drawn from ``generator`` (or a fresh one seeded with ``seed``, or the global RNG). Density 1.0 leaves
    the model untouched.

    In a population, member s's masks come from a generator seeded with ``seed[s]`` (one seed per member),
    drawn layer by layer exactly as a population of one with that seed draws them.
    """
    from .population import check_seeds, is_population_module, members
    from .sparsity import fan_in_mask, layer_densities, layer_fan_ins, random_mask

    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density!r}")
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d))
    ]
    if not layers:
        raise ConfigError("sparsify found no nn.Linear or nn.Conv2d layer in the model")
    unknown = set(skip) - {name for name, _ in layers}
    if unknown:
        raise ConfigError(
            f"sparsify: skip names {sorted(unknown)} are not layers of the model; "
            f"layers: {[name for name, _ in layers]}"
        )
    if density == 1.0:
        return model
    keep_dense = set(skip)
    if dense_first:
        keep_dense.add(layers[0][0])
    if dense_last:
        keep_dense.add(layers[-1][0])
    targets = [(name, module) for name, module in layers if name not in keep_dense]
    if not targets:
        raise ConfigError("sparsify: every layer is kept dense; nothing to sparsify")
    size = members(model)
    shapes = [m.weight.shape[1:] if is_population_module(m) else m.weight.shape for _, m in targets]
    densities = layer_densities(shapes, float(density), distribution)
    if generator is not None:
        if size != 1:
            raise ConfigError("sparsify: a population draws its masks from one seed per member; pass seed=[...]")
        generators = [generator]
    else:
        seeds = [None] * size if seed is None else list(check_seeds(seed))
        if len(seeds) != size:
            raise ConfigError(f"sparsify: {len(seeds)} seeds for a population of {size} members")
        generators = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
    fan_ins = layer_fan_ins(shapes, densities) if distribution == "constant-fan-in" else None
    masks: list[list[torch.Tensor]] = [[] for _ in targets]
    for member_generator in generators:  # member by member, each drawing its layers in order
        for index, (layer_masks, shape) in enumerate(zip(masks, shapes)):
            if fan_ins is None:
                layer_masks.append(random_mask(shape, densities[index], member_generator))
            else:
                layer_masks.append(fan_in_mask(shape, fan_ins[index], member_generator))
    for (name, module), layer_masks in zip(targets, masks):
        mask = torch.stack(layer_masks) if is_population_module(module) else layer_masks[0]
        if isinstance(module, MaskedMixin):
            module.set_mask(mask)
            continue
        wrapper = MaskedConv2d if isinstance(module, nn.Conv2d) else MaskedLinear
        _replace_module(model, name, wrapper.from_dense(module, mask))
    return model


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
