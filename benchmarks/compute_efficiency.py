"""Model FLOP utilisation of `Trainer.train_step` on CPU: achieved conv FLOP/s against measured fp32 matmul FLOP/s.

    python benchmarks/compute_efficiency.py [--size 64] [--batch 64] [--repeats 3] [--threads 1]
                                            [--mm 1024 2048] [--no-breakdown] [--no-channels-last] [--bf16] [--compile]

FLOPs are counted analytically per layer from the layer shapes (printed), per image, one multiply-add = 2:
  Conv2d           forward 2·Cin·Cout·k²·Hout·Wout
  ConvTranspose2d  forward 2·Cin·Cout·k²·Hin·Win (each input pixel scatters a k x k patch to Cout channels)
  backward         weight gradient = 1x forward, input gradient = 1x forward (so ≈ 2x forward), only where
                   needed.
What one train_step computes, with F_G, F_D the forward FLOPs of G and D and F_G1, F_D1 those of their
first layers (whose inputs z and real images need no gradient):
  G(z)                                   F_G
  D(real):        forward + backward     F_D + F_D (weights) + F_D - F_D1 (inputs)
  D(fake.detach): forward + backward     F_D + F_D + F_D - F_D1
  G phase D(fake): forward + input grads F_D + F_D   (D frozen: no weight gradients)
  G backward:                            F_G (weights) + F_G - F_G1 (inputs)
  total  = 3·F_G - F_G1 + 8·F_D - 2·F_D1  ("counted" below). The customary 3x-forward estimate,
  3·F_G + 9·F_D, is printed too. Not counted: BatchNorm, activations, losses, Adam, gradient norms
  (element-wise, memory-bound; their time share is in the breakdown).
Peak: the median FLOP/s of `torch.mm` of square fp32 matrices (2·n³ FLOPs) at the same thread count,
timed interleaved with the training steps in the same run; the best size is taken as the peak.
A second row runs the same Trainer with `train.channels_last=true` (G, D and the batch in NHWC), paired
step by step with the first. With --bf16, a third, `train.mixed_precision=bf16` + channels_last, is measured
against the bf16 `torch.mm` peak (autocast on the CPU; AMX/AVX512-BF16 where the CPU has them), also paired.
It is opt-in because on this host interleaving AMX work lowered the fp32 rows' clocks: with it, fp32 `torch.mm`
measured 110-114 GFLOP/s and the fp32 step 28.6 img/s; without it, 120-127 and 34.5 (docs/PERFORMANCE.md).
With --compile, a `train.compile=true` variant (fp32; inductor's C++ backend, compiled in the warm-up step).
"""

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict

import torch
from accelerate.state import AcceleratorState
from torch import nn

from dcgan_dist.recipe import load_config
from dcgan_dist.train.trainer import Trainer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def layer_flops(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str, float]]:
    """(name, shape text, forward FLOPs per image) for every conv / transposed conv, from one forward."""
    rows = []

    def hook(name):
        def fn(m, inputs, out):
            i, o = inputs[0], out
            k2 = m.kernel_size[0] * m.kernel_size[1]
            if isinstance(m, nn.ConvTranspose2d):
                f = 2 * m.in_channels * m.out_channels * k2 * i.shape[2] * i.shape[3]
            else:
                f = 2 * m.in_channels * m.out_channels * k2 * o.shape[2] * o.shape[3]
            rows.append((name, f"{type(m).__name__}({m.in_channels}->{m.out_channels}, k{m.kernel_size[0]}) "
                               f"{i.shape[2]}x{i.shape[3]} -> {o.shape[2]}x{o.shape[3]}", float(f)))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    with torch.no_grad():
        model.eval()(x)
    model.train()
    for h in handles:
        h.remove()
    return rows


