"""The prepared image store: a dataset decoded, resized and cropped once into raw uint8 shards that training
reads image by image through the page cache, so no rank decodes images or holds the whole dataset in memory.

    STORE/manifest.json       format_version, count, channels, image_size, shard_size, shards [{file, count,
                              sha256}], labels {file, sha256} or null, num_classes, class_names, source, resize,
                              skipped; written last, so a directory without it is not (yet) a store
    STORE/shard-00000.u8 ...  raw uint8 [count, C, S, S], C-contiguous, no header (np.memmap reads it as is);
                              every shard holds shard_size images but the last
    STORE/labels.i64          raw int64 [count], when the source has labels

Writing goes to the hidden sibling `.STORE.tmp-prepare/`, renamed to STORE once the manifest is in it, so
STORE is either absent or complete. The sources (the sorted file list, or a table's rows) are decoded in units
of shard_size sources, each its own file that the decoding workers write into by slot, with a sidecar (count,
sha256, skipped sources) once finished; several ranks
(`dcgan-prepare` under `accelerate launch` or `srun`) share the units round-robin. A killed preparation, run
again with the same arguments (with any number of ranks), keeps the units it finished (each checked against
its sidecar's sha256) and decodes only the rest. Rank 0 then packs the units into shards (a rename when no file
was skipped), so the result is byte-identical to an uninterrupted single-process run.

No torch at import: the decoding workers import this module (the reader imports torch when it gathers).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import io
import json
import multiprocessing
import os
import resource
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dcgan_dist.errors import UserError
from dcgan_dist.fileio import exclusive, fsync_dir, sha256_file, write_atomic

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LABELS = "labels.i64"
SHARD_SIZE = 4096  # images per shard (the last one may hold fewer)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
FOLDER_RESIZE = ("shorter side to S (PIL bilinear), centre crop S x S; JPEGs of at least 2S first decoded at a "
                 "reduced scale no smaller than S (PIL draft); uint8")
ARRAY_RESIZE = ("as data.load_dataset: the whole image to S x S (torch bilinear, antialias) where its size "
                "differs; uint8")
READ_THREADS = 8  # reads in flight for the images of a batch that are not in the page cache
_CHUNK = 64  # images per decoding task: small enough to keep workers busy, large enough to amortise the pipe


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.u8"


def temp_dir(out: str | Path) -> Path:
    """Where a preparation of `out` writes until it is complete (a hidden sibling)."""
    out = Path(out)
    return out.parent / f".{out.name}.tmp-prepare"


# --- decoding ------------------------------------------------------------------------------------------


def list_images(root: Path, exclude: Path | None = None) -> list[Path]:
    """Every image file under `root`, recursively, sorted (the order of a store); none under `exclude`."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and (exclude is None or exclude not in p.parents))


