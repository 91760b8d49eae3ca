"""Data loaders: MNIST IDX files and continual ImageNet-32 class files, on small generated files."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from dst.errors import DataError
from dst.streams import imagenet32, mnist
from dst.streams.imagenet32 import available_classes, load_imagenet32_class
from dst.streams.mnist import load_mnist, resolve_data_dir

REAL_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
UNREACHABLE = "http://127.0.0.1:9/"


# ---------------------------------------------------------------- MNIST helpers


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file of unsigned bytes: magic (0x0800 | ndim), big-endian dims, then the payload."""
    magic = 0x0800 | array.ndim if magic is None else magic
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes()


def write(path: Path, data: bytes, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path.with_name(path.name + ".gz") if gz else path
    target.write_bytes(gzip.compress(data) if gz else data)
    return target


def make_mnist(
    directory: Path, *, train: bool = True, n: int = 5, n_labels: int | None = None, gz: bool = False, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Write n random 28x28 images and their labels under the canonical names; return the arrays."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n if n_labels is None else n_labels, dtype=np.uint8)
    prefix = "train" if train else "t10k"
    write(directory / f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz)
    write(directory / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), gz)
    return images, labels


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch, tmp_path):
    """No test reads the user's cache, the caller's DST_DATA_DIR, or the network."""
    monkeypatch.delenv(mnist.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(mnist, "MIRRORS", [UNREACHABLE])
    monkeypatch.setattr(mnist, "DOWNLOAD_TIMEOUT_S", 5.0)


@pytest.fixture
def unchecked(monkeypatch):
    """Small generated files carry canonical names but not canonical contents."""
    monkeypatch.setattr(mnist, "CHECKSUMS", {})


# ---------------------------------------------------------------- MNIST


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
def test_mnist_round_trips_pixels_and_labels_exactly(tmp_path, unchecked, gz, train):
    images, labels = make_mnist(tmp_path, train=train, gz=gz)
    x, y = load_mnist(tmp_path, train=train, download=False)
    assert x.dtype == torch.uint8 and x.shape == (5, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (5,)
    assert np.array_equal(x.numpy(), images) and np.array_equal(y.numpy(), labels)


def test_mnist_prefers_raw_file_when_both_raw_and_gzip_exist(tmp_path, unchecked):
    raw_images, _ = make_mnist(tmp_path, seed=1)
    make_mnist(tmp_path, seed=2, gz=True)
    x, _ = load_mnist(tmp_path, download=False)
    assert np.array_equal(x.numpy(), raw_images)


def test_mnist_directory_resolution_argument_then_env_then_cache(tmp_path, monkeypatch, unchecked):
    argument_images, _ = make_mnist(tmp_path / "argument", seed=1)
    env_images, _ = make_mnist(tmp_path / "env", seed=2)
    cache_images, _ = make_mnist(tmp_path / "xdg-cache" / "dst" / "mnist", seed=3)

    assert np.array_equal(load_mnist(download=False)[0].numpy(), cache_images)
    monkeypatch.setenv(mnist.DATA_DIR_ENV, str(tmp_path / "env"))
    assert np.array_equal(load_mnist(download=False)[0].numpy(), env_images)
    assert np.array_equal(load_mnist(tmp_path / "argument", download=False)[0].numpy(), argument_images)


def test_mnist_default_directory_is_home_cache_when_xdg_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "dst" / "mnist"


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_mnist_truncated_payload_names_file_and_both_sizes(tmp_path, unchecked, gz):
    images, _ = make_mnist(tmp_path, gz=gz)
    full = idx_bytes(images)
    path = write(tmp_path / "train-images-idx3-ubyte", full[:-100], gz)
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path, download=False)
    message = str(error.value)
    assert path.name in message and "truncated" in message
    assert str(len(full)) in message and str(len(full) - 100) in message
    assert mnist.DATA_DIR_ENV in message


def test_mnist_wrong_magic_number_is_rejected(tmp_path, unchecked):
    make_mnist(tmp_path)
    labels_as_images = idx_bytes(np.zeros((5, 28, 28), np.uint8), magic=0x00000801)
    write(tmp_path / "train-images-idx3-ubyte", labels_as_images)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*magic number 0x00000801, expected 0x00000803"):
        load_mnist(tmp_path, download=False)


@pytest.mark.parametrize("damage", ["garbage", "cut-stream"])
def test_mnist_corrupt_gzip_is_rejected(tmp_path, unchecked, damage):
    make_mnist(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(b"this is not gzip" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz.*not a valid gzip file"):
        load_mnist(tmp_path, download=False)


def test_mnist_checksum_mismatch_names_file_and_both_checksums(tmp_path, monkeypatch):
    images, _ = make_mnist(tmp_path, gz=True)
    wrong = "0" * 32
    monkeypatch.setattr(mnist, "CHECKSUMS", {"train-images-idx3-ubyte": wrong})
    actual = hashlib.md5(idx_bytes(images)).hexdigest()
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path, download=False)
    message = str(error.value)
    assert "train-images-idx3-ubyte.gz" in message and wrong in message and actual in message
    # verify=False is the explicit way around it.
    assert load_mnist(tmp_path, download=False, verify=False)[0].shape == (5, 28, 28)


def test_mnist_image_and_label_counts_must_agree(tmp_path, unchecked):
    make_mnist(tmp_path, n=5, n_labels=4)
    with pytest.raises(DataError, match="5 images but .* 4 labels"):
        load_mnist(tmp_path, download=False)


def test_mnist_labels_outside_digits_are_rejected(tmp_path, unchecked):
    make_mnist(tmp_path)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.array([1, 2, 3, 4, 12])))
    with pytest.raises(DataError, match="label 12"):
        load_mnist(tmp_path, download=False)


