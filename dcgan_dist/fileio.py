"""Durable file writes (a file, or a whole directory swapped in), hashing and an inter-process lock, shared by the
checkpoint, store and cache writers."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from dcgan_dist.errors import UserError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write a whole file atomically and durably: a temporary sibling, fsynced, renamed over `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def swap_in(tmp: Path, final: Path, old: Path) -> None:
    """Rename the complete (fsynced) directory `tmp` to `final`, durably. A `final` already there (a checkpoint
    saved again, a store prepared with --overwrite, a stale staged copy) is first renamed to `old`, a hidden
    sibling, and removed after, so `final` is never half-written: a crash leaves the old one or the new one."""
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def listing(files: list[Path], root: Path | None = None) -> str:
    """sha256 over the files' names (relative to `root` when given), sizes and modification times: what says
    an edited folder or table is not the same one (a resumed preparation, a cached store's name)."""
    digest = hashlib.sha256()
    for p in files:
        try:
            st = p.stat()
        except FileNotFoundError:
            raise UserError(f"{p} vanished while {root or p.parent} was being read; is something else changing the "
                            "folder? Run again once it is stable") from None
        digest.update(f"{p if root is None else p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@contextlib.contextmanager
def exclusive(lock: Path, what: str, wait_minutes: float, log=print) -> Iterator[None]:
    """Hold an exclusive lock on the file `lock` while the block runs: one process at a time does `what`
    (prepares a store, trains a classifier), on this machine or, on a shared filesystem, on any node.

    flock: the lock goes with its process, however that ends, so a killed holder never leaves it stale. While
    another process holds it, wait up to `wait_minutes`, saying so at once and every 30 s; never inside a collective.
    """
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start, said = time.monotonic(), -math.inf
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            except OSError as e:  # a filesystem without locks (some cluster filesystems)
                raise UserError(f"cannot lock {lock} ({e.strerror}): its filesystem has no file locks; set "
                                "data.cache_dir to a local or NFS directory, or prepare the data ahead with "
                                "dcgan-prepare") from None
            waited = time.monotonic() - start
            if waited > 60 * wait_minutes:
                raise UserError(f"waited {waited / 60:.1f} min for another process {what} (it holds {lock}); "
                                "raise data.wait_minutes, or stop that process")
            if time.monotonic() - said >= 30:
                log(f"waiting for another process {what} ({waited:.0f} s so far; it holds {lock})")
                said = time.monotonic()
            time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # releases the lock
