#!/usr/bin/env bash
# GPU throughput of the 64x64 seed DCGAN: precision x channels_last x torch.compile x per-GPU batch.
#
#   bash benchmarks/gpu.sh [--dry-run] [--batches "128 512"] [--steps 20] [--repeats 5] [--no-compile]
#
# One GPU, one process. Prints, per configuration: images/s (median and min-max over --repeats timings
# of --steps steps, CUDA-synchronised), MFU against a bf16 matmul measured in the same run (8192^3
# torch.mm, bf16), and peak memory (torch.cuda.max_memory_allocated). Two kinds of row:
#   trainer  the project's `Trainer.train_step`, train.mixed_precision = no | bf16 | fp16 (one Python
#            process per precision: accelerate fixes the precision once per process).
#   plain    the trainer's algorithm in plain PyTorch (same models and init, Adam(2e-4, (0.5, 0.999)),
#            BCE-with-logits, D frozen in the G phase, autocast + GradScaler for fp16) for what the
#            trainer has no option for: channels_last and torch.compile (G and D compiled separately).
# FLOPs per image are counted per layer from the layer shapes, as in benchmarks/compute_efficiency.py:
# 3·F_G - F_G1 + 8·F_D - 2·F_D1 (conv/convT only; F_x1 = first layer, whose input needs no gradient).
#
# --dry-run runs the whole grid on the CPU with tiny sizes (32x32, width 8, batch 8, 2 steps) to check
# the script end to end; its numbers mean nothing. Needs the project installed (`pip install -e .`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}

DRY=0; BATCHES="128 512"; STEPS=20; REPEATS=5; WARMUP=5; COMPILE="0 1"; SIZE=64; WIDTH=64; MM=8192
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --batches) BATCHES="$2"; shift ;;
    --steps) STEPS="$2"; shift ;;
    --repeats) REPEATS="$2"; shift ;;
    --no-compile) COMPILE="0" ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$DRY" = 1 ]; then
  BATCHES="8"; STEPS=2; REPEATS=2; WARMUP=1; SIZE=32; WIDTH=8; MM=256; DEVICE=cpu
else
  DEVICE=cuda
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu.sh: no CUDA device; run with --dry-run to check the script on a CPU" >&2; exit 2; }
fi

PY=$(mktemp --suffix=.py)
RUN_DIR=$(mktemp -d)
trap 'rm -rf "$PY" "$RUN_DIR"' EXIT
cat > "$PY" <<'EOF'
import argparse, contextlib, os, statistics, sys, time

import torch
import torch.nn.functional as F
from torch import nn

from dcgan_dist.models import Discriminator, Generator, init_weights

p = argparse.ArgumentParser()
p.add_argument("part", choices=["env", "trainer", "plain"])
p.add_argument("--device"); p.add_argument("--size", type=int); p.add_argument("--width", type=int)
p.add_argument("--batch", type=int); p.add_argument("--precision", default="no")
p.add_argument("--channels-last", type=int, default=0); p.add_argument("--compile", type=int, default=0)
p.add_argument("--steps", type=int); p.add_argument("--warmup", type=int); p.add_argument("--repeats", type=int)
p.add_argument("--mm", type=int); p.add_argument("--peak", type=float, default=0.0); p.add_argument("--run-dir")
a = p.parse_args()
dev = torch.device(a.device)
cuda = dev.type == "cuda"
DTYPE = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync():
    if cuda:
        torch.cuda.synchronize()


def mm_flops(n, dtype):
    x, y = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        torch.mm(x, y)
    ts = []
    for _ in range(5):
        sync(); t0 = time.perf_counter()
        for _ in range(10):
            torch.mm(x, y)
        sync(); ts.append((time.perf_counter() - t0) / 10)
    return 2 * n**3 / statistics.median(ts)


def counted_flops(G, D):
    rows = []
    def hook(m, inp, out):
        i, o, k2 = inp[0], out, m.kernel_size[0] * m.kernel_size[1]
        hw = i.shape[2] * i.shape[3] if isinstance(m, nn.ConvTranspose2d) else o.shape[2] * o.shape[3]
        rows.append(2 * m.in_channels * m.out_channels * k2 * hw)
    out = []
    for net, x in ((G, torch.randn(1, G.latent_dim)), (D, torch.randn(1, D.channels, D.image_size, D.image_size))):
        rows.clear()
        hs = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        with torch.no_grad():
            net.eval()(x)
        net.train()
        for h in hs:
            h.remove()
        out.append((sum(rows), rows[0]))
    (FG, FG1), (FD, FD1) = out
    return 3 * FG - FG1 + 8 * FD - 2 * FD1


def time_steps(step, real, z):
    for _ in range(a.warmup):
        step(real, z)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    ts = []
    for _ in range(a.repeats):
        sync(); t0 = time.perf_counter()
        for _ in range(a.steps):
            step(real, z)
        sync(); ts.append((time.perf_counter() - t0) / a.steps)
    mem = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else float("nan")
    return ts, mem


def report(kind, flops, ts, mem):
    rates = [a.batch / t for t in ts]
    mfu = statistics.median(rates) * flops / a.peak if a.peak else float("nan")
    mem_s = f"{mem:.2f}" if mem == mem else "n/a"
    print(f"{kind:<8}{a.precision:<6}{'on' if a.channels_last else 'off':<6}{'on' if a.compile else 'off':<8}"
          f"{a.batch:>6}{statistics.median(rates):>12.0f}{f'{min(rates):.0f}-{max(rates):.0f}':>16}"
          f"{mfu:>8.1%}{mem_s:>10}", flush=True)