def test_mnist_missing_files_with_failed_download_explain_fix_and_leave_nothing(tmp_path):
    directory = tmp_path / "empty" / "mnist"
    with pytest.raises(DataError) as error:
        load_mnist(directory, download=True)
    message = str(error.value)
    assert str(directory) in message and "DST_DATA_DIR" in message
    assert "train-images-idx3-ubyte" in message and "127.0.0.1" in message
    assert not directory.exists()


def test_mnist_failed_download_beside_present_file_adds_no_files(tmp_path, unchecked):
    directory = tmp_path / "mnist"
    make_mnist(directory)
    (directory / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing in .*: train-labels-idx1-ubyte"):
        load_mnist(directory, download=True)
    assert [p.name for p in directory.iterdir()] == ["train-images-idx3-ubyte"]


def test_mnist_missing_files_without_download_say_so(tmp_path):
    with pytest.raises(DataError, match="download=False.*DST_DATA_DIR"):
        load_mnist(tmp_path, download=False)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_mnist_download_skips_bad_mirror_and_installs_verified_gzip(tmp_path, monkeypatch):
    bad, good, target = tmp_path / "bad", tmp_path / "good", tmp_path / "target"
    make_mnist(bad, seed=1, gz=True)
    images, labels = make_mnist(good, seed=2, gz=True)
    monkeypatch.setattr(
        mnist,
        "CHECKSUMS",
        {
            "train-images-idx3-ubyte": hashlib.md5(idx_bytes(images)).hexdigest(),
            "train-labels-idx1-ubyte": hashlib.md5(idx_bytes(labels)).hexdigest(),
        },
    )
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(tmp_path))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setattr(mnist, "MIRRORS", [UNREACHABLE, f"{base}/bad/", f"{base}/good/"])
        x, y = load_mnist(target)
    finally:
        server.shutdown()
        server.server_close()
    assert np.array_equal(x.numpy(), images) and np.array_equal(y.numpy(), labels)
    assert sorted(p.name for p in target.iterdir()) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason=f"the real MNIST files are not at {REAL_MNIST}")
def test_real_mnist_files_load_and_match_canonical_checksums():
    x_train, y_train = load_mnist(REAL_MNIST, train=True, download=False, verify=True)
    x_test, y_test = load_mnist(REAL_MNIST, train=False, download=False, verify=True)
    assert x_train.shape == (60000, 28, 28) and y_train.shape == (60000,)
    assert x_test.shape == (10000, 28, 28) and y_test.shape == (10000,)
    for labels in (y_train, y_test):
        assert labels.min() >= 0 and labels.max() <= 9 and set(labels.unique().tolist()) == set(range(10))
    assert y_train[0].item() == 5
    assert x_train.max() == 255 and x_train.min() == 0


# ---------------------------------------------------------------- ImageNet-32

TRAIN, TEST = 4, 2


def class_array(class_index: int, n: int = TRAIN + TEST) -> np.ndarray:
    """n x 3 x 32 x 32 uint8; pixel value = 40 * class + 10 * channel + image (all distinct)."""
    image = np.arange(n).reshape(n, 1, 1, 1)
    channel = np.arange(3).reshape(1, 3, 1, 1)
    return np.broadcast_to(40 * class_index + 10 * channel + image, (n, 3, 32, 32)).astype(np.uint8)


