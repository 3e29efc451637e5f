"""Preparing a store (`store.py` has the format) from what users have: a built-in dataset, an image folder, a
table of encoded images (`tables.py`), or decoded arrays (`prepare_store` chooses); and staging a copy of one.
Every source goes through the one resumable, multi-rank writer, `writer.write_store`; how a preparation runs
(workers, ranks, skipping, messages) travels as one `writer.PrepareOptions`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dcgan_dist.data import tables
from dcgan_dist.data.builtin import read_builtin
from dcgan_dist.data.decode import (
    FOLDER_RESIZE,
    IMAGE_EXTENSIONS,
    decode_jobs,
    decoding_pool,
    folder_classes,
    list_images,
)
from dcgan_dist.data.store import LABELS, MANIFEST, Store, open_store, read_manifest, verify_store
from dcgan_dist.data.writer import PrepareOptions, check_out, write_store
from dcgan_dist.errors import UserError
from dcgan_dist.fileio import exclusive, fsync_dir, listing, swap_in
from dcgan_dist.registry import BUILT_IN, DATASETS


def prepare_store(source: str, out: str | Path, size: int, channels: int | None = None,
                  options: PrepareOptions | None = None, root: str = "data", download: bool = False,
                  image_column: str | None = None, label_column: str | None = None,
                  fit: str = "resize") -> Store | None:
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
        return prepare_builtin(source, out, size, channels or fixed or 3, options, root, download, fit)
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


ARRAY_RESIZE = ("as data.load_dataset: the whole image to S x S (torch bilinear, antialias) where its size "
                "differs; uint8")


class _Sources(NamedTuple):
    """What a folder or a table hands the one decoding body, `_decode_sources`."""
    plan: dict  # what they are (source, listing, ...): a killed run resumes only under the same plan
    count: int
    items_of: Callable[[int, int], list]  # (start, stop) -> the sources' paths, or (name, encoded bytes or None)
    labels: list[int] | None
    name_of: Callable[[int], str]  # source i in the manifest's skipped list
    info: dict  # the manifest's class_names, num_classes and resize
    skipped: Callable[[list[str]], str]  # the warning's words for the skipped sources (their names)


def prepare_builtin(name: str, out: Path, size: int, channels: int, options: PrepareOptions, root: str = "data",
                    download: bool = False, fit: str = "resize") -> Store | None:
    """A built-in set (`builtin.read_builtin`: read under `root`, brought to `size` as `fit` says, transparent
    pixels onto `options.background`) written as the store `out`."""
    check_out(out, options.overwrite, None)  # before loading: refuse early
    info = DATASETS[name]
    images, labels = read_builtin(name, root, size, channels, download, fit=fit, background=options.background)
    plan = {"root": root} | ({"fit": fit} if fit != "resize" else {}) | (
        {"background": options.background} if info.transparent else {})
    return prepare_arrays(images.numpy(), None if labels is None else labels.numpy(), info.num_classes, out, name,
                          plan, options)


def prepare_folder(folder: Path, out: Path, size: int, channels: int, source: str,
                   options: PrepareOptions | None = None) -> Store | None:
    """Decode every image under `folder` (sorted, recursive) into the store `out`. First-level sub-folders
    holding every image are the classes. `source` is recorded in the manifest as given. With `world` > 1 this
    is rank `rank`'s part (see `writer.write_store`): rank 0 returns the store, the others None. Nothing is
    written into `folder`."""
    options = options or PrepareOptions()
    if not folder.is_dir():
        raise UserError(f"source {source!r} is not a folder nor a built-in dataset")
    check_out(out, options.overwrite, folder)

    def sources() -> _Sources:
        files = list_images(folder)
        if not files:
            raise UserError(f"source {source!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        labels, class_names = folder_classes(folder, files)
        return _Sources(
            {"source": source, "files": listing(files, folder)}, len(files),
            lambda a, b: [str(p) for p in files[a:b]], labels, lambda i: str(files[i].relative_to(folder)),
            {"class_names": class_names, "num_classes": len(class_names or []), "resize": FOLDER_RESIZE},
            lambda skipped: f"{len(skipped)} of {len(files)} image(s) that cannot be decoded ({options.skip_option}): "
            + ", ".join(str(folder / name) for name in skipped[:5]) + (", ..." if len(skipped) > 5 else ""))

    return _decode_sources(out, size, channels, options, sources)


def prepare_table(source: Path, out: Path, size: int, channels: int, image_column: str | None = None,
                  label_column: str | None = None, options: PrepareOptions | None = None) -> Store | None:
    """Decode the encoded images of a Parquet / Hugging Face datasets table or an LMDB database (`tables.py`)
    into the store `out`, with its labels and class names where it has them; otherwise as `prepare_folder`."""
    options = options or PrepareOptions()
    from dcgan_dist.data.tables import is_lmdb, open_lmdb, open_table

    check_out(out, options.overwrite, source if source.is_dir() else None)
    if is_lmdb(source) and (image_column or label_column):
        raise UserError(f"{source} is an LMDB database (encoded images, no labels): it has no columns to choose; "
                        "drop --image-column and --label-column")
    table = open_lmdb(source) if is_lmdb(source) else open_table(source, image_column, label_column)
    if not len(table):
        raise UserError(f"source {source} holds no rows")
    labels = table.labels()
    num_classes = len(table.class_names) if table.class_names else (max(labels) + 1 if labels else 0)
    if labels and max(labels) >= num_classes:
        raise UserError(f"label column {table.label_column!r} holds class {max(labels)}, but its feature names "
                        f"{num_classes} classes; fix the table or pass --label-column none")
    plan = {"source": str(source), "files": table.listing(), "image_column": table.image_column,
            "label_column": table.label_column}
    info = {"class_names": table.class_names, "num_classes": num_classes, "resize": FOLDER_RESIZE}
    return _decode_sources(out, size, channels, options, lambda: _Sources(
        plan, len(table), table.encoded, labels, lambda i: f"row {i}", info,
        lambda skipped: f"{len(skipped)} of {len(table)} row(s) whose image cannot be decoded ({options.skip_option})"))


def _decode_sources(out: Path, size: int, channels: int, options: PrepareOptions,
                    sources: Callable[[], _Sources]) -> Store | None:
    """The body of `prepare_folder` and `prepare_table`: the decoding pool is started first, so its workers
    start up while `sources()` lists the sources; then `_write` with the pool decoding (`decode.decode_jobs`),
    and a warning naming what was skipped."""
    workers = options.workers or os.cpu_count() or 1
    with decoding_pool(workers) as pool:
        s = sources()
        plan = {**s.plan, "size": size, "channels": channels, "shard_size": options.shard_size,
                "skip_bad_files": options.skip_bad_files, "background": options.background}
        decoded = functools.partial(decode_jobs, s.items_of, size, channels, options.background, pool, workers,
                                    options.skip_bad_files, options.skip_option)
        store = write_store(out, plan, s.count, decoded, s.labels, s.name_of, s.info, options)
    if store is not None and store.manifest["skipped"]:
        options.log(f"warning: skipped {s.skipped(store.manifest['skipped'])}")
    return store


def prepare_arrays(images: np.ndarray, labels: np.ndarray | None, num_classes: int, out: Path, source: str,
                   plan: dict, options: PrepareOptions | None = None) -> Store | None:
    """Write decoded uint8 images [N, C, S, S] (and int64 labels [N]) as the store `out`. `plan` names what
    they are (source, root, ...): a killed run resumes only under the same plan. Of `options`, `workers`
    and skipping do not apply (nothing is decoded)."""
    options = options or PrepareOptions()
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[2] == images.shape[3], images.shape
    check_out(out, options.overwrite, None)
    n, c, s, _ = images.shape
    plan = {**plan, "source": source, "size": s, "channels": c, "shard_size": options.shard_size, "count": n,
            "images": hashlib.sha256(np.ascontiguousarray(images)).hexdigest()}
    info = {"class_names": None, "num_classes": num_classes if labels is not None else 0, "resize": ARRAY_RESIZE}

    def decoded(jobs: list[tuple[range, Path]]) -> Iterator[tuple[int, bool]]:
        for r, unit in jobs:
            with open(unit, "wb") as f:
                for i in r:
                    f.write(np.ascontiguousarray(images[i]).tobytes())
            yield from ((i, True) for i in r)

    return write_store(out, plan, n, decoded, None if labels is None else labels.tolist(), None, info, options)


def stage_store(src: str | Path, dest: str | Path, wait_minutes: float = 60.0, log=print) -> Store:
    """Copy the store `src` to `dest` (node-local disk, say) and verify the copy against the manifest's sha256;
    a `dest` that already holds the same store, intact, is kept. One process per `dest` copies (a file lock);
    the copy goes to a hidden sibling and is renamed into place, so `dest` is always whole."""
    source, dest = open_store(src), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(dest.parent / f".{dest.name}.lock", f"staging {dest}", wait_minutes, log):
        if (dest / MANIFEST).is_file():
            try:
                if read_manifest(dest) == source.manifest:
                    verify_store(dest)
                    log(f"staged store {dest} is already a verified copy of {src}")
                    return open_store(dest)
                log(f"note: {dest} holds another store; replacing it with {src}")
            except UserError as e:
                log(f"warning: copying {src} again: {e}")
        tmp = dest.parent / f".{dest.name}.tmp-stage"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        began = time.monotonic()
        names = [s["file"] for s in source.manifest["shards"]] + ([LABELS] if source.labels is not None else [])
        for name in [*names, MANIFEST]:  # the manifest last
            shutil.copyfile(source.path / name, tmp / name)
        verify_store(tmp)
        fsync_dir(tmp)
        swap_in(tmp, dest, dest.parent / f".{dest.name}.tmp-old")
        size = sum((dest / name).stat().st_size for name in names) / 2**30
        log(f"staged {src} -> {dest}: {size:.2f} GB copied and verified (sha256) in {time.monotonic() - began:.0f} s")
    return open_store(dest)
