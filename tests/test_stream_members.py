"""Populations: every stream serves S members, each exactly the data of a one-member stream of its seed,
and a one-member stream of seed 0 yields exactly what the streams yielded before they had members."""

from pathlib import Path

import pytest
import torch

import dst.streams.base
from dst.errors import ConfigError
from dst.streams import BitFlippingStream, PermutedMNISTStream, RandomLabelMNISTStream, load_mnist
from dst.streams.base import CHUNK_BYTES, steps_per_chunk

REAL_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
SEEDS = (4, 0, 9)


def _fake_mnist(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g)


IMAGES, LABELS = _fake_mnist()

MAKERS = {
    "bit-flipping-one": lambda seeds, **kw: BitFlippingStream(
        seeds, change_every=100, batch_size=4, probe_size=30, **kw),
    "bit-flipping-all": lambda seeds, **kw: BitFlippingStream(
        seeds, flip="all", change_every=100, batch_size=4, probe_size=30, **kw),
    "permuted-mnist": lambda seeds, **kw: PermutedMNISTStream(
        IMAGES, LABELS, seeds, examples_per_task=40, batch_size=4, probe_size=8, **kw),
    "random-label-mnist": lambda seeds, **kw: RandomLabelMNISTStream(
        IMAGES, LABELS, seeds, subset=32, epochs=3, batch_size=8, probe_size=16, **kw),
}
streams = pytest.mark.parametrize("name", list(MAKERS))


def _take(stream, start, steps):
    batches = stream.batches(start)
    return [next(batches) for _ in range(steps)]


def checksum(t: torch.Tensor, scale: float = 1) -> int:
    """An order-sensitive integer checksum of a tensor of integers (times ``scale``)."""
    ints = torch.round(t.double().flatten() * scale).long()
    return int((ints * (torch.arange(ints.numel()) % 1009 + 1)).sum())


def _checksums(items, scale):
    x, y = torch.cat([x for x, _, _ in items]), torch.cat([y for _, y, _ in items])
    return checksum(x, scale), checksum(y)


@streams
def test_each_member_sees_exactly_the_data_of_a_one_member_stream_of_its_seed(name):
    make = MAKERS[name]
    population = make(SEEDS)
    start, steps = population.steps_per_task + 3, 2 * population.steps_per_task  # mid-task, across 2 boundaries
    together = _take(population, start, steps)
    for member, seed in enumerate(SEEDS):
        alone = make((seed,))
        for (x, y, task), (x1, y1, task1) in zip(together, _take(alone, start, steps)):
            assert task == task1
            assert torch.equal(x[member], x1[0]) and torch.equal(y[member], y1[0])
        for task in (0, 2):
            (px, py), (px1, py1) = population.probe_batch(task), alone.probe_batch(task)
            assert torch.equal(px[member], px1[0]) and torch.equal(py[member], py1[0])


