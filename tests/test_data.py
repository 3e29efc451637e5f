import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from dcgan_dist.data.batches import ShardedBatches
from dcgan_dist.data.sources import load_images, synthetic_shapes, to_model_range
from dcgan_dist.errors import UserError


def test_mnist5k_ships_offline():
    images = load_images("mnist5k", "unused", 28, 1)
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.uint8
    assert images.max() == 255 and images.float().mean() > 20  # real digits, not blanks
    assert load_images("mnist5k", "unused", 32, 1).shape == (5000, 1, 32, 32)


def test_subset_is_a_fixed_random_sample_across_classes():
    a = load_images("mnist5k", "unused", 28, 1, num_images=100)
    b = load_images("mnist5k", "unused", 28, 1, num_images=100)
    assert torch.equal(a, b) and len(a) == 100
    full = load_images("mnist5k", "unused", 28, 1)
    assert not torch.equal(a, full[:100])  # rows are sorted by class: the first 100 would be all zeros
    with pytest.raises(UserError, match="data.num_images = 6000"):
        load_images("mnist5k", "unused", 28, 1, num_images=6000)


def _write_idx(root, digits):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    n = len(digits)
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, 28, 28) + digits.numpy().tobytes())
    with gzip.open(raw / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, n) + bytes(n))
    # torchvision checks the test split exists too
    with gzip.open(raw / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, 1, 28, 28) + bytes(784))
    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, 1) + bytes(1))
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(gzip.open(raw / f"{name}.gz").read())


def test_torchvision_mnist_from_idx_files_offline(tmp_path):
    digits = load_images("mnist5k", "unused", 28, 1)[:300, 0]
    _write_idx(tmp_path, digits)
    images = load_images("mnist", str(tmp_path), 28, 1)
    assert torch.equal(images[:, 0], digits)
    assert load_images("mnist", str(tmp_path), 64, 1).shape == (300, 1, 64, 64)


def test_absent_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="set data.download=true"):
        load_images("fashion_mnist", str(tmp_path), 32, 1)


def test_imagefolder_decodes_crops_and_caches(tmp_path):
    root = tmp_path / "faces"
    (root / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / "a" / f"{i}.png")
    images = load_images("imagefolder", str(root), 32, 3, cache_dir=str(tmp_path / "cache"))
    assert images.shape == (5, 3, 32, 32)
    (cached,) = (tmp_path / "cache" / "stores").glob("imagefolder-*")  # prepared once into a store in the cache
    assert (cached / "manifest.json").is_file() and not list(root.rglob("*.u8"))
    assert torch.equal(load_images("imagefolder", str(root), 32, 3, cache_dir=str(tmp_path / "cache")), images)
    (root / "a" / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"cannot decode image .*bad\.jpg"):
        load_images("imagefolder", str(root), 32, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        load_images("imagefolder", str(tmp_path / "empty"), 32, 3)


def test_synthetic_is_deterministic():
    assert torch.equal(synthetic_shapes(8, 32, 3), synthetic_shapes(8, 32, 3))
    assert synthetic_shapes(8, 32, 3).float().std() > 10


def test_model_range():
    x = to_model_range(torch.tensor([0, 255], dtype=torch.uint8))
    assert x.tolist() == [-1.0, 1.0]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_disjoint_and_cover_the_epoch(world):
    n, b = 103, 4
    streams = [ShardedBatches(n, b, r, world, seed=5) for r in range(world)]
    per_epoch = n // (b * world)
    for epoch in range(3):
        seen = [torch.cat([next(s) for _ in range(per_epoch)]) for s in streams]
        everything = torch.cat(seen)
        assert len(set(everything.tolist())) == len(everything) == per_epoch * b * world
        perm = streams[0].permutation(epoch)
        assert set(everything.tolist()) == set(perm[:per_epoch * b * world].tolist())  # less the remainder
        assert all(s.epoch == epoch for s in streams)


def test_two_ranks_see_what_one_process_with_double_batch_sees():
    one = ShardedBatches(64, 8, 0, 1, seed=1)
    two = [ShardedBatches(64, 4, r, 2, seed=1) for r in range(2)]
    for _ in range(20):
        assert torch.equal(next(one), torch.cat([next(s) for s in two]))


def test_stream_state_round_trips():
    a = ShardedBatches(50, 4, seed=3)
    for _ in range(17):
        next(a)
    b = ShardedBatches(50, 4, seed=3)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(next(a), next(b)) for _ in range(30))
