"""The prepared image store on disk, and reading it: a dataset decoded, resized and cropped once into raw uint8
shards that training reads image by image through the page cache, so no rank decodes images or holds the whole
dataset in memory. Writing it (resumably, by several ranks): `prepare.py`; decoding its images: `decode.py`.

    STORE/manifest.json       format_version, count, channels, image_size, shard_size, shards [{file, count,
                              sha256}], labels {file, sha256} or null, num_classes, class_names, source, resize,
                              skipped; written last, so a directory without it is not (yet) a store
    STORE/shard-00000.u8 ...  raw uint8 [count, C, S, S], C-contiguous, no header (np.memmap reads it as is);
                              every shard holds shard_size images but the last
    STORE/labels.i64          raw int64 [count], when the source has labels

A store being written lives in the hidden sibling `temp_dir(STORE)` until it is complete. No torch at import
(the reader imports torch when it gathers).
"""

from __future__ import annotations

import json
import os
import resource
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dcgan_dist.errors import UserError
from dcgan_dist.fileio import sha256_file

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LABELS = "labels.i64"
SHARD_SIZE = 4096  # images per shard (the last one may hold fewer)
READ_THREADS = 8  # reads in flight for the images of a batch that are not in the page cache


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.u8"


def temp_dir(out: str | Path) -> Path:
    """Where a preparation of `out` writes until it is complete (a hidden sibling)."""
    out = Path(out)
    return out.parent / f".{out.name}.tmp-prepare"



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
        if self.labels is not None:  # an embedding lookup with any other index fails deep in torch (on a GPU: an
            bad = np.flatnonzero((self.labels < 0) | (self.labels >= self.num_classes))  # assert that hides why)
            if len(bad):
                raise UserError(f"store {path}: {LABELS} holds label {self.labels[bad[0]]} at index {bad[0]} "
                                f"({len(bad)} such), outside 0..{self.num_classes - 1} (num_classes in manifest.json); "
                                "the store is damaged: dcgan-prepare --verify it, or prepare it again (--overwrite)")

    def __len__(self) -> int:
        return self.count

    def __del__(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=True)
        for fd in getattr(self, "_fds", []):
            os.close(fd)

    def gather(self, indices) -> torch.Tensor:
        """Images of global `indices` (any int sequence, numpy array or CPU tensor) -> uint8 tensor [B, C, S, S]."""
        import torch  # here, not at the top: opening, verifying and writing a store need no torch

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


def describe(store: Store) -> str:
    """One line on a store: count, shape, shards, labels."""
    labels = f"{store.num_classes} classes" if store.labels is not None else "no labels"
    return (f"{store.count} images, {store.channels}x{store.image_size}x{store.image_size}, "
            f"{len(store.manifest['shards'])} shard(s), {labels}")
