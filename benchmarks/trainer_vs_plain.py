"""The project's training step (`Trainer.train_step`) against the seed's plain PyTorch loop, images/s.

    python benchmarks/trainer_vs_plain.py [--sizes 32 64] [--batch 64] [--repeats 3] [--iters 1]
                                          [--threads 1] [--profile]

One process, CPU, fp32, `--threads` torch threads for both (default 1: the host is shared).
"trainer" is a real `Trainer` built from `load_config(None, overrides)` (printed below) and timed
through `trainer.train_step(real, z)`. "plain" is the reference recipe's loop (docs/DCGAN.md, "The reference
recipe") written inline with the same `Generator`/`Discriminator` classes and init, Adam(2e-4,
(0.5, 0.999)) and BCE-with-logits (real targets 0.9, fake 0.0, G against 0.9):

    opt_D.zero_grad(); fake = G(z)
    loss_D = bce(D(real), 0.9) + bce(D(fake.detach()), 0.0); loss_D.backward(); opt_D.step()
    opt_G.zero_grad(); loss_G = bce(D(fake), 0.9); loss_G.backward(); opt_G.step()

Both start from the same weights and see the same batch. Each repeat times `--iters` steps of
each, back to back, in alternating order (so drift in the shared machine's speed hits both alike);
the ratio is taken per repeat, and the table shows medians and the spread over repeats. The ratio
is given twice: by wall time and by the process's CPU time (robust to other jobs preempting us).
`--profile` adds a torch.profiler breakdown of one step of each (self CPU time by operator).
"""

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from dcgan_dist.gan.models import Discriminator, Generator, init_weights
from dcgan_dist.recipe import load_config
from dcgan_dist.train.trainer import Trainer


def overrides(size: int, batch: int, run_dir: str) -> list[str]:
    return [f"model.image_size={size}", f"train.batch_size={batch}", "data.name=synthetic",
            f"data.num_images={max(batch, 64)}", "model.channels=1", "loss.real_target=0.9",
            "loss.g_target=0.9", "log.wandb.mode=disabled", "log.progress=false", f"run.dir={run_dir}"]


class PlainLoop:
    """The seed's loop, inline: the reference the trainer is measured against."""

    def __init__(self, size: int):
        torch.manual_seed(0)  # as the trainer: train.seed=0 before building the models
        self.G, self.D = Generator(image_size=size), Discriminator(image_size=size)
        self.G.apply(init_weights), self.D.apply(init_weights)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=2e-4, betas=(0.5, 0.999))

    def step(self, real: torch.Tensor, z: torch.Tensor) -> None:
        G, D = self.G, self.D
        self.opt_D.zero_grad()
        fake = G(z)
        real_logits = D(real)
        loss_real = F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, 0.9))
        fake_logits = D(fake.detach())
        loss_fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        (loss_real + loss_fake).backward()
        self.opt_D.step()
        self.opt_G.zero_grad()
        g_logits = D(fake)
        loss_g = F.binary_cross_entropy_with_logits(g_logits, torch.full_like(g_logits, 0.9))
        loss_g.backward()  # also fills D's weight gradients, which the next opt_D.zero_grad() discards
        self.opt_G.step()


def timed(fn, iters: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per call."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters, (time.process_time() - cpu) / iters


def profile(name: str, fn) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    fn()
    with prof(activities=[ProfilerActivity.CPU]) as p:
        fn()
    calls = [e for e in p.events() if e.name.startswith("aten::")]
    top = sum(e.cpu_parent is None for e in calls)  # on a GPU: roughly the launches the host issues
    print(f"\n--- profile: {name}, one step: {top} top-level aten calls ({len(calls)} with their children), "
          "self CPU time by operator ---")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iters", type=int, default=1, help="steps per timing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (both variants)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as run_dir:
            ov = overrides(size, args.batch, run_dir)
            trainer = Trainer(load_config(None, ov), overwrite=True)
            torch.set_num_threads(args.threads)  # after the Trainer: accelerate must not change it
            plain = PlainLoop(size)
            for a, b in zip(trainer.accelerator.unwrap_model(trainer.G).parameters(), plain.G.parameters()):
                assert torch.equal(a, b), "trainer and plain loop must start from the same weights"
            g = torch.Generator().manual_seed(1)
            real = torch.rand(args.batch, 1, size, size, generator=g) * 2 - 1
            z = torch.randn(args.batch, 100, generator=g)
            variants = {"trainer": lambda t=trainer, x=real, z=z: t.train_step(x, z),
                        "plain": lambda p=plain, x=real, z=z: p.step(x, z)}
            for run in variants.values():  # warm-up: allocator, oneDNN primitives, Adam state
                run()
            times = {name: [] for name in variants}
            cpu = {name: [] for name in variants}
            for r in range(args.repeats):
                order = list(variants) if r % 2 == 0 else list(variants)[::-1]
                for name in order:
                    wall, cpu_s = timed(variants[name], args.iters)
                    times[name].append(wall), cpu[name].append(cpu_s)
            if args.profile:
                for name, run in variants.items():
                    profile(f"{name} {size}x{size}", run)
            trainer.close()
            rows.append((size, ov, times, cpu))

    print(f"\ntorch {torch.__version__}, CPU, fp32, {args.threads} thread(s) each, {os.cpu_count()} cores, "
          f"load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"batch {args.batch}; each timing {args.iters} steps; median (min-max) over {args.repeats} "
          "interleaved repeats")
    print(f"{'size':>5} {'trainer img/s':>22} {'plain img/s':>22} {'trainer/plain':>22} {'same, by CPU time':>22}")
    for size, _, times, cpu in rows:
        cells = []
        for ts in (times["trainer"], times["plain"]):
            rates = [args.batch / t for t in ts]
            cells.append(f"{statistics.median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f})")
        for tt in (times, cpu):
            ratios = [p / t for t, p in zip(tt["trainer"], tt["plain"])]  # speed ratio = time plain / time ours
            cells.append(f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
        print(f"{size:>5} " + " ".join(f"{c:>22}" for c in cells))
    print("CPU time = time.process_time() of this process: with 1 thread it leaves out the time other jobs on the "
          "shared host held the core (cache and memory-bandwidth contention remain)")
    print("target: trainer/plain >= 0.97")
    print("trainer config: load_config(None, [" + ", ".join(repr(o) for o in rows[0][1][:-1]) + ", 'run.dir=<tmp>'])"
          + (" (model.image_size per row)" if len(rows) > 1 else ""))


if __name__ == "__main__":
    main()