def decode_image(path: Path, size: int, channels: int, draft: bool = False, encoded: bytes | None = None,
                 fix: str = "remove or replace the file") -> np.ndarray:
    """One image file (or `encoded` bytes, `path` then naming them in messages) -> uint8 [C, S, S]: the
    shorter side resized to `size` (bilinear), then centre-cropped.

    `draft`: a JPEG at least twice `size` is decoded at a reduced scale (1/2, 1/4 or 1/8, never below `size`),
    several times faster for large photos; its pixels then differ slightly from a full decode.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path if encoded is None else io.BytesIO(encoded)) as im:
            mode = "L" if channels == 1 else "RGB"
            if draft and im.format == "JPEG" and min(im.size[0] // size, im.size[1] // size) >= 2:
                im.draft(mode, (size, size))
            im = im.convert(mode)
            w, h = im.size
            scale = size / min(w, h)  # resize the shorter side to `size`, then centre-crop
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
            left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
            arr = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"image {path} vanished while it was being read; is something else changing "
                        "the folder? Run again once it is stable") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UserError(f"cannot decode image {path}: {e}; {fix}") from None
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return arr.transpose(2, 0, 1).copy()  # [C, S, S], C-contiguous and writable (PIL's array is read-only)


def _decode_into(task: tuple[str, int, list], size: int, channels: int) -> list[str | None]:
    """A worker's task (unit file, first slot, images: paths, or (name, encoded bytes or None)): each image
    decoded and written into its slot of the unit file, so no pixels cross a pipe; per image None, or the
    one-line reason it cannot be decoded (its slot stays empty; the parent decides)."""
    unit, slot, items = task
    errors: list[str | None] = []
    fd = os.open(unit, os.O_WRONLY)
    try:
        for k, item in enumerate(items):
            try:
                if isinstance(item, str):
                    image = decode_image(Path(item), size, channels, draft=True)
                elif item[1] is None:
                    raise UserError(f"{item[0]} has no image bytes")
                else:
                    image = decode_image(item[0], size, channels, draft=True, encoded=item[1],
                                         fix="fix or drop that row")
            except UserError as e:
                errors.append(str(e))
                continue
            os.pwrite(fd, image.tobytes(), (slot + k) * image.nbytes)
            errors.append(None)
    finally:
        os.close(fd)
    return errors


def folder_listing(folder: Path, files: list[Path]) -> str:
    """sha256 over the files' names, sizes and modification times: what says an edited folder is not the same."""
    listing = hashlib.sha256()
    for p in files:
        try:
            st = p.stat()
        except FileNotFoundError:
            raise UserError(f"image {p} vanished while {folder} was being read; is something else changing the "
                            "folder? Run again once it is stable") from None
        listing.update(f"{p.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return listing.hexdigest()


def folder_classes(root: Path, files: list[Path]) -> tuple[list[int] | None, list[str] | None]:
    """(label per file, class names) when every image sits in a first-level sub-folder of `root` (the sorted
    sub-folder names are the classes); (None, None) otherwise."""
    parts = [p.relative_to(root).parts for p in files]
    if not parts or any(len(q) != 2 for q in parts):
        return None, None
    names = sorted({q[0] for q in parts})
    index = {name: i for i, name in enumerate(names)}
    return [index[q[0]] for q in parts], names


# --- reading ------------------------------------------------------------------------------------------


class Store:
    """A store opened for reading. `gather` reads only the images asked for, each with one positional read
    (pread) through the page cache: nothing is mapped into the process, so a rank's private memory does not
    grow with the images it has read, and the ranks of a node share the page cache's one copy; a store larger
    than memory is read from disk as needed. Images in the page cache are copied at once (a non-blocking
    read); the others are read by `READ_THREADS` threads together, which a disk serves several times faster
    than one read at a time (benchmarks/data_store.py)."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = path, manifest
        self.count, self.channels = manifest["count"], manifest["channels"]
        self.image_size, self.shard_size = manifest["image_size"], manifest["shard_size"]
        self.class_names, self.source = manifest["class_names"], manifest["source"]
        self.item_bytes = self.channels * self.image_size**2
        self._files = [path / s["file"] for s in manifest["shards"]]
        _allow_open_files(len(self._files) + 64)
        self._fds = [os.open(f, os.O_RDONLY) for f in self._files]
        self._nowait, self._pool = hasattr(os, "RWF_NOWAIT"), None
        labels = manifest["labels"]  # int64 [N]: 8 bytes an image, read whole
        self.labels = None if labels is None else np.fromfile(path / labels["file"], dtype=np.int64)
        self.num_classes = manifest["num_classes"] if labels is not None else 0

    def __len__(self) -> int:
        return self.count

    def __del__(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=True)
        for fd in getattr(self, "_fds", []):
            os.close(fd)

    def gather(self, indices) -> torch.Tensor:
        """Images of global `indices` (any int sequence, numpy array or CPU tensor) -> uint8 tensor [B, C, S, S]."""
        import torch  # here, not at the top: the decoding workers import this module

        shard, offset = np.divmod(np.asarray(indices, dtype=np.int64), self.shard_size)
        out = torch.empty((len(shard), self.channels, self.image_size, self.image_size), dtype=torch.uint8)
        rows, item, fds, pread = memoryview(out.numpy()).cast("B"), self.item_bytes, self._fds, os.preadv
        todo = list(enumerate(zip(shard.tolist(), offset.tolist())))
        if self._nowait:  # what the page cache holds is copied here; only the misses wait for the disk
            misses = []
            for j, (k, o) in todo:
                try:
                    if pread(fds[k], [rows[j * item:(j + 1) * item]], o * item, os.RWF_NOWAIT) == item:
                        continue
                except BlockingIOError:
                    pass
                except OSError:  # this filesystem or kernel has no non-blocking buffered reads
                    self._nowait = False
                misses.append((j, (k, o)))
            todo = misses
        if todo:  # several reads in flight at once: a disk serves a queue much faster than one read at a time
            done = self._readers().map(lambda task: pread(fds[task[1][0]], [rows[task[0] * item:(task[0] + 1) * item]],
                                                           task[1][1] * item), todo)
            for (_, (k, _)), n in zip(todo, done):
                if n != item:
                    raise UserError(f"store {self.path}: {self._files[k].name} is shorter than manifest.json says "
                                    "(was it changed while training?); prepare the store again (dcgan-prepare ... "
                                    "--overwrite)")
        return out

    def _readers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="store-read")
        return self._pool

    def gather_labels(self, indices) -> torch.Tensor | None:
        """int64 labels [B] of global `indices`, or None for an unlabelled store."""
        import torch

        if self.labels is None:
            return None
        return torch.from_numpy(self.labels[np.asarray(indices, dtype=np.int64)])


def _allow_open_files(n: int) -> None:
    """Raise this process's soft limit on open files to `n` where the hard limit allows (a store keeps one
    descriptor per shard open)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n if hard == resource.RLIM_INFINITY else min(n, hard), hard))


