"""FID feature extraction on the CPU: `fid.fid_features` against pytorch-fid's own pipeline, same images, same run.

usage: python benchmarks/fid_speed.py [--num 100] [--batch 50] [--repeats 3] [--threads N] [--fid-weights PATH]
                                      [--random-weights]

pytorch-fid's side is what `python -m pytorch_fid` runs for one folder: its `InceptionV3([3])` (loading the same
weights from a temporary torch hub cache, as the .pth it expects there) and `calculate_activation_statistics`
over PNG files (decode, ToTensor, its resize, the eager network, mean and covariance), `num_workers=0`. This
project's side: the same digits as one uint8 tensor through `fid_features` and the same statistics
(`metrics.stats`). Both are called once before the timing (pytorch-fid's `get_activations`, whose features are
compared; ours builds its traced, frozen, fused form then, timed apart as the one-off cost). Repeats alternate
the two; the table gives the median images/s of each, the ratio (of the medians, and per repeat), the minutes a
10,000-image set takes, and the largest feature difference relative to the largest feature. Weights:
`--fid-weights`, else `dcgan-eval fid-weights`' file in the torch hub cache, else (or with `--random-weights`)
a seeded random network as tests/test_fid.py builds it: the speed is the same.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def random_weights() -> dict[str, torch.Tensor]:
    """tests/test_fid.py's `torch_home` network: Kaiming-normal convolutions, BatchNorm at its identity."""
    from dcgan_dist.quality import fid

    torch.manual_seed(0)
    net = fid.fid_inception()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.01)
            torch.nn.init.zeros_(m.bias)
    return net.state_dict()


def cpu_line() -> str:
    """lscpu's model name and the vector/matrix flags that matter to oneDNN's fp32 (and bf16) kernels."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    lines = info.splitlines()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{name} x {os.cpu_count()} ({', '.join(shown) or 'no AVX-512'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=100, help="images (MNIST-5k digits at 28x28)")
    parser.add_argument("--batch", type=int, default=50, help="batch size of both (pytorch-fid's default is 50)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--fid-weights", help="TF-Inception weights (default: the torch hub cache's)")
    parser.add_argument("--random-weights", action="store_true", help="a seeded random network instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from dcgan_dist.data.sources import load_images
    from dcgan_dist.errors import UserError
    from dcgan_dist.quality import fid
    from dcgan_dist.quality import metrics as M

    weights = "random (seeded, Kaiming)"
    if not args.random_weights:
        try:
            path = fid.find_weights(args.fid_weights, download=False)
            state, weights = fid.load_weights(path), str(path)
        except UserError as e:
            if args.fid_weights:
                sys.exit(str(e))
            print(f"fid_speed: no TF-Inception weights ({str(e)[:80]}...); timing a random network")
    if weights.startswith("random"):
        state = random_weights()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "torch"
        (home / "hub" / "checkpoints").mkdir(parents=True)
        torch.save(state, home / "hub" / "checkpoints" / fid.FID_WEIGHTS_FILE)  # where pytorch-fid looks
        os.environ["TORCH_HOME"] = str(home)
        from pytorch_fid import fid_score
        from pytorch_fid.fid_score import calculate_activation_statistics, get_activations
        from pytorch_fid.inception import InceptionV3

        fid_score.tqdm = lambda batches: batches  # its progress bar off (the stderr lines, not the time)

        theirs_net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
        ours_net, _ = fid.build_fid_inception(home / "hub" / "checkpoints" / fid.FID_WEIGHTS_FILE, device="cpu")
        images = load_images("mnist5k", "", 28, 1, num_images=args.num)
        files = []
        for i, image in enumerate(images[:, 0].numpy()):
            files.append(Path(tmp) / f"{i:05d}.png")
            Image.fromarray(image).save(files[-1])

        theirs_feats = get_activations(files, theirs_net, args.batch, 2048, "cpu", num_workers=0)
        start = time.perf_counter()
        ours_feats = fid.fid_features(ours_net, images, args.batch).double().numpy()  # builds the fast form
        first_call = time.perf_counter() - start
        diff = float(np.abs(ours_feats - theirs_feats).max() / np.abs(theirs_feats).max())

        def theirs() -> None:
            calculate_activation_statistics(files, theirs_net, args.batch, 2048, "cpu", num_workers=0)

        def ours() -> None:
            M.stats(fid.fid_features(ours_net, images, args.batch))

        rates = {"pytorch-fid calculate_activation_statistics": [], "dcgan_dist fid_features + stats": []}
        for _ in range(args.repeats):
            for name, fn in zip(rates, (theirs, ours)):
                start = time.perf_counter()
                fn()
                rates[name].append(args.num / (time.perf_counter() - start))
    print(f"\nFID features of {args.num} 28x28 digits as PNGs, batch {args.batch}, {args.threads} thread(s), fp32, "
          f"{args.repeats} repeats alternating; {cpu_line()}; load average {load_start:.2f} -> "
          f"{os.getloadavg()[0]:.2f}; torch {torch.__version__}; weights: {weights}\n")
    print("| pipeline | images/s (median) | all repeats | 10,000 images |")
    print("|---|---:|---|---:|")
    medians = {}
    for name, values in rates.items():
        medians[name] = statistics.median(values)
        print(f"| {name} | {medians[name]:.2f} | {', '.join(f'{v:.2f}' for v in values)} | "
              f"{10000 / medians[name] / 60:.1f} min |")
    base, fast = rates.values()
    paired = ", ".join(f"{b / a:.2f}" for a, b in zip(base, fast))
    print(f"\nratio: {statistics.median(fast) / statistics.median(base):.2f}x pytorch-fid's images/s (per repeat: "
          f"{paired}); largest feature difference {diff:.1e} of the largest feature; ours' first call (trace, "
          f"freeze, the fusion's profiling runs) {first_call:.1f} s")
    if diff > 1e-4:
        sys.exit(f"features differ by {diff:.1e} > 1e-4")


if __name__ == "__main__":
    main()
