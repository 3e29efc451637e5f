"""The one store writer (`write_store`), resumable and shared by any number of ranks; `store.py` has the format.

Writing goes to the hidden sibling `store.temp_dir(STORE)`, renamed to STORE once the manifest is in it, so
STORE is either absent or complete. The sources (the sorted file list, or a table's rows) are decoded in units
of shard_size sources, each its own file that the decoder writes into by slot, with a sidecar (count, sha256,
skipped sources) once finished; several ranks (`dcgan-prepare` under `accelerate launch` or `srun`) share the
units round-robin. A killed preparation, run again with the same arguments (with any number of ranks), keeps the
units it finished (each checked against its sidecar's sha256) and decodes only the rest. Rank 0 then packs the
units into shards (a rename when no file was skipped), so the result is byte-identical to an uninterrupted
single-process run. How a preparation runs (workers, ranks, skipping, messages) travels as one `PrepareOptions`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcgan_dist import launcher
from dcgan_dist.data.decode import BACKGROUND
from dcgan_dist.data.store import FORMAT_VERSION, LABELS, MANIFEST, SHARD_SIZE, Store, open_store, shard_name, temp_dir
from dcgan_dist.errors import UserError
from dcgan_dist.fileio import Claim, claim, fsync_dir, read_owner, sha256_file, swap_in, write_atomic
from dcgan_dist.registry import IMAGE_SIZES


@dataclass(frozen=True)
class PrepareOptions:
    """How a preparation runs, whatever its source: `workers` decoding processes (None: one per CPU), this
    process being rank `rank` of `world` (`_write`), `skip_bad_files` (else an image that cannot be decoded
    stops it, its message naming `skip_option`), `overwrite` an existing store, images per shard, the progress
    bar and where lines go (`log`)."""
    workers: int | None = None
    skip_bad_files: bool = False
    overwrite: bool = False
    shard_size: int = SHARD_SIZE
    progress: bool = True
    log: Callable[[str], None] = print
    skip_option: str = "--skip-bad-files"
    rank: int = 0
    world: int = 1
    background: int = BACKGROUND  # the grey level transparent pixels are composited onto (decoded sources)


    @classmethod
    def for_job(cls, size: int, workers: int | None, shard_size: int | None, progress: bool,
                **flags) -> PrepareOptions:
        """dcgan-prepare's options for this process of its job. Under `accelerate launch`/torchrun or `srun` the
        ranks share the work through --out's temporary directory (no network): --out must be on a filesystem all
        of them see. Decoding processes default to this node's CPUs divided among its ranks; the bar is rank 0's."""
        if size not in IMAGE_SIZES:
            raise UserError(f"--size {size}: training takes {', '.join(map(str, IMAGE_SIZES))}; use one of them")
        if workers is not None and workers < 1:
            raise UserError(f"--workers {workers}: use 1 or more processes")
        if shard_size is not None and shard_size < 1:
            raise UserError(f"--shard-size {shard_size}: use 1 or more images per shard")
        where = launcher.place()
        return cls(workers=workers or max(1, len(os.sched_getaffinity(0)) // where.local_world_size),
                   shard_size=shard_size or SHARD_SIZE, progress=progress and where.rank == 0, rank=where.rank,
                   world=where.world_size, **flags)


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


def write_store(out: Path, plan: dict, num_sources: int,
           decoded: Callable[[list[tuple[range, Path]]], Iterable[tuple[int, bool]]], labels: list[int] | None,
           name_of: Callable[[int], str] | None, info: dict, options: PrepareOptions,
           wait_minutes: float = 60.0) -> Store | None:
    """The one writer. The sources are cut into units of `shard_size`; rank `rank` of `world` decodes units
    rank, rank + world, ... into the temporary directory (a unit is finished once fsynced and its sidecar
    written; finished units of an earlier run under the same plan are kept, whatever its world size). Rank 0
    then packs the units into shards, writes labels and the manifest, and renames; the other ranks return None.
    `decoded(jobs)` writes, for each (sources, unit file) job, source i's uint8 [C, S, S] image into slot
    i - sources.start of the (empty) unit file, and yields (i, False if skipped else True) in order once it is
    there; `labels` are per source, `name_of(i)` names source i in the manifest's skipped list."""
    shard_size, log, rank, world = options.shard_size, options.log, options.rank, options.world
    assert shard_size >= 1
    owner = _own(out, overwrite=options.overwrite) if rank == 0 else contextlib.nullcontext()
    with owner:  # released once the store is in place, or on the way out of a failure
        tmp, units = temp_dir(out), -(-num_sources // shard_size)
        _begin(tmp, plan, log) if rank == 0 else _await_plan(tmp, plan, out, wait_minutes, log)
        mine = range(rank, units, world)
        todo = [u for u in mine if _finished_unit(tmp, u) is None]
        if len(todo) < len(mine):
            log(f"resuming an interrupted preparation: {len(mine) - len(todo)} finished unit(s) kept in {tmp}")
        began, written = time.monotonic(), 0
        bar = _progress_bar(sum(min(shard_size, num_sources - u * shard_size) for u in todo), 0, options.progress)
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
        names = [name_of(i) for i in skipped] if name_of else []
        store = _finish(tmp, out, plan, sidecars, skipped, labels, names, info)
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


def _owner_lock(out: Path) -> Path:
    return out.parent / f".{out.name}.prepare.lock"


def _own(out: Path, overwrite: bool) -> Claim:
    """Rank 0: own `out` (`fileio.claim` on its hidden sibling .OUT.prepare.lock) until the store is in place, so
    a second dcgan-prepare of `out` stops before touching anything; then `check_out` again, now that nothing else
    writes."""
    owner = claim(_owner_lock(out), f"--out {out}", "wait for that preparation to finish (or stop "
                  "it), or choose another --out", job=launcher.launch())
    owner.commit()
    check_out(out, overwrite, None)
    return owner


def _await_plan(tmp: Path, plan: dict, out: Path, wait_minutes: float, log) -> None:
    """Ranks but 0: wait until their own rank 0 owns `out` (its launch in the lock file: `_own`) and has set up
    the temporary directory for this very plan."""
    text = json.dumps({"format_version": FORMAT_VERSION, **plan}, sort_keys=True)
    deadline, mine = time.monotonic() + 60 * wait_minutes, launcher.launch()
    while not (read_owner(_owner_lock(out)).get("job") == mine
               and (tmp / "plan.json").is_file() and (tmp / "plan.json").read_text() == text):
        if time.monotonic() > deadline:
            raise UserError(f"waited {wait_minutes:g} min for rank 0 to own {out} and set up {tmp} with the same "
                            "arguments; run every rank with the same dcgan-prepare arguments (and --out on a shared "
                            "filesystem), and no other preparation of that --out")
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
    swap_in(tmp, out, out.parent / f".{out.name}.tmp-old")
    return open_store(out)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="dcgan-prepare", disable=not enabled,
                dynamic_ncols=True, smoothing=0.1)