def open_store(path: str | Path, image_size: int | None = None, channels: int | None = None) -> Store:
    """Open a complete store, refusing (UserError) one that is incomplete, damaged, newer than this code, or
    whose image size / channels differ from what the caller asks (None: any)."""
    path = Path(path)
    manifest = read_manifest(path)
    if image_size is not None and manifest["image_size"] != image_size:
        s = manifest["image_size"]
        raise UserError(f"store {path} holds {s}x{s} images but model.image_size = {image_size}; set "
                        f"model.image_size={s}, or prepare a store with --size {image_size}")
    if channels is not None and manifest["channels"] != channels:
        c = manifest["channels"]
        raise UserError(f"store {path} holds {c}-channel images but the config asks for {channels} (model.channels); "
                        f"set model.channels={c} (or 0), or prepare a store with --channels {channels}")
    item = manifest["channels"] * manifest["image_size"] ** 2
    files = [(s["file"], s["count"] * item) for s in manifest["shards"]]
    if manifest["labels"] is not None:
        files.append((manifest["labels"]["file"], manifest["count"] * 8))
    for name, expected in files:
        f = path / name
        if not f.is_file():
            raise UserError(f"store {path}: {name} is missing; prepare the store again (dcgan-prepare ... --overwrite)")
        if f.stat().st_size != expected:
            raise UserError(f"store {path}: {name} holds {f.stat().st_size} bytes, manifest.json says {expected}; "
                            "the store is damaged: prepare it again (dcgan-prepare ... --overwrite)")
    return Store(path, manifest)


def read_manifest(path: Path) -> dict:
    """manifest.json of a store, checked for its version and shape (not the shards: `open_store`)."""
    if not (path / MANIFEST).is_file():
        if temp_dir(path).is_dir() or path.name.endswith(".tmp-prepare"):
            raise UserError(f"store {path} is not complete (a preparation is running or was killed); run the same "
                            "dcgan-prepare command again to finish it")
        if not path.is_dir():
            raise UserError(f"store {path} does not exist; prepare one: dcgan-prepare SOURCE --size S --out {path}")
        raise UserError(f"{path} has no {MANIFEST}: not a prepared store (or one still being written); prepare it: "
                        f"dcgan-prepare SOURCE --size S --out {path}")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        version = manifest["format_version"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path / MANIFEST} is damaged ({e}); prepare the store again") from None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"store {path} has format_version {version!r}; this dcgan_dist reads up to "
                        f"{FORMAT_VERSION}: upgrade dcgan_dist, or prepare the store again with this one")
    if not _well_formed(manifest):
        raise UserError(f"{path / MANIFEST} is damaged (keys, shard names or counts do not fit together); prepare "
                        "the store again (dcgan-prepare ... --overwrite)")
    return manifest