if a.part == "env":
    name = torch.cuda.get_device_name(dev) if cuda else "CPU (dry run)"
    bf16 = mm_flops(a.mm, torch.bfloat16)
    print(f"device {name}, torch {torch.__version__}, {a.size}x{a.size}, width {a.width}")
    print(f"peak: torch.mm {a.mm}^3 bf16 {bf16 / 1e12:.4g} TFLOP/s; fp16 {mm_flops(a.mm, torch.float16) / 1e12:.4g}; "
          f"fp32 {mm_flops(a.mm, torch.float32) / 1e12:.4g} (TF32 off, the default)")
    print(f"BF16_PEAK={bf16}")
    sys.exit(0)

gen = torch.Generator().manual_seed(1)
real = (torch.rand(a.batch, 1, a.size, a.size, generator=gen) * 2 - 1).to(dev)
z = torch.randn(a.batch, 100, generator=gen).to(dev)

if a.part == "trainer":
    from dcgan_dist.config import load_config
    from dcgan_dist.errors import UserError
    from dcgan_dist.trainer import Trainer
    ov = [f"model.image_size={a.size}", f"train.batch_size={a.batch}", "data.name=synthetic",
          f"data.num_images={a.batch}", "model.channels=1", f"model.g_width={a.width}", f"model.d_width={a.width}",
          f"train.mixed_precision={a.precision}", "loss.real_target=0.9", "loss.g_target=0.9",
          "log.wandb.mode=disabled", "log.progress=false", f"run.dir={a.run_dir}"]
    try:
        trainer = Trainer(load_config(None, ov), overwrite=True)
    except UserError as e:
        print(f"trainer {a.precision:<6}{'off':<6}{'off':<8}{a.batch:>6}   skipped: {e}", flush=True)
        sys.exit(0)
    flops = counted_flops(Generator(width=a.width, image_size=a.size), Discriminator(width=a.width, image_size=a.size))
    ts, mem = time_steps(trainer.train_step, real, z)
    report("trainer", flops, ts, mem)
    trainer._finish()
    sys.exit(0)

# plain: the trainer's algorithm, with the options the trainer lacks
torch.manual_seed(0)
G, D = Generator(width=a.width, image_size=a.size), Discriminator(width=a.width, image_size=a.size)
G.apply(init_weights), D.apply(init_weights)
flops = counted_flops(G, D)
G, D = G.to(dev), D.to(dev)
if a.channels_last:
    G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    real = real.contiguous(memory_format=torch.channels_last)
opt_G = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
opt_D = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
Gc, Dc = (torch.compile(G), torch.compile(D)) if a.compile else (G, D)
dtype = DTYPE[a.precision]
scaler = torch.amp.GradScaler(dev.type, enabled=a.precision == "fp16")


def autocast():
    return torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def bce(logits, target):
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def step(real, z):
    with autocast():
        fake = Gc(z)
        D.requires_grad_(True)
        loss_d = bce(Dc(real), 0.9) + bce(Dc(fake.detach()), 0.0)
    scaler.scale(loss_d).backward()
    scaler.step(opt_D)
    opt_D.zero_grad(set_to_none=True)
    D.requires_grad_(False)  # as the trainer: no D weight gradients in the G phase
    with autocast():
        loss_g = bce(Dc(fake), 0.9)
    scaler.scale(loss_g).backward()
    scaler.step(opt_G)
    scaler.update()
    opt_G.zero_grad(set_to_none=True)


try:
    ts, mem = time_steps(step, real, z)
except Exception as e:  # e.g. fp16 autocast or the compiler unavailable on this build: report, go on
    print(f"plain   {a.precision:<6}{'on' if a.channels_last else 'off':<6}{'on' if a.compile else 'off':<8}"
          f"{a.batch:>6}   failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
    sys.exit(0)
report("plain", flops, ts, mem)
EOF

common=(--device "$DEVICE" --size "$SIZE" --width "$WIDTH" --steps "$STEPS" --warmup "$WARMUP" --repeats "$REPEATS")
echo "== benchmarks/gpu.sh $(date -u +%Y-%m-%dT%H:%MZ)$([ "$DRY" = 1 ] && echo ' DRY RUN (CPU, tiny sizes: numbers mean nothing)')"
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true; fi
env_out=$("$PYTHON" "$PY" env "${common[@]}" --batch 1 --mm "$MM")
echo "$env_out" | grep -v '^BF16_PEAK='
PEAK=$(echo "$env_out" | sed -n 's/^BF16_PEAK=//p')
echo "per-GPU batch; img/s median (min-max) over $REPEATS timings of $STEPS steps after $WARMUP warm-up; MFU vs the bf16 matmul"
printf '%-8s%-6s%-6s%-8s%6s%12s%16s%8s%10s\n' kind prec cl compile batch img/s min-max MFU "mem GiB"
for batch in $BATCHES; do
  for prec in no bf16 fp16; do
    "$PYTHON" "$PY" trainer "${common[@]}" --batch "$batch" --precision "$prec" --peak "$PEAK" --run-dir "$RUN_DIR/t"
  done
  for prec in no bf16 fp16; do
    for cl in 0 1; do
      for comp in $COMPILE; do
        "$PYTHON" "$PY" plain "${common[@]}" --batch "$batch" --precision "$prec" --channels-last "$cl" \
          --compile "$comp" --peak "$PEAK"
      done
    done
  done
done
