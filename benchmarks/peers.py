"""The peers' sparse training steps, for ``sparse_speed.py``: rigl-torch's and sparsimony's RigL at 90%
sparsity, and plain PyTorch dense SGD (``nn.Sequential``, autograd, ``torch.optim.SGD``) as their reference.

Each peer is used as its README shows: rigl-torch's ``RigLScheduler`` gates ``optimizer.step()``;
sparsimony's ``RigL`` sparsifier is prepared on every linear weight and stepped after the optimizer. Both
refresh every 100 steps with drop fraction 0.3 (rigl-torch cosine-decays it, sparsimony's
``ConstantScheduler`` does not). Their layer densities are their own: rigl-torch has only ``uniform``, which
keeps the first layer dense (so 90% of the other layers' weights are gone, not 90% of all); sparsimony's
ERK is ERK. Neither is a requirement of dst: ``pip install --no-deps rigl-torch sparsimony`` adds them.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PEERS", "PeerLearner", "available", "seconds_per_step"]


def _sequential(n_in: int, hidden: list[int], n_out: int) -> nn.Sequential:
    sizes = [n_in, *hidden, n_out]
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _rigl_torch(model: nn.Module, optimizer: torch.optim.Optimizer, density: float) -> Callable[[], bool]:
    """rigl-torch's scheduler; it returns whether the optimizer should step."""
    if importlib.util.find_spec("torchvision") is None:
        # rigl_torch/util.py imports torchvision only to recognise ResNet blocks by type, which an MLP's
        # layers never are: two empty classes in their place leave what it does to an MLP unchanged.
        resnet = types.ModuleType("torchvision.models.resnet")
        resnet.Bottleneck = type("Bottleneck", (), {})
        resnet.BasicBlock = type("BasicBlock", (), {})
        sys.modules.update({"torchvision": types.ModuleType("torchvision"),
                            "torchvision.models": types.ModuleType("torchvision.models"),
                            "torchvision.models.resnet": resnet})
        sys.modules["torchvision"].models = sys.modules["torchvision.models"]  # type: ignore[attr-defined]
        sys.modules["torchvision.models"].resnet = resnet  # type: ignore[attr-defined]
    from rigl_torch.RigL import RigLScheduler

    return RigLScheduler(model, optimizer, dense_allocation=density, sparsity_distribution="uniform",
                         ignore_linear_layers=False, T_end=10_000_000, delta=100, alpha=0.3)


def _sparsimony(model: nn.Module, optimizer: torch.optim.Optimizer, density: float) -> Callable[[], bool]:
    """sparsimony's RigL sparsifier; stepped after the optimizer, so the gate is always open."""
    from sparsimony.distributions.base import ERKDistribution
    from sparsimony.dst.rigl import RigL
    from sparsimony.schedulers.base import ConstantScheduler

    sparsifier = RigL(scheduler=ConstantScheduler(0.3, 10_000_000, 100), distribution=ERKDistribution(),
                      optimizer=optimizer, sparsity=1 - density)
    sparsifier.prepare(model, [{"tensor_fqn": f"{name}.weight"} for name, module in model.named_modules()
                               if isinstance(module, nn.Linear)])
    return sparsifier


#: pip name -> (module, how to attach it to a model and its optimizer)
PEERS: dict[str, tuple[str, Callable[..., Callable[[], bool]]]] = {
    "rigl-torch": ("rigl_torch", _rigl_torch),
    "sparsimony": ("sparsimony", _sparsimony),
}


class PeerLearner:
    """Plain PyTorch training of the MLP, dense (``peer=None``) or with a peer's RigL at ``density``."""

    def __init__(self, shape: tuple[int, list[int], int], peer: str | None, density: float, batch: int,
                 device: str, steps: int) -> None:
        n_in, hidden, n_out = shape
        torch.manual_seed(0)
        self.model = _sequential(n_in, hidden, n_out).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.peer = peer
        self.sparsifier = PEERS[peer][1](self.model, self.optimizer, density) if peer is not None else None
        g = torch.Generator().manual_seed(3)
        self.x = torch.rand(steps, batch, n_in, generator=g).to(device)
        self.y = torch.randint(0, n_out, (steps, batch), generator=g).to(device)
        self.device = device

    def run(self) -> float:
        """CPU seconds per step over one block (wall seconds on a GPU)."""
        return seconds_per_step(self._block, len(self.x), self.device)

    def _block(self) -> None:
        for x, y in zip(self.x, self.y):
            self.optimizer.zero_grad()
            F.cross_entropy(self.model(x), y).backward()
            if self.peer == "rigl-torch":
                if self.sparsifier():  # type: ignore[misc]
                    self.optimizer.step()
            else:
                self.optimizer.step()
                if self.sparsifier is not None:
                    self.sparsifier.step()  # type: ignore[attr-defined]


def seconds_per_step(block: Callable[[], None], steps: int, device: str) -> float:
    """``block()``'s CPU seconds per step (``time.process_time``, which other processes disturb far less than
    wall time); on a GPU its wall seconds, synchronised before and after."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.process_time() if device == "cpu" else time.perf_counter()
    block()
    if device == "cuda":
        torch.cuda.synchronize()
    end = time.process_time() if device == "cpu" else time.perf_counter()
    return (end - start) / steps


def available(peer: str) -> str | None:
    """None when ``peer`` imports, else why not and the command that installs it."""
    if importlib.util.find_spec(PEERS[peer][0]) is None:
        return f"not installed (pip install --no-deps {peer})"
    return None
