"""Writing a store (`store.py` has the format): resumably, by any number of ranks; and staging a copy of one.

Writing goes to the hidden sibling `store.temp_dir(STORE)`, renamed to STORE once the manifest is in it, so
STORE is either absent or complete. The sources (the sorted file list, or a table's rows) are decoded in units
of shard_size sources, each its own file that the decoding workers (`decode.py`) write into by slot, with a
sidecar (count, sha256, skipped sources) once finished; several ranks (`dcgan-prepare` under `accelerate launch`
or `srun`) share the units round-robin. A killed preparation, run again with the same arguments (with any number
of ranks), keeps the units it finished (each checked against its sidecar's sha256) and decodes only the rest.
Rank 0 then packs the units into shards (a rename when no file was skipped), so the result is byte-identical to
an uninterrupted single-process run. How a preparation runs (workers, ranks, skipping, messages) travels as one
`PrepareOptions`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dcgan_dist import launcher
from dcgan_dist.data.decode import (
    BACKGROUND,
    FOLDER_RESIZE,
    IMAGE_EXTENSIONS,
    decode_jobs,
    decoding_pool,
    folder_classes,
    list_images,
)
from dcgan_dist.data.store import (
    FORMAT_VERSION,
    LABELS,
    MANIFEST,
    SHARD_SIZE,
    Store,
    open_store,
    read_manifest,
    shard_name,
    temp_dir,
    verify_store,
)
from dcgan_dist.errors import UserError
from dcgan_dist.fileio import (
    Claim,
    claim,
    exclusive,
    fsync_dir,
    listing,
    read_owner,
    sha256_file,
    swap_in,
    write_atomic,
)
from dcgan_dist.registry import IMAGE_SIZES

ARRAY_RESIZE = ("as data.load_dataset: the whole image to S x S (torch bilinear, antialias) where its size "
                "differs; uint8")


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


class _Sources(NamedTuple):
    """What a folder or a table hands the one decoding body, `_decode_sources`."""
    plan: dict  # what they are (source, listing, ...): a killed run resumes only under the same plan
    count: int
    items_of: Callable[[int, int], list]  # (start, stop) -> the sources' paths, or (name, encoded bytes or None)
    labels: list[int] | None
    name_of: Callable[[int], str]  # source i in the manifest's skipped list
    info: dict  # the manifest's class_names, num_classes and resize
    skipped: Callable[[list[str]], str]  # the warning's words for the skipped sources (their names)


def prepare_folder(folder: Path, out: Path, size: int, channels: int, source: str,
                   options: PrepareOptions = PrepareOptions()) -> Store | None:
    """Decode every image under `folder` (sorted, recursive) into the store `out`. First-level sub-folders
    holding every image are the classes. `source` is recorded in the manifest as given. With `world` > 1 this
    is rank `rank`'s part (see `_write`): rank 0 returns the store, the others None. Nothing is written into
    `folder`."""
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
                  label_column: str | None = None, options: PrepareOptions = PrepareOptions()) -> Store | None:
    """Decode the encoded images of a Parquet / Hugging Face datasets table or an LMDB database (`tables.py`)
    into the store `out`, with its labels and class names where it has them; otherwise as `prepare_folder`."""
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
        store = _write(out, plan, s.count, decoded, s.labels, s.name_of, s.info, options)
    if store is not None and store.manifest["skipped"]:
        options.log(f"warning: skipped {s.skipped(store.manifest['skipped'])}")
    return store


def prepare_arrays(images: np.ndarray, labels: np.ndarray | None, num_classes: int, out: Path, source: str,
                   plan: dict, options: PrepareOptions = PrepareOptions()) -> Store | None:
    """Write decoded uint8 images [N, C, S, S] (and int64 labels [N]) as the store `out`. `plan` names what
    they are (source, root, ...): a killed run resumes only under the same plan. Of `options`, `workers`
    and skipping do not apply (nothing is decoded)."""
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

    return _write(out, plan, n, decoded, None if labels is None else labels.tolist(), None, info, options)


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
