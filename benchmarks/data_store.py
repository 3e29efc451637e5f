"""The prepared store: preparation speed, a training rank's private memory, and batch delivery.

    python benchmarks/data_store.py [--parts prep uss delivery] [--jpegs 16000] [--uss-gb 1 8]
                                    [--steps 300] [--repeats 3] [--dir DIR]

prep      `dcgan-prepare`'s decoding of CelebA-like JPEGs (made here: 178x218, smooth photo-like content with
          grain, quality 90) to 64x64, with 1 and with 2 worker processes; images/s, and the ratio 2 / 1
          (target >= 1.8 on a 2-core machine). The real `dcgan-prepare`; the rate is the one it prints (from
          its writer's start, so the workers' start-up is included, the command's own import is not). Beside it
          the machine's own ceiling for this work: 2 independent processes decoding halves of 4,000 of the
          JPEGs (no writer, no pool; start-up excluded) over one process decoding them all.
uss       a real 2-rank training run (`accelerate launch launch/train.py`, tiny networks, batch 64 a rank) from
          stores of 1 GB and 8 GB at 64x64x3: each rank's private memory (USS, from /proc/PID/smaps) once the
          run is warm (the first logged step) and after `--steps` more; growth target < 100 MB. A rank that
          held the dataset, as an in-memory copy does, would grow by the store's size.
delivery  `next()` of the store's batch source (`StoreBatches`, batch 128) against the in-memory tensor's
          (`InMemoryBatches`, the same images in RAM, the same order) at 64x64x3, warm (pages in the page
          cache); ratio store / memory, per repeat (target >= 0.9); and the floor of any per-image read
          from Python: a bare loop of one `os.preadv` an image, nothing else. Then cold: the 8 GB store's pages evicted
          from the page cache first (posix_fadvise DONTNEED on every shard, so each read goes to disk, as from a
          store larger than free memory), images/s over random batches.

Scratch data goes under --dir (default: a temporary directory next to the system's), removed at the end.
"""

import argparse
import json
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

from dcgan_dist.data.batches import InMemoryBatches, StoreBatches
from dcgan_dist.data.decode import decode_image
from dcgan_dist.data.prepare import PrepareOptions, prepare_arrays
from dcgan_dist.data.store import open_store

REPO = Path(__file__).resolve().parents[1]
ITEM = 3 * 64 * 64  # bytes of one 64x64 RGB image


