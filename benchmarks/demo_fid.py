"""The demos (and variants of them) in FID: N samples against N MNIST test digits, beside the real floor.

usage: python benchmarks/demo_fid.py [--train] [--runs-dir runs/demo_fid] [--num 2000] [--threads N]
                                     [NAME=CONFIG[,key=value...] ...]

With --train each variant is trained from CONFIG with the overrides into `<runs-dir>/<NAME>` (unless a finished
run is there; `train.max_minutes=0`, so every variant trains all its steps whatever the CPU), then scored:

- FID (TF-Inception pool3, pytorch-fid's computation, `dcgan-eval --ref`'s "pair" protocol): the EMA generator's
  first NUM images of seed 0 (a conditional one asked for every class equally often), brought back to 28x28 as
  the model's data.fit made them, against NUM MNIST test digits (a seeded draw of the 10,000, the same for every
  variant). The **floor**: NUM MNIST training digits (a seeded draw of the 60,000) against the same test digits,
  what a generator that reproduces the data would score at this count.
- `class acc.`: a conditional model's requested-class accuracy (the project's MNIST classifier, as
  `dcgan-eval` trains it).
- `spread`: within-class variety, the mean over classes of trace(cov) of the samples' Inception features of a
  class over that of the test digits of the class (1.0: as varied as real digits; a conditional model's classes
  are the ones asked, an unconditional model's the classifier's). A diagnostic beside FID, not a score.

With no variants the two demos are trained and scored: `demo=configs/mnist5k.yaml
demo_cond=configs/mnist5k_cond.yaml`. Without --train (as `make bench` runs it) it prints the table of every
variant scored in `<runs-dir>` (`<NAME>.fid.json`) and trains nothing.
Needs full MNIST (`make datasets`) and the TF-Inception weights (`make fid-weights`). Results: docs/QUALITY.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

DEMOS = ["demo=configs/mnist5k.yaml", "demo_cond=configs/mnist5k_cond.yaml"]
SIZE = 28  # MNIST's own size: what is compared


def real_features(runs: Path, num: int) -> dict[str, torch.Tensor]:
    """TF-Inception features of NUM seeded test digits and NUM seeded training digits, and the test digits'
    labels; computed once, cached in `<runs>/real-<num>.pt`."""
    from dcgan_dist.data.sources import load_dataset
    from dcgan_dist.fileio import exclusive
    from dcgan_dist.quality.fid import build_fid_inception, fid_features

    larger = sorted((p for p in runs.glob("real-*.pt") if int(p.stem[5:]) >= num), key=lambda p: int(p.stem[5:]))
    if larger:  # the first `num` of a larger seeded draw are a seeded draw of `num`
        return {k: v[:num] for k, v in torch.load(larger[0], weights_only=True).items()}
    path = runs / f"real-{num}.pt"
    with exclusive(path.with_name(f".{path.name}.lock"), f"computing {path}", 120):  # once, when two run
        if not path.is_file():
            net, out = build_fid_inception()[0], {}
            for split, seed in (("test", 0), ("train", 1)):
                images, labels = load_dataset("mnist", "data", SIZE, 1, split=split)
                pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:num]
                print(f"real {split} digits: Inception features of {num} (once; {path})", flush=True)
                out[split], out[f"{split}_labels"] = fid_features(net, images[pick]), labels[pick]
            torch.save(out, f"{path}.{os.getpid()}")
            os.replace(f"{path}.{os.getpid()}", path)
    return torch.load(path, weights_only=True)


def fid(a: torch.Tensor, b: torch.Tensor) -> float:
    from dcgan_dist.quality import metrics as M

    return M.frechet_from_stats(*M.stats(a), *M.stats(b))


def spread(feats: torch.Tensor, labels: torch.Tensor, real: torch.Tensor, real_labels: torch.Tensor) -> float:
    """Mean over classes of trace(cov(feats of class c)) / trace(cov(real of class c))."""
    ratios = []
    for c in real_labels.unique():
        mine, theirs = feats[labels == c].double(), real[real_labels == c].double()
        if len(mine) > 1 and len(theirs) > 1:
            ratios.append((mine.var(0).sum() / theirs.var(0).sum()).item())
    return sum(ratios) / len(ratios)


def train(name: str, spec: str, runs: Path) -> Path:
    from dcgan_dist import checkpoint

    config, *overrides = spec.split(",")
    run = runs / name
    ckpts = checkpoint.complete_checkpoints(run / "checkpoints") if (run / "checkpoints").is_dir() else []
    if ckpts and checkpoint.read_meta(ckpts[0])["step"] >= checkpoint.read_meta(ckpts[0])["config"]["train"]["steps"]:
        return run
    command = [str(Path(sys.executable).with_name("dcgan-train")), "--config", config, f"run.dir={run}",
               "train.max_minutes=0", "log.wandb.mode=disabled", "log.progress=false", *overrides]
    print(f"{name}: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True)
    return run


def score(name: str, spec: str, run: Path, real: dict, num: int) -> dict:
    from dcgan_dist.data.builtin import fit_back
    from dcgan_dist.gan.sampling import draw
    from dcgan_dist.hub import load_generator
    from dcgan_dist.quality.evaluation import feature_spaces
    from dcgan_dist.quality.features import to_uint8
    from dcgan_dist.quality.fid import build_fid_inception, fid_features

    started = time.perf_counter()
    generator, meta, ema = load_generator(str(run))
    images, labels = draw(generator, num, seed=0)
    images = to_uint8(images)  # [-1, 1] -> uint8, quantised like the real digits (as dcgan-eval does)
    feats = fid_features(build_fid_inception()[0], fit_back(images, SIZE, meta["config"]["data"].get("fit",
                                                                                                       "resize")))
    (classifier,), _ = feature_spaces("mnist", image_size=generator.image_size, channels=1, fid=False)
    predicted = classifier.extract(images)[1].argmax(1)
    row = {"spec": spec, "step": meta["step"], "ema": ema, "num": num,
           "fid": fid(feats, real["test"]), "floor": fid(real["train"], real["test"]),
           "spread": spread(feats, predicted if labels is None else labels, real["test"], real["test_labels"]),
           "train_minutes": train_minutes(run), "score_minutes": (time.perf_counter() - started) / 60,
           "protocol": f"pair: {num} samples ({SIZE}x{SIZE}) vs {num} MNIST test digits (seeded draw), "
                       "pt_inception-2015-12-05 pool3; floor: {num} MNIST training digits vs the same".replace(
                           "{num}", str(num))}
    if labels is not None:
        row["class_accuracy"] = (predicted == labels).double().mean().item()
    (run.parent / f"{name}.fid.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


def train_minutes(run: Path) -> float | None:
    """The training steps' wall time (`plot.run_training_minutes`: set-up, evaluations, grids, checkpoints left out)."""
    from dcgan_dist.plot import run_training_minutes

    return run_training_minutes(run)


