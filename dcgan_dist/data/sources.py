"""What a run reads, by the kind of its dataset (`registry.DATASETS`): the data facts a run starts from (`facts`),
the whole set as one uint8 tensor [N, C, S, S] with its labels (`load_dataset`, for evaluation and preparation),
and the batch source training draws from (`batch_source`), which reads a prepared store (`store.py`) image by
image through the page cache: data.name=store names one, and the built-in sets and image folders are prepared
into one in the user's cache on first use (`cached_store`).

Images stay uint8 on the host (4x smaller than float) and are normalised to [-1, 1] on the device, per batch
(`batches.to_model_range`). The built-in sets' readers and the resizing: `builtin`. How batches are drawn:
`batches`. How a store is written: `prepare`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dcgan_dist import fileio
from dcgan_dist.data import store
from dcgan_dist.data.batches import InMemoryBatches, StoreBatches
from dcgan_dist.data.builtin import check_root, check_split, fit_size, read_builtin, subset
from dcgan_dist.data.decode import BACKGROUND, IMAGE_EXTENSIONS, list_images
from dcgan_dist.data.prepare import PrepareOptions, prepare_builtin, prepare_folder
from dcgan_dist.errors import UserError
from dcgan_dist.registry import DATASETS


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
    says (`builtin.fit_size`).

    A built-in set is read into memory (`builtin.read_builtin`). A store (`root`) is read whole here, for
    evaluation's reference images; training reads it through `batch_source`, never whole. An image folder is
    decoded once into a store in the cache (its labels: data.name=store).
    """
    info = DATASETS.get(name)
    if info is None:
        raise UserError(f"data.name = {name!r} is not a dataset; use one of {', '.join(DATASETS)}")
    if info.built_in:
        return read_builtin(name, root, image_size, channels, download, num_images, split, fit, background)
    check_split(name, split)
    if info.is_store:
        opened = store.open_store(root, image_size, channels)
        everything = torch.arange(opened.count)
        images, labels = opened.gather(everything), opened.gather_labels(everything)
    else:
        opened = cached_store(name, root, image_size, channels, cache_dir, skip_bad_files=skip_bad_files,
                              wait_minutes=wait_minutes, log=warn, background=background)
        images, labels = opened.gather(torch.arange(opened.count)), None
    if num_images is not None:
        keep = subset(len(images), num_images, name)
        images, labels = images[keep], None if labels is None else labels[keep]
    return fit_size(images, image_size, fit, name), labels


def load_images(name: str, root: str, image_size: int, channels: int, **kwargs) -> torch.Tensor:
    """The images of `load_dataset`, without the labels."""
    return load_dataset(name, root, image_size, channels, **kwargs)[0]


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
    stores, info = Path(cache_dir or fileio.user_cache_dir()) / "stores", DATASETS[name]
    if info.is_folder:
        folder = Path(root)
        if not folder.is_dir():
            raise UserError(f"data.root = {root!r} is not a directory; point it at a folder of images")
        files = list_images(folder)
        if not files:
            raise UserError(f"data.root = {root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        key = f"{folder.resolve()}:{fileio.listing(files, folder)}:{skip_bad_files}:background={background}"
    else:
        key = f"{name}:{Path(root).resolve()}" if info.reads_root else name  # mnist5k, emoji: in their wheels
        key += f":{fit}" if fit != "resize" else ""  # only pad is named: resize is the default
        key += f":background={background}" if info.transparent else ""
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
        if info.is_folder:
            prepare_folder(Path(root), path, size, channels, root, options)
        else:
            prepare_builtin(name, path, size, channels, options, root, download, fit)
    return store.open_store(path, size, channels)
