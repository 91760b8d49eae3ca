"""A CIFAR ResNet-18 with BatchNorm whose unit graph covers its residual blocks.

The network of the authors' class-incremental CIFAR-100 experiment (``lop/nets/torchvision_modified_resnet.py``:
torchvision's ResNet-18 with a 3x3 stride-1 stem, no max-pool, and biases on every convolution): stem
conv 3x3 -> BN -> ReLU, four stages of two basic blocks (64, 128, 256, 512 channels; stride 2 at the first
block of stages 2-4, whose shortcut is a 1x1 conv + BN), global average pooling, one linear layer.
``width`` scales the channels (64: the paper's; the smoke preset uses 8).

Its hidden units, the ones unit-level strategies (CBP, ReDo, ...) refresh, are the channels of each basic
block's first convolution: conv1 -> bn1 -> ReLU feeds only the block's second convolution, so a channel
has exactly one consumer, and its BatchNorm entries (weight, bias, running mean and variance) are reset
with it. The other convolutions write into the residual stream: a channel of the stem, of a block's second
convolution or of a shortcut is summed with the same channel of every other block of its stage, read by
all of them and by the next stage, so no single consumer column carries it and zeroing "its outgoing
weights" would not remove it (ReDo's rule for ResNets, Sokar et al. 2023, likewise resets only the
block-internal layers). The authors' CBP code (``lop/algos/res_gnt.py``) also resets the stem and each
block's second convolution, taking the next convolution in a list as their consumer; that is not done here.

The logits pass through :class:`dst.nets.ActiveOutputs`: in a class-incremental stream only the outputs of
the classes seen so far are in use (the authors slice them the same way).

Initialisation as the authors' ``kaiming_init_resnet_module`` but uniform, as every dst network:
convolutions U(-b, b) with b = gain_relu * sqrt(3 / fan_in) (the variance of their Kaiming normal), the
linear layer with the linear gain, every bias 0, BatchNorm weight 1 and bias 0; CBP draws a replaced
channel's kernel from the same uniform (the authors' ResGnT from the normal of that variance). It is a plain torch model,
a population of one, which is how dst runs conv nets (``dst.population.forward`` strips the member dimension).
"""

from __future__ import annotations

import torch
from torch import nn

from .init import activation_gain
from .nets import ActiveOutputs, initialise
from .topology import HiddenLayer

__all__ = ["BasicBlock", "ResNet18"]


def _conv3x3(inputs: int, outputs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inputs, outputs, kernel_size=3, stride=stride, padding=1, bias=True)


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); ``act1`` is the units' activation."""

    def __init__(self, inputs: int, outputs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inputs, outputs, stride)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.act1 = nn.ReLU()
        self.conv2 = _conv3x3(outputs, outputs)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride=stride, bias=True),
                                          nn.BatchNorm2d(outputs))
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR ResNet-18: (batch, 3, 32, 32) images -> (batch, ``classes``) logits."""

    def __init__(self, classes: int = 100, width: int = 64, *, init: str = "kaiming",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv3x3(3, width), nn.BatchNorm2d(width), nn.ReLU())
        stages, channels = [], width
        for index, factor in enumerate((1, 2, 4, 8)):
            outputs = width * factor
            stride = 1 if index == 0 else 2
            stages.append(nn.Sequential(BasicBlock(channels, outputs, stride), BasicBlock(outputs, outputs)))
            channels = outputs
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)
        self.outputs = ActiveOutputs(classes)  # the classes seen so far (class-incremental streams)
        self.init = init
        self.reinitialise(generator)

    @torch.no_grad()
    def reinitialise(self, generator: torch.Generator | None = None) -> None:
        """Draw every weight afresh as at construction (in registration order, so the draws are a function of
        the generator alone), biases 0, BatchNorm weight 1, bias 0 and its running statistics reset."""
        relu, linear = activation_gain("relu"), activation_gain("linear")
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                initialise(module, self.init, relu, generator)
            elif isinstance(module, nn.Linear):
                initialise(module, self.init, linear, generator)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
                module.reset_running_stats()

    def blocks(self) -> list[BasicBlock]:
        return [module for module in self.modules() if isinstance(module, BasicBlock)]

    def unit_graph(self) -> list[HiddenLayer]:
        """One hidden layer per basic block: conv1 -> bn1 -> act1 -> conv2 (see the module docstring)."""
        names = {module: name for name, module in self.named_modules()}
        return [HiddenLayer(names[block.conv1], block.conv1, block.conv2, block.act1, norm=block.bn1)
                for block in self.blocks()]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features the linear layer reads, (batch, channels)."""
        return self.pool(self.stages(self.stem(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(self.fc(self.features(x)))
