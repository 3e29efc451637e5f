"""Durable file writes (a file, or a whole directory swapped in), hashing and inter-process locks (one process at
a time, or one owner naming itself), shared by the checkpoint, store and cache writers."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
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
        name = os.fsencode(p if root is None else p.relative_to(root))  # the name's bytes, UTF-8 or not
        digest.update(name + f":{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _locked(fd: int, path: Path, fix: str) -> bool:
    """Take the exclusive flock on `fd` (the file `path`) without waiting: False while another process holds it; on a
    filesystem without locks (some cluster filesystems), one line ending in `fix`."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        raise UserError(f"cannot lock {path} ({e.strerror}): its filesystem has no file locks; {fix}") from None


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
            if _locked(fd, lock, "set data.cache_dir to a local or NFS directory, or prepare the data ahead with "
                       "dcgan-prepare"):
                break
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




class Claim:
    """An exclusive flock held by this process until `release()` or its exit, however that comes (the lock dies
    with the process: a killed owner never leaves it stale). `previous`: what the last owner wrote into the lock
    file (it may be gone), `record`: what this one wrote. Until `commit()`, an exit puts the last owner's record
    back (or removes the lock file, and its directory, if this claim made them), so a process that stops on a bad
    input leaves everything as it found it."""

    def __init__(self, path: Path, fd: int, previous: bytes, made: list[Path]):
        self.path, self.fd, self.committed, self.made = path, fd, False, made
        self.previous_bytes, self.record = previous, {}
        try:
            self.previous = json.loads(previous or b"{}")
        except ValueError:
            self.previous = {}
        atexit.register(self._at_exit)

    def write(self, **extra) -> None:
        """Add `extra` to what the lock file says about its owner (rewritten in place: a rename would drop the lock)."""
        self.record = {**self.record, **extra}
        self._put(json.dumps(self.record).encode())

    def _put(self, data: bytes) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def commit(self) -> None:
        """The owner has started its work: its record stays."""
        self.committed = True

    def release(self) -> None:
        if self.fd >= 0:
            if not self.committed and not self.made:
                self._put(self.previous_bytes)
            _remove([] if self.committed else self.made)
            os.close(self.fd)
            self.fd = -1
        atexit.unregister(self._at_exit)

    def _at_exit(self) -> None:
        self.release()

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _remove(made: list[Path]) -> None:
    """Remove what a claim made (the lock file, then its directory), if still there and empty."""
    for path in made:
        with contextlib.suppress(OSError):
            path.rmdir() if path.is_dir() else path.unlink()


def read_owner(path: Path) -> dict:
    """What the owner of lock file `path` wrote about itself ({} if nothing readable: it may be writing it now)."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read(1 << 16) or b"{}")
    except (OSError, ValueError):
        return {}


def describe_owner(owner: dict) -> str:
    job = f", {owner['job']}" if owner.get("job") else ""
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}{job}, since {owner.get('since', '?')}"


def claim(path: Path, what: str, fix: str, job: str | None = None, wait_s: float = 0.0, log=print) -> Claim:
    """Own `what` (a run directory, a store being written) through an exclusive flock on the file `path`, on this
    machine or, on a shared filesystem, on any node. The owner writes its host, pid, start and `job` into the file.
    While another process owns it: stop at once with one line naming that owner and ending in `fix` -- unless the
    owner is of the same `job` (an earlier attempt of this job, still ending), which is waited for up to `wait_s`.
    """
    made = [] if path.parent.exists() else [path.parent]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        made.insert(0, path)
    except FileExistsError:
        fd = os.open(path, os.O_RDWR)
    start, said = time.monotonic(), -math.inf
    try:
        while True:
            if _locked(fd, path, f"two processes could write {what} at once; use a directory on a filesystem with "
                       "locks (local disk, NFS, Lustre mounted with -o flock)"):
                break
            owner, waited = read_owner(path), time.monotonic() - start
            if not (job and owner.get("job") == job and waited < wait_s):
                raise UserError(f"{what} is in use by another process ({describe_owner(owner)}; it holds {path}): "
                                f"{fix}")
            if time.monotonic() - said >= 30:
                log(f"waiting for an earlier attempt of this job to let go of {what} ({describe_owner(owner)})")
                said = time.monotonic()
            time.sleep(0.2)
    except BaseException:
        os.close(fd)
        _remove(made)
        raise
    owned = Claim(path, fd, os.pread(fd, 1 << 16, 0), made)
    owned.write(host=socket.gethostname(), pid=os.getpid(), job=job,
                since=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
    return owned


def user_cache_dir() -> Path:
    """Where caches go by default (stores prepared on first use, classifiers): $XDG_CACHE_HOME/dcgan_dist
    (~/.cache/dcgan_dist). Never the dataset's own folder, which on clusters is often shared and read-only."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dcgan_dist"
