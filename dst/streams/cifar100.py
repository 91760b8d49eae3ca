"""CIFAR-100 from the standard python release (``cifar-100-python/train`` and ``test``), checked.

The data cannot be downloaded on these machines: a user downloads ``cifar-100-python.tar.gz`` from
https://www.cs.toronto.edu/~kriz/cifar.html, extracts it, and points the loader at the folder. Where it is
looked for, first match wins: the ``data_dir`` argument, then the environment variable ``DST_CIFAR100_DIR``;
either may name the ``cifar-100-python`` folder itself or the folder holding it.

Each file is a pickle (written by Python 2) of a dict with ``data``, a uint8 array of N x 3072 (the 1024
red, then green, then blue pixels of each 32 x 32 image, rows first) and ``fine_labels``, N ints in 0..99
(its other keys, coarse labels and file names, are not used). The loader checks the keys, the shape, the
dtype and the label range, and for a file of the canonical size (50,000 training or 10,000 test images)
the MD5 of the canonical release, so a truncated or altered copy is an error, never a silent
"loss of plasticity". Smaller files in the same format (tests, subsets) are read without the checksum.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

__all__ = ["CIFAR100_DIR_ENV", "CHECKSUMS", "CLASSES", "load_cifar100", "resolve_cifar100_dir"]

CIFAR100_DIR_ENV = "DST_CIFAR100_DIR"
CLASSES = 100
FOLDER = "cifar-100-python"
#: MD5 of the canonical files, and how many images each holds (only a file of that size is checked)
CHECKSUMS: dict[str, tuple[int, str]] = {
    "train": (50_000, "16019d7e3df5f24257cddd939b257f8d"),
    "test": (10_000, "f0ef6b0ae62326f3e7ffdfab6717acfc"),
}
_PIXELS = 3 * 32 * 32
_WHERE_TO_GET = (
    "CIFAR-100 cannot be downloaded here: download cifar-100-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html, extract it (tar xzf cifar-100-python.tar.gz) and pass the "
    f"folder as --bench data_dir=DIR or in ${CIFAR100_DIR_ENV}"
)


def resolve_cifar100_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding ``train`` and ``test``: ``data_dir``, else ``$DST_CIFAR100_DIR``, or the
    ``cifar-100-python`` folder inside either. A :class:`~dst.errors.DataError` says how to supply it."""
    given = str(data_dir) if data_dir else os.environ.get(CIFAR100_DIR_ENV, "")
    if not given:
        raise DataError(f"no CIFAR-100 folder given. {_WHERE_TO_GET}")
    directory = Path(given).expanduser()
    if not directory.is_dir():
        raise DataError(f"CIFAR-100 folder {directory} does not exist. {_WHERE_TO_GET}")
    nested = directory / FOLDER
    if nested.is_dir() and not (directory / "train").exists():
        return nested
    return directory


def load_cifar100(data_dir: str | os.PathLike[str] | None = None, *, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The training (or test) images as uint8 ``(N, 3, 32, 32)`` and their fine labels as int64 ``(N,)``."""
    path = resolve_cifar100_dir(data_dir) / ("train" if train else "test")
    if not path.is_file():
        raise DataError(f"{path} is missing: the CIFAR-100 folder must hold train and test. {_WHERE_TO_GET}")
    raw = path.read_bytes()
    try:
        content = pickle.loads(raw, encoding="bytes")
    except Exception as error:  # a truncated or foreign file: any unpickling failure
        raise DataError(f"{path}: not a readable CIFAR-100 pickle ({type(error).__name__}: {error}); the file "
                        f"is truncated or corrupt: extract it again. {_WHERE_TO_GET}") from None
    if not isinstance(content, dict):
        raise DataError(f"{path}: holds a {type(content).__name__}, not the CIFAR-100 dict of data and fine_labels")
    content = {key.decode() if isinstance(key, bytes) else key: value for key, value in content.items()}
    missing = [key for key in ("data", "fine_labels") if key not in content]
    if missing:
        raise DataError(f"{path}: no {' or '.join(missing)} (keys: {', '.join(map(str, content))}); is this the "
                        "CIFAR-10 release? dst needs cifar-100-python")
    data, labels = np.asarray(content["data"]), np.asarray(content["fine_labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise DataError(f"{path}: data is {data.dtype} of shape {data.shape}, expected uint8 of (N, {_PIXELS}): "
                        "the file is not in the CIFAR-100 python format")
    if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: fine_labels has shape {labels.shape} ({labels.dtype}) for {data.shape[0]} images; "
                        "expected one integer label per image")
    if labels.size and (labels.min() < 0 or labels.max() >= CLASSES):
        raise DataError(f"{path}: a fine label outside 0..{CLASSES - 1} (range {labels.min()}..{labels.max()}): "
                        "the file is corrupt, or not CIFAR-100")
    count, md5 = CHECKSUMS[path.name]
    if data.shape[0] == count and hashlib.md5(raw).hexdigest() != md5:
        raise DataError(f"{path}: {count} images but MD5 {hashlib.md5(raw).hexdigest()}, not the release's {md5}: "
                        f"the copy is altered or damaged. {_WHERE_TO_GET}")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype(np.int64))