def celeba_like(folder: Path, n: int, seed: int = 0) -> None:
    """`n` 178x218 JPEGs that compress like photos: a smooth random field (upsampled 8x8x3 noise) plus grain."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((178, 218), Image.BICUBIC)
        pixels = np.asarray(base, dtype=np.int16) + rng.normal(0, 6, (218, 178, 3)).astype(np.int16)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


def bench_prep(work: Path, jpegs: int, repeats: int) -> None:
    src = work / "celeba_like"
    celeba_like(src, jpegs)
    size_mb = sum(p.stat().st_size for p in src.iterdir()) / 2**20
    print(f"\n## prep: {jpegs} CelebA-like JPEGs (178x218, {size_mb:.0f} MB) -> 64x64 store, images/s")
    rates = {1: [], 2: []}
    for _ in range(repeats):
        for workers in (1, 2):  # the real command; its own line gives the rate (its start-up not included)
            out = work / f"prep-{workers}"
            proc = subprocess.run([str(Path(sys.executable).parent / "dcgan-prepare"), str(src), "--size", "64",
                                   "--out", str(out), "--workers", str(workers)], capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"dcgan-prepare failed: {proc.stderr}")
            rates[workers].append(float(re.search(r"\((\d+) images/s\)", proc.stdout).group(1)))
            shutil.rmtree(out)
    ratios = [b / a for a, b in zip(rates[1], rates[2])]
    ceiling = [decoders_ratio(sorted(src.iterdir())[:4000]) for _ in range(repeats)]
    print("| workers | images/s (median) | all repeats |\n|---|---|---|")
    for w, r in rates.items():
        print(f"| {w} | {statistics.median(r):,.0f} | {', '.join(f'{x:,.0f}' for x in r)} |")
    print(f"ratio 2 workers / 1: {statistics.median(ratios):.2f} (per repeat {', '.join(f'{x:.2f}' for x in ratios)};"
          " target >= 1.8)")
    print(f"this machine's ceiling: 2 independent decoding processes / 1 (no writer, start-up excluded): "
          f"{statistics.median(ceiling):.2f} (per repeat {', '.join(f'{x:.2f}' for x in ceiling)})")


def _decode_all(files: list[Path], barrier=None, times=None) -> float:
    if barrier is not None:
        barrier.wait()
    start = time.perf_counter()
    for f in files:
        decode_image(f, 64, 3, draft=True)
    elapsed = time.perf_counter() - start
    if times is not None:
        times.put(elapsed)
    return elapsed


def decoders_ratio(files: list[Path]) -> float:
    """Images/s of 2 processes each decoding half of `files` (started, then released together) over one
    process decoding all: what 2 cores give this decoding with nothing else running."""
    one = len(files) / _decode_all(files)
    ctx = multiprocessing.get_context("spawn")
    barrier, times = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_decode_all, args=(files[k::2], barrier, times)) for k in range(2)]
    for p in procs:
        p.start()
    slowest = max(times.get(), times.get())
    for p in procs:
        p.join()
    return len(files) / slowest / one


def make_store(work: Path, gigabytes: float) -> Path:
    """A 64x64x3 store of about `gigabytes` GB of random images, written by the real writer from a raw file."""
    n = int(gigabytes * 2**30 // ITEM)
    raw, out = work / f"raw-{gigabytes:g}.u8", work / f"store-{gigabytes:g}gb"
    rng = np.random.default_rng(1)
    with open(raw, "wb") as f:
        block = rng.integers(0, 256, (4096, ITEM), dtype=np.uint8)
        for start in range(0, n, 4096):
            f.write(np.roll(block, start, axis=1)[:min(4096, n - start)].tobytes())
    images = np.memmap(raw, dtype=np.uint8, mode="r", shape=(n, 3, 64, 64))
    prepare_arrays(images, None, 0, out, "benchmark", {}, PrepareOptions(progress=False, log=lambda m: None))
    raw.unlink()
    return out


def uss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_full_info().uss / 2**20


def rank_pids(launcher: subprocess.Popen) -> list[int]:
    found = []
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if "RANK" in child.environ() and "launch/train.py" in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.Error:
            pass
    return found


def bench_uss(work: Path, store: Path, steps: int) -> tuple[float, float, float]:
    run = work / f"run-{store.name}"
    every = max(steps // 6, 1)
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "launch/train.py",
           "--config", "configs/smoke.yaml", "data.name=store", f"data.root={store}", "data.num_images=null",
           "model.image_size=64", "model.channels=3", "train.batch_size=64", f"train.steps={steps + 2 * every}",
           "train.checkpoint_every=0", "log.sample_every=0", f"log.every={every}", f"run.dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def uss_at(step: int) -> list[float]:
        metrics = run / "metrics.jsonl"
        while not (metrics.exists() and any(json.loads(line)["step"] >= step
                                            for line in metrics.read_text().splitlines())):
            if proc.poll() is not None:
                raise SystemExit(f"training failed: {proc.stderr.read()[-2000:]}")
            time.sleep(0.05)
        return [uss_mb(pid) for pid in rank_pids(proc)]

    first, last = uss_at(every), uss_at(every + steps)
    proc.wait()
    shutil.rmtree(run, ignore_errors=True)
    growth = max(b - a for a, b in zip(first, last))
    return max(first), max(last), growth


def evict(store: Path) -> None:
    for shard in store.glob("shard-*.u8"):
        fd = os.open(shard, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def rate(source, batches: int) -> float:
    start = time.perf_counter()
    for _ in range(batches):
        next(source)
    return batches * source.order.batch_size / (time.perf_counter() - start)


def bare_reads(opened, n: int, seed: int) -> float:
    """Images/s of the tightest Python loop over one `os.preadv` an image into one buffer: the store's floor."""
    shard, offset = np.divmod(np.random.default_rng(seed).integers(0, opened.count, n), opened.shard_size)
    fds, item = opened._fds, opened.item_bytes
    calls = [(fds[k], o * item) for k, o in zip(shard.tolist(), offset.tolist())]
    buf = [memoryview(bytearray(item))]
    start = time.perf_counter()
    for fd, at in calls:
        os.preadv(fd, buf, at)
    return n / (time.perf_counter() - start)