def _well_formed(m: dict) -> bool:
    """The manifest's fields fit together: what `Store.gather` relies on (every shard but the last holds
    shard_size images) and plain file names only (nothing outside the store is ever opened)."""
    try:
        shards, size = m["shards"], m["shard_size"]
        counts = [s["count"] for s in shards]
        return (all(isinstance(m[k], int) and m[k] >= 0 for k in ("count", "channels", "image_size", "num_classes"))
                and isinstance(size, int) and all(isinstance(c, int) for c in counts)
                and [s["file"] for s in shards] == [shard_name(k) for k in range(len(shards))]
                and all(isinstance(s["sha256"], str) for s in [*shards, m["labels"] or {"sha256": ""}])
                and bool(counts) and all(c == size for c in counts[:-1]) and 1 <= counts[-1] <= size
                and sum(counts) == m["count"] and (m["labels"] is None or m["labels"]["file"] == LABELS)
                and "class_names" in m and "source" in m)
    except (KeyError, TypeError, AttributeError):
        return False


def verify_store(path: str | Path) -> Store:
    """Open a store and check every file against its sha256 in the manifest; a damaged one is named."""
    store = open_store(path)
    m = store.manifest
    files = [(s["file"], s["sha256"]) for s in m["shards"]]
    if m["labels"] is not None:
        files.append((m["labels"]["file"], m["labels"]["sha256"]))
    for name, digest in files:
        if sha256_file(store.path / name) != digest:
            raise UserError(f"store {store.path}: {name} is damaged (its sha256 differs from manifest.json); "
                            "prepare the store again (dcgan-prepare ... --overwrite)")
    return store


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
        _swap_in(tmp, dest)
        size = sum((dest / name).stat().st_size for name in names) / 2**30
        log(f"staged {src} -> {dest}: {size:.2f} GB copied and verified (sha256) in {time.monotonic() - began:.0f} s")
    return open_store(dest)


# --- writing ------------------------------------------------------------------------------------------


