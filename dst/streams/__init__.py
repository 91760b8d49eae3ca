"""Continual problems: each yields (x, y, task) batches for a population of members, one seed each."""

from .base import Stream, derive_seed
from .bit_flipping import BitFlippingStream, LTUTarget
from .imagenet32 import available_classes, load_imagenet32_class
from .imagenet_tasks import ContinualImageNetStream
from .mnist import load_mnist
from .mnist_tasks import PermutedMNISTStream, RandomLabelMNISTStream

__all__ = [
    "Stream",
    "derive_seed",
    "BitFlippingStream",
    "LTUTarget",
    "PermutedMNISTStream",
    "RandomLabelMNISTStream",
    "load_mnist",
    "load_imagenet32_class",
    "available_classes",
    "ContinualImageNetStream",
]
