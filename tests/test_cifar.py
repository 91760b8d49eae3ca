"""The CIFAR-100 loader on small files generated in the release's exact format."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dst.errors import DataError
from dst.streams import cifar100
from dst.streams.cifar100 import CIFAR100_DIR_ENV, load_cifar100, resolve_cifar100_dir


def write_cifar100_file(path: Path, data: np.ndarray, labels, *, byte_keys: bool = True, **extra) -> None:
    """A pickle as the release's (Python 2, protocol 2): keys as bytes when read with encoding='bytes'."""
    content = {"data": data, "fine_labels": list(labels), "coarse_labels": [0] * len(labels), **extra}
    if byte_keys:
        content = {key.encode(): value for key, value in content.items()}
    path.write_bytes(pickle.dumps(content, protocol=2))


def make_cifar100(root: Path, train_per_class: int = 6, test_per_class: int = 2, seed: int = 0) -> Path:
    """``root/cifar-100-python/{train,test}`` with ``*_per_class`` random images of each of the 100 classes,
    the classes interleaved as in the release; returns the ``cifar-100-python`` folder."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(100), per_class))
        data = rng.integers(0, 256, (labels.size, 3072), dtype=np.uint8)
        write_cifar100_file(folder / name, data, labels)
    return folder


def test_pixels_and_labels_round_trip_in_the_release_layout(tmp_path):
    data = np.arange(2 * 3072, dtype=np.int64).reshape(2, 3072) % 251
    write_cifar100_file(tmp_path / "train", data.astype(np.uint8), [7, 99])
    write_cifar100_file(tmp_path / "test", data.astype(np.uint8)[:1], [0], byte_keys=False)
    images, labels = load_cifar100(tmp_path)
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 32, 32)
    # image 1, green (channel 1), row 2, column 5 is data[1, 1024 + 2 * 32 + 5]
    assert int(images[1, 1, 2, 5]) == (3072 + 1024 + 69) % 251
    assert labels.tolist() == [7, 99] and labels.dtype == torch.int64
    test_images, test_labels = load_cifar100(tmp_path, train=False)
    assert torch.equal(test_images[0], images[0]) and test_labels.tolist() == [0]


def test_folder_from_argument_then_environment_and_its_cifar_100_python_child(tmp_path, monkeypatch):
    folder = make_cifar100(tmp_path / "data")
    monkeypatch.delenv(CIFAR100_DIR_ENV, raising=False)
    assert resolve_cifar100_dir(tmp_path / "data") == folder
    assert resolve_cifar100_dir(folder) == folder
    monkeypatch.setenv(CIFAR100_DIR_ENV, str(tmp_path / "data"))
    assert resolve_cifar100_dir() == folder
    images, labels = load_cifar100()
    assert images.shape == (600, 3, 32, 32) and torch.equal(torch.bincount(labels), torch.full((100,), 6))


def test_no_folder_or_a_missing_one_says_where_to_get_the_data(tmp_path, monkeypatch):
    monkeypatch.delenv(CIFAR100_DIR_ENV, raising=False)
    with pytest.raises(DataError, match=f"cifar-100-python.tar.gz.*{CIFAR100_DIR_ENV}"):
        load_cifar100()
    with pytest.raises(DataError, match="does not exist"):
        load_cifar100(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train is missing"):
        load_cifar100(tmp_path / "empty")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]), "truncated or corrupt"),
        (lambda path: path.write_bytes(b"not a pickle at all"), "truncated or corrupt"),
        (lambda path: path.write_bytes(pickle.dumps([1, 2, 3])), "holds a list"),
        (lambda path: path.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]})),
         "no fine_labels.*CIFAR-10"),
        (lambda path: write_cifar100_file(path, np.zeros((2, 1024), np.uint8), [0, 1]), r"shape \(2, 1024\)"),
        (lambda path: write_cifar100_file(path, np.zeros((2, 3072), np.float32), [0, 1]), "float32"),
        (lambda path: write_cifar100_file(path, np.zeros((2, 3072), np.uint8), [0]), "one integer label per image"),
        (lambda path: write_cifar100_file(path, np.zeros((2, 3072), np.uint8), [0, 100]), r"outside 0\.\.99"),
    ],
)
def test_a_damaged_file_is_an_error_naming_the_file_and_the_problem(tmp_path, damage, message):
    folder = make_cifar100(tmp_path)
    damage(folder / "train")
    with pytest.raises(DataError, match=message) as error:
        load_cifar100(folder)
    assert str(folder / "train") in str(error.value)


def test_a_file_of_the_canonical_size_must_have_the_releases_checksum(tmp_path, monkeypatch):
    folder = make_cifar100(tmp_path, train_per_class=1, test_per_class=1)
    monkeypatch.setitem(cifar100.CHECKSUMS, "test", (100, "0" * 32))  # this file's size, another digest
    with pytest.raises(DataError, match="MD5 .* not the release's 0000"):
        load_cifar100(folder, train=False)
    digest = hashlib.md5((folder / "test").read_bytes()).hexdigest()
    monkeypatch.setitem(cifar100.CHECKSUMS, "test", (100, digest))
    assert load_cifar100(folder, train=False)[0].shape == (100, 3, 32, 32)