@pytest.fixture
def imagenet_dir(tmp_path) -> Path:
    directory = tmp_path / "classes"
    directory.mkdir()
    for class_index in (0, 1, 4):
        np.save(directory / f"{class_index}.npy", class_array(class_index))
    (directory / "notes.txt").write_text("not a class")
    np.save(directory / "order.npy", np.arange(3))
    return directory


def load_small(directory: Path, class_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    return load_imagenet32_class(directory, class_index, train_images=TRAIN, test_images=TEST)


def test_imagenet_class_splits_training_then_test_images_channel_first(imagenet_dir):
    train, test = load_small(imagenet_dir, 4)
    assert train.dtype == test.dtype == torch.uint8
    assert train.shape == (TRAIN, 3, 32, 32) and test.shape == (TEST, 3, 32, 32)
    expected = torch.from_numpy(class_array(4))
    assert torch.equal(train, expected[:TRAIN]) and torch.equal(test, expected[TRAIN:])


def test_imagenet_channel_last_file_is_transposed_to_channel_first(imagenet_dir):
    np.save(imagenet_dir / "4.npy", class_array(4).transpose(0, 2, 3, 1))
    train, test = load_small(imagenet_dir, 4)
    assert torch.equal(torch.cat([train, test]), torch.from_numpy(class_array(4)))
    assert (train[0, 2] == 40 * 4 + 10 * 2).all()  # channel 2 of image 0


def test_imagenet_default_split_is_600_training_and_100_test(tmp_path):
    np.save(tmp_path / "7.npy", np.zeros((700, 3, 32, 32), np.uint8))
    train, test = load_imagenet32_class(tmp_path, 7)
    assert train.shape[0] == 600 and test.shape[0] == 100


def test_imagenet_available_classes_lists_numbered_files_only(imagenet_dir):
    assert available_classes(imagenet_dir) == [0, 1, 4]
    assert available_classes(imagenet_dir.parent) == [0, 1, 4]  # the reference's data/ with classes/
    assert torch.equal(load_small(imagenet_dir.parent, 1)[0], load_small(imagenet_dir, 1)[0])


def test_imagenet_missing_directory_says_where_to_get_data(tmp_path):
    for call in (lambda d: available_classes(d), lambda d: load_small(d, 0)):
        with pytest.raises(DataError) as error:
            call(tmp_path / "nowhere")
        message = str(error.value)
        assert "nowhere" in message and "cannot be downloaded" in message and imagenet32.FILE_PATTERN in message


def test_imagenet_empty_directory_has_no_classes(tmp_path):
    with pytest.raises(DataError, match="no class files"):
        available_classes(tmp_path)


def test_imagenet_missing_class_file_is_named(imagenet_dir):
    with pytest.raises(DataError, match=r"5\.npy does not exist: class 5"):
        load_small(imagenet_dir, 5)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((TRAIN + TEST, 3, 28, 28), np.uint8),
        np.zeros((TRAIN + TEST + 1, 3, 32, 32), np.uint8),
        np.zeros((TRAIN + TEST, 3 * 32 * 32), np.uint8),
    ],
    ids=["28x28", "one-image-too-many", "flattened"],
)
def test_imagenet_wrong_shape_is_rejected(imagenet_dir, array):
    np.save(imagenet_dir / "1.npy", array)
    with pytest.raises(DataError, match=r"1\.npy: array of shape"):
        load_small(imagenet_dir, 1)


@pytest.mark.parametrize(
    "array",
    [
        class_array(1).astype(np.float32) / 255,  # scaled pixels: not whole numbers
        class_array(0).astype(np.int16) - 1,  # class 0 starts at 0, so -1 appears
        class_array(1).astype(np.complex64),
        class_array(1).astype(bool),
    ],
    ids=["float-scaled", "negative", "complex", "bool"],
)
def test_imagenet_wrong_dtype_is_rejected(imagenet_dir, array):
    np.save(imagenet_dir / "1.npy", array)
    with pytest.raises(DataError, match=r"1\.npy: dtype"):
        load_small(imagenet_dir, 1)


def test_imagenet_whole_number_floats_convert_losslessly(imagenet_dir):
    np.save(imagenet_dir / "1.npy", class_array(1).astype(np.float64))
    train, _ = load_small(imagenet_dir, 1)
    assert train.dtype == torch.uint8 and torch.equal(train, torch.from_numpy(class_array(1))[:TRAIN])


def test_imagenet_unreadable_file_is_rejected(imagenet_dir):
    (imagenet_dir / "1.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match=r"1\.npy: not a readable \.npy array"):
        load_small(imagenet_dir, 1)
