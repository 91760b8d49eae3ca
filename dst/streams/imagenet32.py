"""Continual ImageNet-32 class files, in the layout of the loss-of-plasticity reference (Dohare et al.).

The benchmark draws 2 classes per task out of 1000 ImageNet classes downsampled to 32x32, with 600
training and 100 test images per class. The data cannot be downloaded here (no internet, and ImageNet
needs the user's own licence), so this module only reads a directory the user supplies.

On-disk layout (learned from the reference's ``lop/imagenet/single_expr.py`` and
``online_batch_expr.py``, which read ``data/classes/<class>.npy``):

- one NumPy ``.npy`` file per class, named ``<class_index>.npy`` (``0.npy`` ... ``999.npy``);
- each holds one array of 700 images: rows 0-599 are the training images, rows 600-699 the test
  images;
- each image is 3x32x32, channel-first (the reference feeds the arrays straight into
  ``nn.Conv2d(3, ...)`` without transposing). Channel-last 32x32x3 arrays are accepted too and
  transposed, since exports of downsampled ImageNet often store images that way;
- pixels are raw 0-255 values (the reference only casts them to float). uint8 is expected; any other
  integer or float dtype is accepted only if every value is a whole number in 0-255, so the
  conversion to uint8 is lossless.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

__all__ = [
    "FILE_PATTERN",
    "TEST_IMAGES_PER_CLASS",
    "TRAIN_IMAGES_PER_CLASS",
    "available_classes",
    "load_imagenet32_class",
]

TRAIN_IMAGES_PER_CLASS = 600
TEST_IMAGES_PER_CLASS = 100
FILE_PATTERN = "<class_index>.npy"
_SIDE, _CHANNELS = 32, 3

_WHERE_TO_GET = (
    "This data cannot be downloaded here. Get the continual-ImageNet archive linked from the "
    "loss-of-plasticity repository's lop/imagenet/README.md (or build it from the downsampled "
    "ImageNet 32x32 at image-net.org) and extract it so that the directory holds one file per class "
    f"named {FILE_PATTERN} (0.npy ... 999.npy), each a 700 x 3 x 32 x 32 uint8 array: 600 training "
    "then 100 test images. Pass that directory (or its parent holding classes/) as data_dir."
)


def available_classes(data_dir: str | os.PathLike[str]) -> list[int]:
    """Sorted class indices that have a ``<class_index>.npy`` file in ``data_dir``.

    ``data_dir`` may be the folder with the class files or its parent holding ``classes/``, as the
    reference's ``data/`` does. Raises :class:`~dst.errors.DataError` if there is no class file.
    """
    directory = _class_directory(data_dir)
    classes = sorted(int(path.stem) for path in directory.glob("*.npy") if path.stem.isdigit())
    if not classes:
        raise DataError(f"{directory} holds no class files ({FILE_PATTERN}). {_WHERE_TO_GET}")
    return classes


def load_imagenet32_class(
    data_dir: str | os.PathLike[str],
    class_index: int,
    *,
    train_images: int = TRAIN_IMAGES_PER_CLASS,
    test_images: int = TEST_IMAGES_PER_CLASS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training and test images of one class, each a uint8 tensor ``N x 3 x 32 x 32``.

    The file must hold exactly ``train_images + test_images`` images, training images first (600 and
    100 in the reference; smaller values serve tests). Labels are not stored: a task assigns them.
    Raises :class:`~dst.errors.DataError` for a missing or unreadable file, or a wrong shape or dtype.
    """
    directory = _class_directory(data_dir)
    path = directory / f"{int(class_index)}.npy"
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: class {class_index} is missing from {directory} "
            f"(expected one file per class named {FILE_PATTERN}). {_WHERE_TO_GET}"
        )
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"{path}: not a readable .npy array ({error}). Replace the file. {_WHERE_TO_GET}") from error

    count = train_images + test_images
    if array.ndim == 4 and array.shape[-1] == _CHANNELS and array.shape[1] != _CHANNELS:
        array = array.transpose(0, 3, 1, 2)  # channel-last on disk -> channel-first
    if array.shape != (count, _CHANNELS, _SIDE, _SIDE):
        raise DataError(
            f"{path}: array of shape {array.shape}, expected ({count}, {_CHANNELS}, {_SIDE}, {_SIDE}) "
            f"({train_images} training then {test_images} test images, channel-first or channel-last). "
            f"Replace the file. {_WHERE_TO_GET}"
        )
    images = torch.from_numpy(np.ascontiguousarray(_as_uint8(array, path)))
    return images[:train_images], images[train_images:]


def _class_directory(data_dir: str | os.PathLike[str]) -> Path:
    directory = Path(data_dir).expanduser()
    if not directory.is_dir():
        raise DataError(f"ImageNet-32 directory {directory} does not exist. {_WHERE_TO_GET}")
    nested = directory / "classes"
    if nested.is_dir() and not any(directory.glob("*.npy")):
        return nested
    return directory


def _as_uint8(array: np.ndarray, path: Path) -> np.ndarray:
    """The pixels as uint8, refusing any conversion that would change a value."""
    if array.dtype == np.uint8 or array.size == 0:
        return array.astype(np.uint8, copy=False)
    if array.dtype.kind not in "iuf":
        raise DataError(f"{path}: dtype {array.dtype}, expected uint8 pixels 0-255. Replace the file. {_WHERE_TO_GET}")
    finite = np.isfinite(array).all() if array.dtype.kind == "f" else True
    if not (finite and array.min() >= 0 and array.max() <= 255 and (np.mod(array, 1) == 0).all()):
        raise DataError(
            f"{path}: dtype {array.dtype} with values that are not whole numbers in 0-255 (range "
            f"{array.min()}..{array.max()}); expected raw uint8 pixels. If they were scaled to [0, 1], "
            f"save them as uint8(round(x * 255)). {_WHERE_TO_GET}"
        )
    return array.astype(np.uint8)
