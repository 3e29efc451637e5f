"""Durable file writes, hashing and an inter-process lock, shared by the checkpoint, store and cache writers."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
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