def print_table(runs: Path) -> None:
    rows = {p.name[:-len(".fid.json")]: json.loads(p.read_text()) for p in sorted(runs.glob("*.fid.json"))}
    if not rows:
        print(f"demo_fid: nothing scored in {runs} yet")
        return
    print("| variant | step | FID | floor | FID / floor | spread | class acc. | train (min) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        acc = f"{r['class_accuracy']:.3f}" if "class_accuracy" in r else "-"
        minutes = f"{r['train_minutes']:.0f}" if r.get("train_minutes") else "-"
        print(f"| {name} | {r['step']} | {r['fid']:.2f} | {r['floor']:.2f} | {r['fid'] / r['floor']:.2f} | "
              f"{r['spread']:.3f} | {acc} | {minutes} |")
    for name, r in rows.items():
        print(f"{name}: {r['spec']}")
    print(f"[{next(iter(rows.values()))['protocol']}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", metavar="NAME=CONFIG[,key=value...]")
    parser.add_argument("--runs-dir", default="runs/demo_fid")
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--threads", type=int, help="torch threads of the trainings and the scoring "
                        "(default: torch's; 1 to run two of these side by side on 2 cores)")
    parser.add_argument("--train", action="store_true", help="train and score the variants (else: print the table "
                        "of those scored)")
    args = parser.parse_args()
    runs = Path(args.runs_dir)
    if not args.train:
        return print_table(runs)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    for variant in args.variants or DEMOS:
        name, spec = variant.split("=", 1)
        run = train(name, spec, runs)
        row = score(name, spec, run, real_features(runs, args.num), args.num)
        print(f"{name}: FID {row['fid']:.2f} (floor {row['floor']:.2f}), spread {row['spread']:.3f}", flush=True)
    print_table(runs)


if __name__ == "__main__":
    main()
