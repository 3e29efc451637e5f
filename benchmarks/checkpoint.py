"""Checkpoint save/load time and size for the seed's 64x64 models, against bare safetensors I/O.

    python benchmarks/checkpoint.py [--repeats 5]

"ours" is the full checkpoint (G, D, both Adam states, RNG, meta.json; fsync, sha256, atomic rename,
`latest`); "bare" writes the same tensors with safetensors.torch.save_file alone (no fsync, no hash)
and reads them with load_file. Ratio = ours / bare, measured in the same run.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dcgan_dist import checkpoint
from dcgan_dist.gan.models import Discriminator, Generator


def state() -> dict:
    torch.manual_seed(0)
    G, D = Generator(), Discriminator()
    out = {"generator": G.state_dict(), "discriminator": D.state_dict()}
    metas = {}
    for name, net in (("G", G), ("D", D)):
        opt = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.5, 0.999))
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        out[f"optimizer_{name}"], metas[f"optimizer_{name}"] = checkpoint.flatten_optimizer(opt.state_dict())
    out["rng"] = {k: v.unsqueeze(0) for k, v in checkpoint.rng_state(torch.Generator()).items()}
    return out, metas


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tensors, metas = state()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        step = iter(range(1, 10**6))

        def ours_save():
            checkpoint.save_checkpoint(root / "ours", next(step), tensors, {"world_size": 1, **metas})

        def ours_load():
            ckpt = checkpoint.latest_checkpoint(root / "ours")
            checkpoint.read_meta(ckpt)  # verifies every sha256
            for stem in tensors:
                checkpoint.load_tensors(ckpt, stem)

        def bare_save():
            (root / "bare").mkdir(exist_ok=True)
            for stem, t in tensors.items():
                save_file({k: v.contiguous() for k, v in t.items()}, root / "bare" / f"{stem}.safetensors")

        def bare_load():
            for stem in tensors:
                load_file(root / "bare" / f"{stem}.safetensors")

        rows = [("save", timed(ours_save, args.repeats), timed(bare_save, args.repeats)),
                ("load", timed(ours_load, args.repeats), timed(bare_load, args.repeats))]
        ckpt = checkpoint.latest_checkpoint(root / "ours")
        sizes = {p.name: p.stat().st_size for p in sorted(ckpt.iterdir())}
    print(f"torch {torch.__version__}; seed DCGAN 64x64 (G {sum(v.numel() for v in tensors['generator'].values()):,} "
          f"+ D {sum(v.numel() for v in tensors['discriminator'].values()):,} values), {args.repeats} repeats, "
          f"median (min-max) seconds")
    print(f"{'':6}{'ours':>24}{'bare safetensors':>26}{'ratio':>8}")
    for name, ours, bare in rows:
        print(f"{name:6}{ours[0]:>10.4f} ({ours[1]:.4f}-{ours[2]:.4f}){bare[0]:>12.4f} ({bare[1]:.4f}-{bare[2]:.4f})"
              f"{ours[0] / bare[0]:>8.2f}")
    print("files: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sizes.items()))
    print(f"total {sum(sizes.values()) / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