@streams
def test_batches_from_a_start_step_equal_the_tail_of_a_full_iteration(name):
    make = MAKERS[name]
    per_task = make(SEEDS).steps_per_task
    full = _take(make(SEEDS), 0, 3 * per_task)
    for start in (per_task // 2 + 1, per_task, 2 * per_task - 1):
        for step, (x, y, task) in enumerate(_take(make(SEEDS), start, 3 * per_task - start), start):
            assert task == full[step][2] == step // per_task
            assert torch.equal(x, full[step][0]) and torch.equal(y, full[step][1])


@pytest.mark.parametrize("name, chunk_bytes", [  # a few steps per chunk, not dividing a task
    ("bit-flipping-one", 50_000), ("bit-flipping-all", 50_000), ("permuted-mnist", 250_000),
    ("random-label-mnist", 400_000),
])
def test_small_chunks_yield_the_same_batches(name, chunk_bytes, monkeypatch):
    make = MAKERS[name]
    whole = make(SEEDS)
    monkeypatch.setattr(dst.streams.base, "CHUNK_BYTES", chunk_bytes)
    chunked = make(SEEDS)
    assert 1 < chunked.steps_per_chunk < whole.steps_per_task and whole.steps_per_task % chunked.steps_per_chunk
    assert whole.steps_per_chunk == whole.steps_per_task
    for (x, y, task), (x1, y1, task1) in zip(_take(whole, 5, 60), _take(chunked, 5, 60)):
        assert task == task1 and torch.equal(x, x1) and torch.equal(y, y1)


@pytest.mark.parametrize("name, x_shape, y_shape, probe_x, probe_y, y_dtype", [
    ("bit-flipping-one", (3, 4, 20), (3, 4, 1), (3, 30, 20), (3, 30, 1), torch.float32),
    ("permuted-mnist", (3, 4, 784), (3, 4), (3, 8, 784), (3, 8), torch.long),
    ("random-label-mnist", (3, 8, 784), (3, 8), (3, 16, 784), (3, 16), torch.long),
])
def test_batches_and_probes_lead_with_the_member_dimension(name, x_shape, y_shape, probe_x, probe_y, y_dtype):
    stream = MAKERS[name](SEEDS)
    assert stream.seeds == SEEDS and stream.members == 3
    x, y, task = next(stream.batches(0))
    assert (x.shape, y.shape, task) == (x_shape, y_shape, 0)
    assert x.dtype == torch.float32 and y.dtype == y_dtype
    px, py = stream.probe_batch(1)
    assert px.shape == probe_x and py.shape == probe_y
    assert not torch.equal(px[0], px[1]) and not torch.equal(px[1], px[2])  # members differ by seed


@streams
def test_an_int_seed_is_one_member_and_no_seeds_is_a_config_error(name):
    stream = MAKERS[name](5)
    assert stream.seeds == (5,) and stream.members == 1
    assert MAKERS[name](range(4)).seeds == (0, 1, 2, 3)
    with pytest.raises(ConfigError, match="at least one seed"):
        MAKERS[name](())


@pytest.mark.parametrize("name, steps, batches, probe_task, probe", [
    ("bit-flipping-one", 60, (1607739, 24091), 1, (125276, 326)),
    ("bit-flipping-all", 60, (1308687, 73398), 1, None),
    ("permuted-mnist", 35, (7057757554, 47020), 2, (391655285, 128)),
    ("random-label-mnist", 30, (12132547715, 143075), 1, (793069417, 752)),
])
def test_seed_zero_yields_the_same_data_as_before_populations(name, steps, batches, probe_task, probe):
    """Checksums recorded from the single-seed streams before batches gained the member dimension."""
    stream = MAKERS[name](0)
    scale = 1 if name.startswith("bit-flipping") else 255  # pixels are checked as their 0-255 values
    assert _checksums(_take(stream, 0, steps), scale) == batches
    if probe is not None:
        px, py = stream.probe_batch(probe_task)
        assert (checksum(px, scale), checksum(py)) == probe


def test_default_bit_flipping_seed_zero_yields_the_same_data_across_a_change():
    items = _take(BitFlippingStream(0), 9990, 20)
    assert [task for *_, task in items] == [0] * 10 + [1] * 10
    assert _checksums(items, 1) == (56879, 280)


@pytest.mark.skipif(not REAL_MNIST.exists(), reason="the real MNIST files are not beside the project")
def test_real_mnist_seed_zero_yields_the_same_data_as_before_populations():
    images, labels = load_mnist(REAL_MNIST, download=False)
    permuted = PermutedMNISTStream(images, labels, 0, probe_size=50)
    items = _take(permuted, 59_998, 4)
    assert [task for *_, task in items] == [0, 0, 1, 1]
    assert _checksums(items, 255) == (50291480, 36)
    px, py = permuted.probe_batch(1)
    assert (checksum(px, 255), checksum(py)) == (643823043, 6655)
    items = _take(RandomLabelMNISTStream(images, labels, 0), 749, 3)
    assert [task for *_, task in items] == [0, 1, 1]
    assert _checksums(items, 255) == (603815592, 4783)


def test_chunks_bound_the_memory_of_one_computation():
    assert steps_per_chunk(CHUNK_BYTES // 10, 1000) == 10
    assert steps_per_chunk(2 * CHUNK_BYTES, 1000) == 1
    assert steps_per_chunk(1, 25) == 25


def test_many_bit_flipping_members_never_materialise_a_whole_task():
    stream = BitFlippingStream(range(200))  # a task of float inputs would be 200 x 10,000 x 20 x 4 B = 160 MB
    x, y, _ = next(stream.batches(0))
    assert x.shape == (200, 1, 20)
    assert x.untyped_storage().nbytes() <= CHUNK_BYTES  # the step is a view into a chunk of a few steps
    assert 1 < stream.steps_per_chunk < stream.steps_per_task


def test_mnist_members_share_one_copy_of_the_images():
    images, labels = _fake_mnist(3000)
    permuted = PermutedMNISTStream(images, labels, range(30), examples_per_task=3000)
    random_label = RandomLabelMNISTStream(images, labels, range(30), subset=1200)
    assert permuted.images.shape == random_label.images.shape == (3000, 784)
    assert random_label.chosen.shape == (30, 1200)
    x, _, _ = next(permuted.batches(0))  # a task of all members would be 30 x 3000 x 784 x 4 B = 282 MB
    assert x.shape == (30, 1, 784) and x.untyped_storage().nbytes() <= CHUNK_BYTES


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@streams
def test_streams_on_the_gpu_yield_the_cpu_data(name):
    make = MAKERS[name]
    for (x, y, task), (xg, yg, taskg) in zip(_take(make(SEEDS), 7, 40), _take(make(SEEDS, device="cuda"), 7, 40)):
        assert xg.is_cuda and yg.is_cuda and task == taskg
        assert torch.equal(x, xg.cpu()) and torch.equal(y, yg.cpu())
    assert torch.equal(make(SEEDS).probe_batch(1)[0], make(SEEDS, device="cuda").probe_batch(1)[0].cpu())
