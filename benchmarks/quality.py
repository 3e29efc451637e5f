"""Sample quality along training: every checkpoint of the given runs, EMA and raw generator, one table.

usage: python benchmarks/quality.py [RUN_DIR ...] [--num 5000] [--cache-dir DIR] [--json OUT]
With no run directory it scores runs/demo (after `make demo`), or says there is nothing to score.
The classifier is the cached one for the run's dataset (trained on first use, as `dcgan-eval` does).
Results and the commands behind docs/QUALITY.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dcgan_dist import checkpoint
from dcgan_dist.gan.models import Generator
from dcgan_dist.quality import evaluation

COLUMNS = ("fd", "fd_floor", "kid", "precision", "recall", "inception_score", "coverage", "confidence", "class_kl",
           "class_share_min", "class_share_max")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="run directories (default: runs/demo)")
    parser.add_argument("--num", type=int, default=5000)
    parser.add_argument("--cache-dir", default="")
    parser.add_argument("--json", help="write all rows here")
    args = parser.parse_args()
    runs = [Path(r) for r in args.runs] or [Path("runs/demo")]
    runs = [r for r in runs if (r / "checkpoints").is_dir()]
    if not runs:
        print("quality: no run to score (run `make demo` first, or pass run directories)")
        return
    rows, spaces_for = [], {}
    heads = ("fd", "floor", "fd/floor", "kid", "precision", "recall", "IS", "coverage", "confidence", "class_kl",
             "min share", "max share")
    print(f"{'run':<24}{'step':>6} {'G':<4}" + "".join(f"{c:>11}" for c in heads))
    for run in runs:
        for ckpt in checkpoint.complete_checkpoints(run / "checkpoints")[::-1]:  # oldest first
            meta = checkpoint.read_meta(ckpt)
            data = meta["config"]["data"]
            key = (data["name"], data["root"])
            if key not in spaces_for:
                spaces_for[key], notes = evaluation.feature_spaces(data["name"], data["root"], args.cache_dir,
                                                                   fid=False)
                if not spaces_for[key]:
                    print(f"{run}: skipped, {notes[0]}")
            if not spaces_for[key]:
                continue
            for stem in ("generator_ema", "generator"):
                if not (ckpt / f"{stem}.safetensors").is_file():
                    continue
                g = Generator(**meta["generator"])
                g.load_state_dict(checkpoint.load_tensors(ckpt, stem))
                m = evaluation.evaluate(g, args.num, spaces_for[key])
                m = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("classifier/")}
                gen = "ema" if stem.endswith("ema") else "raw"
                row = {"run": str(run), "step": meta["step"], "generator": gen, **m}
                rows.append(row)
                values = [m["fd"], m["fd_floor"], m["fd"] / m["fd_floor"], *(m[c] for c in COLUMNS[2:])]
                print(f"{run.name[:23]:<24}{row['step']:>6} {row['generator']:<4}" +
                      "".join(f"{v:>11.3f}" for v in values), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    sys.exit(main())
