"""MNIST from the original IDX files, checked against the canonical checksums.

The permuted-MNIST benchmark needs the real 60,000 training images, and a silently truncated or
corrupt copy would show up as a "loss of plasticity" that is really a data bug. So the loader parses
the IDX header itself, checks that the payload length matches it, and (by default) checks the MD5 of
the decompressed bytes against the canonical values.

Where the files are looked for, first match wins:

1. the ``data_dir`` argument;
2. the environment variable ``DST_DATA_DIR`` (the folder holding the MNIST files themselves,
   e.g. ``DST_DATA_DIR=../shared/data/mnist`` from the project root);
3. ``$XDG_CACHE_HOME/dst/mnist``, or ``~/.cache/dst/mnist`` when ``XDG_CACHE_HOME`` is unset.

Each file may be raw (``train-images-idx3-ubyte``) or gzip (``train-images-idx3-ubyte.gz``); the raw
one is used when both exist. Missing files are downloaded from ``MIRRORS`` unless ``download=False``.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

__all__ = ["CHECKSUMS", "DATA_DIR_ENV", "MIRRORS", "load_mnist", "resolve_data_dir"]

DATA_DIR_ENV = "DST_DATA_DIR"

#: MD5 of the decompressed canonical files (identical on every mirror). Only files with these names
#: are checked, so tests can build small files under the same names and set this to ``{}``.
CHECKSUMS: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

#: Base URLs serving ``<name>.gz``, tried in order.
MIRRORS: list[str] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",  # the one torchvision uses first
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]
DOWNLOAD_TIMEOUT_S = 30.0

_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_SIDE = 28
_FIX = (
    f"Delete it and let the loader download it again, or point {DATA_DIR_ENV} (or data_dir) at a good copy, "
    f"e.g. {DATA_DIR_ENV}=../shared/data/mnist."
)


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The MNIST directory: ``data_dir``, else ``$DST_DATA_DIR``, else the user cache directory."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    from_env = os.environ.get(DATA_DIR_ENV)
    if from_env:
        return Path(from_env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "dst" / "mnist"


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    train: bool = True,
    *,
    download: bool = True,
    verify: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST training (``train=True``, 60,000) or test (10,000) split.

    Returns ``(images, labels)``: a uint8 tensor ``N x 28 x 28`` of raw pixel values and an int64
    tensor ``N`` of digits 0-9. With ``verify`` the decompressed files must match ``CHECKSUMS``.
    Raises :class:`~dst.errors.DataError` for a missing, truncated, corrupt or mismatched file.
    """
    directory = resolve_data_dir(data_dir)
    prefix = "train" if train else "t10k"
    images_name, labels_name = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    missing = [name for name in (images_name, labels_name) if _find(directory, name) is None]
    if missing:
        _fetch_missing(directory, missing, download=download, verify=verify)

    # After a successful download the .gz copy is there.
    images = _read_idx(_find(directory, images_name) or directory / f"{images_name}.gz", _IMAGES_MAGIC, verify)
    labels = _read_idx(_find(directory, labels_name) or directory / f"{labels_name}.gz", _LABELS_MAGIC, verify)
    if images.shape[1:] != (_SIDE, _SIDE):
        raise DataError(
            f"{directory / images_name}: images are {images.shape[1]}x{images.shape[2]}, MNIST's are "
            f"{_SIDE}x{_SIDE}. The file is not MNIST. {_FIX}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{directory}: {images_name} holds {len(images)} images but {labels_name} holds {len(labels)} "
            f"labels; the two files come from different copies. {_FIX}"
        )
    if labels.size and labels.max() > 9:
        raise DataError(f"{directory / labels_name}: label {int(labels.max())} is not a digit 0-9. {_FIX}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def _find(directory: Path, name: str) -> Path | None:
    """The raw file if present, else the gzip one, else None."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _decompressed_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: not a valid gzip file ({error}). {_FIX}") from error


def _read_idx(path: Path, magic: int, verify: bool) -> np.ndarray:
    """Parse one IDX file of unsigned bytes, checking its header, its length and its checksum."""
    data = _decompressed_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: {len(data)} bytes, too short for an IDX header; the file is truncated. {_FIX}")
    found_magic = int.from_bytes(data[:4], "big")
    if found_magic != magic:
        raise DataError(
            f"{path}: IDX magic number 0x{found_magic:08x}, expected 0x{magic:08x} "
            f"({'images' if magic == _IMAGES_MAGIC else 'labels'}); the file is not what its name says. {_FIX}"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: {len(data)} bytes, shorter than its {header}-byte IDX header; truncated. {_FIX}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected, actual = header + int(np.prod(dims)), len(data)
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its header says"
        raise DataError(
            f"{path}: header says {'x'.join(map(str, dims))} so {expected} bytes (decompressed), "
            f"found {actual}; the file is {what}. {_FIX}"
        )
    canonical = CHECKSUMS.get(_canonical_name(path))
    if verify and canonical is not None:
        actual_md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if actual_md5 != canonical:
            raise DataError(
                f"{path}: MD5 of the decompressed bytes is {actual_md5}, expected {canonical}; the file is "
                f"corrupt or not the canonical MNIST. {_FIX}"
            )
    return np.frombuffer(data, dtype=np.uint8, count=expected - header, offset=header).reshape(dims)


def _canonical_name(path: Path) -> str:
    return path.name.removesuffix(".gz")


def _fetch_missing(directory: Path, missing: list[str], *, download: bool, verify: bool) -> None:
    """Download each missing file or raise a DataError that says how to supply the files by hand."""
    failure = "downloading is off (download=False)"
    if download:
        for name in list(missing):
            error = _download(directory, name, verify)
            if error is not None:  # stop: the next file would only wait out the same timeouts
                failure = f"downloading from every mirror failed (last error: {error})"
                break
            missing.remove(name)
        if not missing:
            return
    listed = ", ".join(f"{name}[.gz]" for name in missing)
    raise DataError(
        f"MNIST files missing in {directory}: {listed}; {failure}. Put the four IDX files "
        "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, "
        f"raw or .gz) in {directory}, or set {DATA_DIR_ENV} (or pass data_dir) to a folder holding them, "
        f"e.g. {DATA_DIR_ENV}=../shared/data/mnist from the project root."
    )


def _download(directory: Path, name: str, verify: bool) -> str | None:
    """Fetch ``name.gz`` from the first mirror that serves a valid copy; the error text if none does.

    The body is held in memory and checked before anything is written, then written to a temporary
    file beside the target and renamed into place, so no partial file is ever left behind.
    """
    last_error = "no mirrors configured"
    for base in MIRRORS:
        url = base.rstrip("/") + f"/{name}.gz"
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                body = response.read()
            data = gzip.decompress(body)
        except (OSError, EOFError, zlib.error, ValueError, http.client.HTTPException) as error:
            last_error = f"{url}: {error}"
            continue
        canonical = CHECKSUMS.get(name)
        if verify and canonical is not None:
            actual = hashlib.md5(data, usedforsecurity=False).hexdigest()
            if actual != canonical:
                last_error = f"{url}: MD5 {actual}, expected {canonical}"
                continue
        try:
            _write_atomically(directory / f"{name}.gz", body)
        except OSError as error:
            return f"cannot write into {directory}: {error}"
        return None
    return last_error


def _write_atomically(target: Path, body: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(body)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