def bench_delivery(work: Path, repeats: int, big: Path | None) -> None:
    store = make_store(work, 0.5)  # 43,690 images: warm in the page cache, and in RAM for the baseline
    opened = open_store(store)
    images = opened.gather(torch.arange(opened.count))
    print(f"\n## delivery: batch 128 of 64x64x3 uint8, {opened.count} images, one thread, images/s")
    mem, disk, ratios = [], [], []
    for r in range(repeats):
        a = InMemoryBatches(images, None, batch_size=128, seed=r)
        b = StoreBatches(opened, batch_size=128, seed=r)
        rate(b, 20)  # the pages are in the page cache after the write; this touches the code path
        mem.append(rate(a, 600))
        disk.append(rate(b, 600))
        ratios.append(disk[-1] / mem[-1])
    print("| source | images/s (median) | all repeats |\n|---|---|---|")
    print(f"| in-memory tensor (InMemoryBatches) | {statistics.median(mem):,.0f} | "
          f"{', '.join(f'{x:,.0f}' for x in mem)} |")
    print(f"| store, warm page cache (StoreBatches) | {statistics.median(disk):,.0f} | "
          f"{', '.join(f'{x:,.0f}' for x in disk)} |")
    print(f"ratio store / memory: {statistics.median(ratios):.2f} (per repeat "
          f"{', '.join(f'{x:.2f}' for x in ratios)}; target >= 0.9)")
    floor = [bare_reads(opened, 600 * 128, seed=r) for r in range(repeats)]
    print(f"| a bare `os.preadv` loop, one call an image, nothing else (any per-image read from Python) | "
          f"{statistics.median(floor):,.0f} | {', '.join(f'{x:,.0f}' for x in floor)} |")
    if big is not None:
        cold = open_store(big)
        free = psutil.virtual_memory().available / 2**30
        colds = []
        for r in range(repeats):
            evict(big)
            colds.append(rate(StoreBatches(cold, batch_size=128, seed=100 + r), 100))
        size = sum(f.stat().st_size for f in big.glob("shard-*.u8")) / 2**30
        print(f"| store, cold ({size:.1f} GB store, evicted from the page cache; {free:.1f} GB memory available) | "
              f"{statistics.median(colds):,.0f} | {', '.join(f'{x:,.0f}' for x in colds)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", default=["prep", "uss", "delivery"], choices=["prep", "uss", "delivery"])
    ap.add_argument("--jpegs", type=int, default=16000)
    ap.add_argument("--uss-gb", type=float, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="dcgan-bench-store-", dir=args.dir))
    print(f"# data_store: {os.cpu_count()} CPU(s), torch {torch.__version__}, scratch {work}")
    try:
        if "prep" in args.parts:
            bench_prep(work, args.jpegs, args.repeats)
        stores = {}
        if "uss" in args.parts:
            print(f"\n## uss: private memory (MB) of the 2 ranks of a training run, batch 64 a rank, {args.steps} "
                  "steps between the readings")
            print("| store | images | USS at first log | USS after | growth (max over ranks) |\n|---|---|---|---|---|")
            for gb in args.uss_gb:
                stores[gb] = make_store(work, gb)
                first, last, growth = bench_uss(work, stores[gb], args.steps)
                print(f"| {gb:g} GB | {open_store(stores[gb]).count:,} | {first:.0f} | {last:.0f} | {growth:+.0f} "
                      f"(target < 100; an in-memory copy: +{gb * 1024:.0f}) |")
        if "delivery" in args.parts:
            big = stores[max(stores)] if stores else None
            bench_delivery(work, args.repeats, big)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
