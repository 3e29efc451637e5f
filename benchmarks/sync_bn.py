"""What synchronized BatchNorm costs: forward+backward of a 64x64 DCGAN discriminator, plain BN vs synced.

    python benchmarks/sync_bn.py [--nproc 2] [--batch 32] [--repeats 7] [--iters 3] [--threads 1]

Starts itself on `--nproc` CPU ranks with torch.distributed.run (gloo). Each timing is `--iters`
forward+backward passes between two barriers (so a rank waiting for another is counted, as it is
in training), divided by `--iters`; the table shows the median of `--repeats` such timings. A third
row times the all-reduces that synced BN adds, alone, to separate communication from computation.
Synced BN makes the ranks wait for each other at every BN layer, so on a busy machine it also pays
for the other ranks' hiccups: read the load average printed with the table.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from dcgan_dist.train.sync_bn import convert_sync_batchnorm

WIDTHS = (64, 128, 256, 512)


def discriminator() -> nn.Module:  # [N, 3, 64, 64] -> [N, 1, 1, 1]; BN after every conv but the first
    layers, c_in = [], 3
    for i, c in enumerate(WIDTHS):
        layers += [nn.Conv2d(c_in, c, 4, 2, 1, bias=False)] + ([nn.BatchNorm2d(c)] if i else [])
        layers += [nn.LeakyReLU(0.2)]
        c_in = c
    return nn.Sequential(*layers, nn.Conv2d(c_in, 1, 4, 1, 0, bias=False))


def worker(args):
    dist.init_process_group("gloo")
    torch.set_num_threads(args.threads)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    x = torch.randn(args.batch, 3, 64, 64)
    torch.manual_seed(0)
    plain = discriminator()
    synced = convert_sync_batchnorm(discriminator(), "cpu")
    widths = [m.num_features for m in plain.modules() if isinstance(m, nn.BatchNorm2d)]
    # what DistributedBatchNorm sends per step: per layer C + 1 and C floats forward, C and C + 1 backward
    messages = [torch.zeros(c + extra) for c in widths for extra in (1, 0, 0, 1)]

    def step(model):
        model.zero_grad(set_to_none=True)
        model(x).mean().backward()

    def all_reduces():
        for m in messages:
            dist.all_reduce(m)

    variants = {"plain (per-rank statistics)": lambda: step(plain),
                "synced (DistributedBatchNorm)": lambda: step(synced),
                f"its {len(messages)} all-reduces alone": all_reduces}
    times = {name: [] for name in variants}
    for run in variants.values():  # warm-up: allocator, kernels, gloo connections
        run(), run()
    for _ in range(args.repeats):
        for name, run in variants.items():  # interleaved, so drift in the machine's speed hits all alike
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.iters):
                run()
            dist.barrier()  # a rank waiting for another is counted, as in training
            times[name].append((time.perf_counter() - start) / args.iters)
    if rank == 0:
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        print(f"torch {torch.__version__}, {world} ranks x {args.threads} thread(s) on {os.cpu_count()} "
              f"cores (load average {load}), gloo, CPU, fp32")
        print(f"D 64x64, widths {'-'.join(map(str, WIDTHS))}, BN widths {widths}; batch {args.batch} per "
              f"rank; median (min-max) of {args.repeats} timings of {args.iters} forward+backward")
        print(f"{'':<34}{'ms / step':>10}{'min-max':>16}{'img/s (all ranks)':>19}")
        for name, ts in times.items():
            t = statistics.median(ts)
            rate = f"{world * args.batch / t:>19.0f}" if "alone" not in name else ""
            print(f"{name:<34}{t * 1e3:>10.1f}{f'{min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f}':>16}{rate}")
        plain_t, synced_t = (statistics.median(ts) for ts in list(times.values())[:2])
        print(f"ratio synced / plain: {synced_t / plain_t:.3f}")
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="per rank")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iters", type=int, default=3, help="steps per timing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_port", str(port), __file__, "--worker", *sys.argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    sys.exit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()