def category(op: str) -> str:
    if "conv" in op:
        return "convolutions (fwd+bwd)"
    if "batch_norm" in op:
        return "BatchNorm (fwd+bwd)"
    if any(s in op for s in ("adam", "addcdiv", "addcmul", "lerp", "sqrt", "_foreach")):
        return "Adam + grad norms"
    if any(s in op for s in ("leaky", "relu", "tanh", "threshold")):
        return "activations"
    return "other (copies, losses, autograd)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mm", type=int, nargs="+", default=[1024, 2048], help="square matmul sizes")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the profiled step")
    parser.add_argument("--no-channels-last", action="store_true", help="skip the channels_last variant")
    parser.add_argument("--bf16", action="store_true", help="add a bf16 + channels_last variant (slows fp32 rows)")
    parser.add_argument("--compile", action="store_true", help="add a train.compile=true variant (needs gcc)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as run_dir:
        ov = [f"model.image_size={args.size}", f"train.batch_size={args.batch}", "data.name=synthetic",
              f"data.num_images={max(args.batch, 64)}", "model.channels=1", "loss.real_target=0.9",
              "loss.g_target=0.9", "log.wandb.mode=disabled", "log.progress=false", f"run.dir={run_dir}"]
        trainer = Trainer(load_config(None, ov), overwrite=True)
        torch.set_num_threads(args.threads)
        G, D = (trainer.accelerator.unwrap_model(m) for m in (trainer.G, trainer.D))
        g_rows = layer_flops(G, torch.randn(1, 100))
        d_rows = layer_flops(D, torch.randn(1, 1, args.size, args.size))
        F_G, F_D = sum(r[2] for r in g_rows), sum(r[2] for r in d_rows)
        counted = 3 * F_G - g_rows[0][2] + 8 * F_D - 2 * d_rows[0][2]
        customary = 3 * F_G + 9 * F_D

        gen = torch.Generator().manual_seed(1)
        real = torch.rand(args.batch, 1, args.size, args.size, generator=gen) * 2 - 1
        z = torch.randn(args.batch, 100, generator=gen)
        dtypes = ("fp32", "bf16") if args.bf16 else ("fp32",)
        mats = {(n, dt): tuple(torch.randn(n, n, generator=gen).to(DTYPES[dt]) for _ in range(2))
                for n in args.mm for dt in dtypes}

        def mm_rate(key) -> float:
            a, b = mats[key]
            reps = max(1, int(2e9 // (2 * key[0]**3)))  # about 2 GFLOP per timing
            start = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            return reps * 2 * key[0]**3 / (time.perf_counter() - start)

        def variant(*extra):  # the step of a Trainer built with these overrides, on the batch in its layout
            AcceleratorState._reset_state()  # a process-wide singleton that fixes the precision; the trainers
            t = Trainer(load_config(None, ov + list(extra)), overwrite=True)  # built before keep theirs
            torch.set_num_threads(args.threads)
            x = real.contiguous(memory_format=torch.channels_last) if t.channels_last else real
            return lambda: t.train_step(x, z)

        variants = {"trainer": (lambda: trainer.train_step(real, z), "fp32")}
        if not args.no_channels_last:
            variants["trainer, train.channels_last"] = (variant("train.channels_last=true"), "fp32")
        if args.compile:
            variants["trainer, train.compile"] = (variant("train.compile=true"), "fp32")
        if args.bf16:
            variants["trainer, bf16 + channels_last"] = (
                variant("train.channels_last=true", "train.mixed_precision=bf16"), "bf16")
        for run, _ in variants.values():
            run(), run()  # warm-up (Adam state, oneDNN primitives, compilation)
        for key in mats:
            mm_rate(key)
        steps, mm = defaultdict(list), defaultdict(list)
        for r in range(args.repeats):
            for key in mats:
                mm[key].append(mm_rate(key))
            for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                t0 = time.perf_counter()
                variants[name][0]()
                steps[name].append(time.perf_counter() - t0)

        breakdown = {}
        if not args.no_breakdown:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
                trainer.train_step(real, z)
            total = defaultdict(float)
            for e in p.key_averages():
                total[category(e.key)] += e.self_cpu_time_total
            s = sum(total.values())
            breakdown = {k: v / s for k, v in sorted(total.items(), key=lambda kv: -kv[1])}
            convs = sorted((e for e in p.key_averages(group_by_input_shape=True) if "conv" in e.key),
                           key=lambda e: -e.self_cpu_time_total)[:10]  # the slowest convolution calls, by shapes
        trainer.close()

    peak_n = {dt: max(args.mm, key=lambda n: statistics.median(mm[n, dt])) for dt in dtypes}
    peak = {dt: statistics.median(mm[peak_n[dt], dt]) for dt in dtypes}

    print(f"\ntorch {torch.__version__}, CPU, {args.threads} thread(s), {os.cpu_count()} cores, "
          f"load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"DCGAN {args.size}x{args.size} (1 channel), batch {args.batch}; median (min-max) over {args.repeats} "
          "interleaved repeats")
    print(f"\n{'layer':<10}{'shape':<42}{'fwd MFLOP/img':>14}")
    for tag, rows in (("G", g_rows), ("D", d_rows)):
        for name, shape, f in rows:
            print(f"{tag + '.' + name:<10}{shape:<42}{f / 1e6:>14.2f}")
    print(f"F_G = {F_G / 1e6:.1f} MFLOP, F_D = {F_D / 1e6:.1f} MFLOP per image (forward)")
    print(f"train_step per image: counted {counted / 1e6:.1f} MFLOP "
          f"(3·F_G - F_G1 + 8·F_D - 2·F_D1); customary 3·F_G + 9·F_D = {customary / 1e6:.1f} MFLOP")

    def cell(xs, scale=1.0, fmt="{:.1f}"):
        med, lo, hi = (fmt.format(f(xs) * scale) for f in (statistics.median, min, max))
        return f"{med} ({lo}-{hi})"

    print(f"\n{'':<40}{'median (min-max)':>30}")
    for n, dt in mats:
        print(f"{f'torch.mm {n}x{n} {dt}, GFLOP/s':<40}{cell(mm[n, dt], 1e-9):>30}")
    base = None
    for name, ts in steps.items():
        dt = variants[name][1]
        rates = [args.batch / t for t in ts]
        achieved = [r * counted for r in rates]
        mfu = [a / p for a, p in zip(achieved, mm[peak_n[dt], dt])]  # paired: each step with the matmul just before
        print(f"{name}:")
        print(f"{'  img/s':<40}{cell(rates):>30}")
        print(f"{'  GFLOP/s (counted)':<40}{cell(achieved, 1e-9):>30}")
        print(f"{f'  MFU vs {dt} torch.mm {peak_n[dt]}':<40}{cell(mfu, 100, '{:.1f}%'):>30}")
        print(f"{'  MFU, customary 3x-forward count':<40}{statistics.median(rates) * customary / peak[dt]:>30.1%}")
        if base is None:
            base = ts
        else:
            speed = [b / t for b, t in zip(base, ts)]
            print(f"{'  speed vs trainer (paired)':<40}{cell(speed, 1, '{:.3f}'):>30}")
    if breakdown:
        print("\nself CPU time of one profiled train_step (the profiler slows it), by operator kind:")
        for k, v in breakdown.items():
            print(f"  {k:<36}{v:>7.1%}")
        print("the 10 costliest convolution ops by input shapes (input, weight; ms over the step's calls):")
        for e in convs:
            shapes = ", ".join(str(x) for x in e.input_shapes[:2] if x)
            print(f"  {e.key:<28}{e.count:>3}x  {e.self_cpu_time_total / 1e3:>8.1f} ms  {shapes}")
    print("target: MFU >= 70% at 64x64, batch 64 (fp32 rows against the fp32 peak, bf16 against the bf16 one)")
    print("trainer config: load_config(None, [" + ", ".join(repr(o) for o in ov[:-1]) + ", 'run.dir=<tmp>'])")


if __name__ == "__main__":
    main()