def prepare_folder(folder: Path, out: Path, size: int, channels: int, source: str, workers: int | None = None,
                   skip_bad_files: bool = False, overwrite: bool = False, shard_size: int = SHARD_SIZE,
                   progress: bool = True, log=print, skip_option: str = "--skip-bad-files", rank: int = 0,
                   world: int = 1) -> Store | None:
    """Decode every image under `folder` (sorted, recursive) into the store `out`; `workers` processes decode
    (None: one per CPU). First-level sub-folders holding every image are the classes. `source` is recorded in
    the manifest as given; `skip_option` is what the messages name to skip bad files. With `world` > 1 this
    is rank `rank`'s part (see `_write`): rank 0 returns the store, the others None. Nothing is written into
    `folder`."""
    if not folder.is_dir():
        raise UserError(f"source {source!r} is not a folder nor a built-in dataset")
    check_out(out, overwrite, folder)
    workers = workers or os.cpu_count() or 1
    with _decoding_pool(workers) as pool:  # started first: the workers start up while the folder is listed
        files = list_images(folder)
        if not files:
            raise UserError(f"source {source!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        labels, class_names = folder_classes(folder, files)
        plan = {"source": source, "size": size, "channels": channels, "shard_size": shard_size,
                "skip_bad_files": skip_bad_files, "files": folder_listing(folder, files)}
        info = {"class_names": class_names, "num_classes": len(class_names or []), "resize": FOLDER_RESIZE}
        decoded = functools.partial(_decoded, lambda a, b: [str(p) for p in files[a:b]], size, channels, pool,
                                    workers, skip_bad_files, skip_option)
        store = _write(out, plan, len(files), decoded, labels, lambda i: str(files[i].relative_to(folder)), info,
                       shard_size, progress, log, rank, world)
    if store is not None and store.manifest["skipped"]:
        skipped = store.manifest["skipped"]
        log(f"warning: skipped {len(skipped)} of {len(files)} image(s) that cannot be decoded ({skip_option}): "
            + ", ".join(str(folder / name) for name in skipped[:5]) + (", ..." if len(skipped) > 5 else ""))
    return store


@contextlib.contextmanager
def _decoding_pool(workers: int) -> Iterator:
    """`workers` decoding processes, or None for one (decode in this process); stopped on the way out.
    spawn, not fork: the parent may hold torch's threads; the workers import only this module, numpy and PIL."""
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        yield pool
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _decoded(items_of: Callable[[int, int], list], size: int, channels: int, pool, workers: int,
             skip_bad_files: bool, skip_option: str, jobs: list[tuple[range, Path]]) -> Iterator[tuple[int, bool]]:
    """Decode the sources of each job (sources, unit file) into the unit file's slots (`_decode_into`) by
    `pool`'s workers in chunks (or here, without a pool); yield (index, written: False for a skipped source) in
    order, once the image is in its file. `items_of(start, stop)`: the sources' paths or (name, bytes). Up to
    16 chunks a worker are queued ahead, across units: the workers go on decoding while the writer finishes
    (hashes, fsyncs) a unit, and a table's encoded bytes are read only that far ahead."""
    total = sum(len(r) for r, _ in jobs)
    n = max(1, min(_CHUNK, total // (4 * workers))) if pool else 1  # a small job keeps every worker busy
    tasks = ((str(unit), i - r.start, items_of(i, min(i + n, r.stop)))
             for r, unit in jobs for i in range(r.start, r.stop, n))
    decode = functools.partial(_decode_into, size=size, channels=channels)
    results = _in_order(pool, decode, tasks, 16 * workers) if pool else map(decode, tasks)
    indices = (i for r, _ in jobs for i in r)
    for errors in results:
        for error in errors:
            if error is not None and not skip_bad_files:
                how = f"pass {skip_option}" if skip_option.startswith("-") else f"set {skip_option}=true"
                raise UserError(f"{error}; or {how} to skip such files")
            yield next(indices), error is None


def _in_order(pool, fn: Callable, tasks: Iterator, limit: int) -> Iterator:
    """fn(task) of each task, run by `pool`, in order, with at most `limit` tasks submitted and not yet taken."""
    ahead: collections.deque = collections.deque()
    for task in tasks:
        ahead.append(pool.apply_async(fn, (task,)))
        if len(ahead) >= limit:
            yield ahead.popleft().get()
    while ahead:
        yield ahead.popleft().get()


def prepare_table(source: Path, out: Path, size: int, channels: int, workers: int | None = None,
                  image_column: str | None = None, label_column: str | None = None, skip_bad_files: bool = False,
                  overwrite: bool = False, shard_size: int = SHARD_SIZE, progress: bool = True, log=print,
                  skip_option: str = "--skip-bad-files", rank: int = 0, world: int = 1) -> Store | None:
    """Decode the encoded images of a Parquet / Hugging Face datasets table or an LMDB database (`tables.py`)
    into the store `out`, with its labels and class names where it has them; otherwise as `prepare_folder`."""
    from dcgan_dist.data.tables import is_lmdb, open_lmdb, open_table

    check_out(out, overwrite, source if source.is_dir() else None)
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
    plan = {"source": str(source), "size": size, "channels": channels, "shard_size": shard_size,
            "skip_bad_files": skip_bad_files, "files": table.listing(), "image_column": table.image_column,
            "label_column": table.label_column}
    info = {"class_names": table.class_names, "num_classes": num_classes, "resize": FOLDER_RESIZE}
    workers = workers or os.cpu_count() or 1
    with _decoding_pool(workers) as pool:
        decoded = functools.partial(_decoded, table.encoded, size, channels, pool, workers, skip_bad_files,
                                    skip_option)
        store = _write(out, plan, len(table), decoded, labels, lambda i: f"row {i}", info, shard_size, progress,
                       log, rank, world)
    if store is not None and store.manifest["skipped"]:
        log(f"warning: skipped {len(store.manifest['skipped'])} of {len(table)} row(s) whose image cannot be "
            f"decoded ({skip_option})")
    return store


def prepare_arrays(images: np.ndarray, labels: np.ndarray | None, num_classes: int, out: Path, source: str,
                   plan: dict, overwrite: bool = False, shard_size: int = SHARD_SIZE, progress: bool = True,
                   log=print, rank: int = 0, world: int = 1) -> Store | None:
    """Write decoded uint8 images [N, C, S, S] (and int64 labels [N]) as the store `out`. `plan` names what
    they are (source, root, ...): a killed run resumes only under the same plan. `rank`/`world`: `_write`."""
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[2] == images.shape[3], images.shape
    check_out(out, overwrite, None)
    n, c, s, _ = images.shape
    plan = {**plan, "source": source, "size": s, "channels": c, "shard_size": shard_size, "count": n,
            "images": hashlib.sha256(np.ascontiguousarray(images)).hexdigest()}
    info = {"class_names": None, "num_classes": num_classes if labels is not None else 0, "resize": ARRAY_RESIZE}

    def decoded(jobs: list[tuple[range, Path]]) -> Iterator[tuple[int, bool]]:
        for r, unit in jobs:
            with open(unit, "wb") as f:
                for i in r:
                    f.write(np.ascontiguousarray(images[i]).tobytes())
            yield from ((i, True) for i in r)

    return _write(out, plan, n, decoded, None if labels is None else labels.tolist(), None, info, shard_size,
                  progress, log, rank, world)


def check_out(out: Path, overwrite: bool, source: Path | None) -> None:
    """Refuse an --out that would overwrite a store (unless `overwrite`), something else, or write into `source`."""
    if source is not None:
        src, dst = source.resolve(), out.resolve()
        if dst == src or src in dst.parents:
            raise UserError(f"--out {out} is inside the source folder {source}; nothing is written into a source: "
                            "choose an --out outside it")
    if (out / MANIFEST).is_file():
        if not overwrite:
            raise UserError(f"store {out} already exists; pass --overwrite to replace it, or choose another --out")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not a store; choose a new (or empty) directory")


def _write(out: Path, plan: dict, num_sources: int,
           decoded: Callable[[list[tuple[range, Path]]], Iterable[tuple[int, bool]]], labels: list[int] | None,
           name_of: Callable[[int], str] | None, info: dict, shard_size: int, progress: bool, log, rank: int = 0,
           world: int = 1, wait_minutes: float = 60.0) -> Store | None:
    """The one writer. The sources are cut into units of `shard_size`; rank `rank` of `world` decodes units
    rank, rank + world, ... into the temporary directory (a unit is finished once fsynced and its sidecar
    written; finished units of an earlier run under the same plan are kept, whatever its world size). Rank 0
    then packs the units into shards, writes labels and the manifest, and renames; the other ranks return None.
    `decoded(jobs)` writes, for each (sources, unit file) job, source i's uint8 [C, S, S] image into slot
    i - sources.start of the (empty) unit file, and yields (i, False if skipped else True) in order once it is
    there; `labels` are per source, `name_of(i)` names source i in the manifest's skipped list."""
    assert shard_size >= 1
    tmp, units = temp_dir(out), -(-num_sources // shard_size)
    _begin(tmp, plan, log) if rank == 0 else _await_plan(tmp, plan, wait_minutes, log)
    mine = range(rank, units, world)
    todo = [u for u in mine if _finished_unit(tmp, u) is None]
    if len(todo) < len(mine):
        log(f"resuming an interrupted preparation: {len(mine) - len(todo)} finished unit(s) kept in {tmp}")
    began, written = time.monotonic(), 0
    bar = _progress_bar(sum(min(shard_size, num_sources - u * shard_size) for u in todo), 0, progress)
    jobs = [(range(u * shard_size, min((u + 1) * shard_size, num_sources)), tmp / unit_name(u)) for u in todo]
    item = plan["channels"] * plan["size"] ** 2
    for _, path in jobs:  # what an earlier run left of them (a stale sidecar first: rank 0 trusts sidecars)
        path.with_name(path.name + ".json").unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        path.touch()
    k, skipped = 0, []  # the job being filled, its skipped sources
    try:
        for i, ok in decoded(jobs):
            bar.update(1)
            written += ok
            skipped += [] if ok else [i]
            sources, path = jobs[k]
            if i == sources.stop - 1:
                _finish_unit(path, len(sources), [j - sources.start for j in skipped], item, skipped)
                k, skipped = k + 1, []
    finally:
        bar.close()
    elapsed = time.monotonic() - began
    rate = f"{written} processed in {elapsed:.1f} s ({written / max(elapsed, 1e-9):.0f} images/s)"
    if rank != 0:
        log(f"rank {rank} of {world}: {len(todo)} unit(s) of {out}, {rate}; rank 0 writes the store")
        return None
    sidecars = _await_units(tmp, units, world, wait_minutes, log)
    skipped = sorted(i for unit in sidecars for i in unit["skipped"])
    if len(skipped) == num_sources:
        raise UserError(f"source {plan['source']!r}: none of its {num_sources} images can be decoded")
    store = _finish(tmp, out, plan, sidecars, skipped, labels, [name_of(i) for i in skipped] if name_of else [], info)
    log(f"prepared {store.count} images ({store.channels}x{store.image_size}x{store.image_size}, "
        f"{len(store.manifest['shards'])} shard(s)) in {out}: {rate}"
        + (f", {store.count - written} kept from an interrupted run or decoded by other ranks"
           if written < store.count else ""))
    return store


def _begin(tmp: Path, plan: dict, log) -> None:
    """Rank 0: keep the temporary directory of an earlier run under the same plan (its owners check their
    units); otherwise start it afresh. plan.json is written last: the other ranks wait for it."""
    text = json.dumps({"format_version": FORMAT_VERSION, **plan}, sort_keys=True)
    if (tmp / "plan.json").is_file() and (tmp / "plan.json").read_text() == text:
        return
    if tmp.exists():
        log(f"note: {tmp} holds a preparation with other arguments (or sources); starting afresh")
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_atomic(tmp / "plan.json", text.encode())


def _await_plan(tmp: Path, plan: dict, wait_minutes: float, log) -> None:
    """Ranks but 0: wait until rank 0 has set up the temporary directory for this very plan."""
    text = json.dumps({"format_version": FORMAT_VERSION, **plan}, sort_keys=True)
    deadline = time.monotonic() + 60 * wait_minutes
    while not ((tmp / "plan.json").is_file() and (tmp / "plan.json").read_text() == text):
        if time.monotonic() > deadline:
            raise UserError(f"waited {wait_minutes:g} min for rank 0 to set up {tmp} with the same arguments; "
                            "run every rank with the same dcgan-prepare arguments (and --out on a shared filesystem)")
        time.sleep(0.2)


def _await_units(tmp: Path, units: int, world: int, wait_minutes: float, log) -> list[dict]:
    """Rank 0: the sidecars of every unit, waiting for the other ranks' (up to `wait_minutes` without a new one,
    saying so every 30 s)."""
    found: dict[int, dict] = {}
    last_new, said = time.monotonic(), time.monotonic()
    while True:
        for u in range(units):
            if u not in found and (sidecar := _read_sidecar(tmp, u)) is not None:
                found[u], last_new = sidecar, time.monotonic()
        missing = [u for u in range(units) if u not in found]
        if not missing:
            return [found[u] for u in range(units)]
        owners = sorted({u % world for u in missing})
        if time.monotonic() - last_new > 60 * wait_minutes:
            raise UserError(f"{tmp}: {len(missing)} unit(s) never finished (rank(s) {owners}) in {wait_minutes:g} "
                            "min; run the same dcgan-prepare command again: finished units are kept")
        if time.monotonic() - said >= 30:
            log(f"waiting for {len(missing)} unit(s) from rank(s) {owners}")
            said = time.monotonic()
        time.sleep(0.2)


def unit_name(u: int) -> str:
    return f"unit-{u:05d}.u8"


def _read_sidecar(tmp: Path, u: int) -> dict | None:
    try:
        return json.loads((tmp / (unit_name(u) + ".json")).read_text())
    except (OSError, ValueError):
        return None


def _finished_unit(tmp: Path, u: int) -> dict | None:
    """The sidecar of unit `u` if the unit is finished and its file matches it; None: (re)decode it."""
    sidecar = _read_sidecar(tmp, u)
    if sidecar is None or not (tmp / unit_name(u)).is_file() or sha256_file(tmp / unit_name(u)) != sidecar["sha256"]:
        return None
    return sidecar


def _finish_unit(path: Path, slots: int, empty: list[int], item: int, skipped: list[int]) -> None:
    """A unit whose `slots` slots of `item` bytes are written, but for the `empty` ones (skipped sources, in
    the store's indices `skipped`): closed up, hashed, fsynced, then its sidecar written (it is then finished)."""
    if empty:
        keep = sorted(set(range(slots)) - set(empty))
        with open(path, "rb") as f:
            rows = [os.pread(f.fileno(), item, k * item) for k in keep]
        write_atomic(path, b"".join(rows))  # fsynced
    else:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    entry = {"file": path.name, "count": slots - len(empty), "sha256": sha256_file(path), "skipped": skipped}
    write_atomic(path.with_name(path.name + ".json"), json.dumps(entry).encode())


class _ShardWriter:
    """One shard being written from units that had skipped images, hashed as it goes; fsynced when finished."""

    def __init__(self, path: Path):
        self.path, self.count = path, 0
        self.file, self.hash = open(path, "wb"), hashlib.sha256()

    def add(self, image: np.ndarray) -> None:  # [C, S, S]
        data = np.ascontiguousarray(image).tobytes()
        self.file.write(data)
        self.hash.update(data)
        self.count += 1

    def finish(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {"file": self.path.name, "count": self.count, "sha256": self.hash.hexdigest()}


def _pack(tmp: Path, units: list[dict], shard_size: int, item_shape: tuple[int, ...]) -> list[dict]:
    """The units as shards of `shard_size` images. Without skipped files unit k is shard k (a rename); else the
    images are copied along into full shards."""
    if not any(unit["skipped"] for unit in units):
        for k, unit in enumerate(units):
            os.rename(tmp / unit["file"], tmp / shard_name(k))
        return [{"file": shard_name(k), "count": u["count"], "sha256": u["sha256"]} for k, u in enumerate(units)]
    shards, shard = [], None
    for unit in units:
        if unit["count"]:
            rows = np.memmap(tmp / unit["file"], dtype=np.uint8, mode="r", shape=(unit["count"], *item_shape))
            for image in rows:
                shard = shard or _ShardWriter(tmp / shard_name(len(shards)))
                shard.add(image)
                if shard.count == shard_size:
                    shards.append(shard.finish())
                    shard = None
        (tmp / unit["file"]).unlink()
    if shard is not None:
        shards.append(shard.finish())
    return shards


def _finish(tmp: Path, out: Path, plan: dict, units: list[dict], skipped: list[int], labels: list[int] | None,
            skipped_names: list[str], info: dict) -> Store:
    """Shards, labels, then the manifest (last), then the rename of `tmp` to `out`; returns the store opened."""
    shards = _pack(tmp, units, plan["shard_size"], (plan["channels"], plan["size"], plan["size"]))
    count = sum(shard["count"] for shard in shards)
    labels_entry = None
    if labels is not None:
        gone = set(skipped)
        kept = np.asarray([y for i, y in enumerate(labels) if i not in gone], dtype=np.int64)  # [count]
        assert len(kept) == count, (len(kept), count)
        write_atomic(tmp / LABELS, kept.tobytes())
        labels_entry = {"file": LABELS, "sha256": hashlib.sha256(kept.tobytes()).hexdigest()}
    manifest = {"format_version": FORMAT_VERSION, "count": count, "channels": plan["channels"],
                "image_size": plan["size"], "shard_size": plan["shard_size"], "shards": shards,
                "labels": labels_entry, **info, "source": plan["source"], "skipped": skipped_names}
    write_atomic(tmp / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    for p in [*tmp.glob("unit-*.u8.json"), tmp / "plan.json"]:  # the manifest now holds what they said
        p.unlink()
    fsync_dir(tmp)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    _swap_in(tmp, out)
    return open_store(out)


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the complete directory `tmp` to `out`; an `out` already there (--overwrite, a stale staged copy) is
    set aside first and removed after, so `out` is never half-written."""
    old = out.parent / f".{out.name}.tmp-old"
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    os.rename(tmp, out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="dcgan-prepare", disable=not enabled,
                dynamic_ncols=True, smoothing=0.1)
