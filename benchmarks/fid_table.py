"""DCGAN against the published table: FID under Lucic et al. 2018's protocol, this project's rows beside theirs.

Lucic, Kurach, Michalski, Gelly, Bousquet, "Are GANs Created Equal? A Large-Scale Study" (NeurIPS 2018): the best
FID of each model after a large hyperparameter search, 10,000 samples against the 10,000 test images at 28x28,
TF-Inception pool3 (grey tiled to RGB), batch 64, 20 epochs of 50,000 images = 15,625 steps.

usage: python benchmarks/fid_table.py [--score | --train] [--runs-dir runs/lucic] [--only mnist fashion ...]
                                      [--checkpoint NAME=PATH ...] [--fid-weights PATH] [--json OUT]

Rows are this project's recipes `configs/<name>_lucic.yaml` (`mnist`, `fashion`, and `<name>_cond` where the
recipe exists), trained into `<runs-dir>/<name>` with `--train` when no finished run is there (a killed run
resumes), or scored from `--checkpoint`. `--score` scores the finished runs there and trains none. Each is
scored with `dcgan-eval --protocol lucic` (the EMA generator where it has one; a conditional one asked for
every class equally often): its FID, KID, the training's wall time from its metrics.jsonl, and the CPU. With
none of --score, --train, --checkpoint (as `make bench` runs it) it prints the last table it wrote
(`<runs-dir>/table.json`), or how to make one. Each row's whole report is `<runs-dir>/<name>.eval.json`
(`dcgan-export <run> OUT --eval` puts it in the model card). Results and the commands: docs/QUALITY.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

PUBLISHED = {  # Lucic et al. 2018, Table (best FID per model): (MNIST, Fashion-MNIST)
    "NS GAN": (6.8, 26.5), "MM GAN": (9.8, 29.6), "LSGAN": (7.8, 30.7), "WGAN": (6.7, 21.5),
    "WGAN GP": (20.3, 24.5), "DRAGAN": (7.6, 27.7), "BEGAN": (13.1, 22.9),
}
RECIPES = ("mnist", "fashion", "mnist_cond", "fashion_cond")
COLUMN = {"mnist": 0, "fashion_mnist": 1}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


def finished(run: Path) -> bool:
    from dcgan_dist import checkpoint

    ckpts = checkpoint.complete_checkpoints(run / "checkpoints") if (run / "checkpoints").is_dir() else []
    return bool(ckpts) and checkpoint.read_meta(ckpts[0])["step"] >= checkpoint.read_meta(ckpts[0])["config"][
        "train"]["steps"]


def train(recipe: Path, run: Path) -> None:
    command = [str(Path(sys.executable).with_name("dcgan-train")), "--config", str(recipe), f"run.dir={run}",
               "log.wandb.mode=disabled"]
    print(f"training {recipe} into {run}: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True)


def train_minutes(run: Path) -> float | None:
    """The training steps' wall time from its metrics.jsonl: each interval's perf/step_time x its steps (set-up,
    sample grids and checkpoints left out; a resumed run's repeated steps counted once)."""
    path, seconds, done = run / "metrics.jsonl", {}, 0
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "perf/step_time" in record:
            steps = record["step"] - max((s for s in seconds if s < record["step"]), default=0)
            seconds[record["step"]] = record["perf/step_time"] * steps
            done = max(done, record["step"])
    return sum(seconds.values()) / 60 if seconds else None


def score(path: str, fid_weights: str | None, conditional: bool, report_json: Path) -> dict:
    """dcgan-eval --protocol lucic of a run or checkpoint; a conditional one's requested-class accuracy too. The
    whole report goes to `report_json` (dcgan-eval --json's format: `dcgan-export --eval` puts it in a model card)."""
    from dcgan_dist.quality import assess

    started = time.perf_counter()
    report = assess.plan(path, protocol="lucic", fid=True, fid_weights=fid_weights, use_classifier=conditional).run()
    report.write_json(report_json)
    out = {"fid": report.metrics["inception/fd"], "kid": report.metrics["inception/kid"],
           "protocol": report.protocols["inception"]["note"], "data": report.plan.data, "step": report.plan.step,
           "ema": report.plan.ema, "score_minutes": (time.perf_counter() - started) / 60}
    if "classifier/class_accuracy" in report.metrics:
        out["class_accuracy"] = report.metrics["classifier/class_accuracy"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="train the recipes that have no finished run")
    parser.add_argument("--score", action="store_true", help="score the finished runs (train none)")
    parser.add_argument("--runs-dir", default="runs/lucic")
    parser.add_argument("--only", nargs="*", choices=RECIPES, help="these rows only")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                        help="score this checkpoint as row NAME instead of <runs-dir>/NAME")
    parser.add_argument("--fid-weights", help="TF-Inception weights (default: dcgan-eval fid-weights' file)")
    parser.add_argument("--json", help="where the table is written (default <runs-dir>/table.json)")
    args = parser.parse_args()
    given = dict(c.split("=", 1) for c in args.checkpoint)
    last = Path(args.json or Path(args.runs_dir) / "table.json")
    if not (args.train or args.score or given):
        if last.is_file():
            print_table(json.loads(last.read_text()))
        else:
            print(f"fid_table: no table yet ({last}); --score scores finished runs in {args.runs_dir}, --train "
                  "trains them first (hours on a CPU)")
        return
    rows = {}
    for name in args.only or RECIPES:
        recipe, run = Path(f"configs/{name}_lucic.yaml"), Path(args.runs_dir) / name
        report_json = last.with_name(f"{name}.eval.json")
        if name in given:
            rows[name] = score(given[name], args.fid_weights, name.endswith("_cond"), report_json)
            continue
        if not recipe.is_file():
            continue
        if not finished(run):
            if not args.train:
                print(f"{name}: no finished run in {run} (pass --train to train {recipe})")
                continue
            train(recipe, run)
        rows[name] = score(str(run), args.fid_weights, name.endswith("_cond"), report_json) | {
            "train_minutes": train_minutes(run)}
        print(f"{name}: FID {rows[name]['fid']:.2f} [{rows[name]['protocol']}]", flush=True)
    if not rows:
        print("fid_table: nothing to score")
        return
    table = {"cpu": cpu_name(), "rows": rows, "published": PUBLISHED}
    print_table(table)
    last.parent.mkdir(parents=True, exist_ok=True)
    last.write_text(json.dumps(table, indent=2) + "\n")
    print(f"wrote {last}")


def print_table(table: dict) -> None:
    rows = table["rows"]
    print(f"\nFID, Lucic et al. 2018's protocol; this project on {table['cpu']}\n")
    print("| model | MNIST | Fashion-MNIST | train (min) | step |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        cells = ["", ""]
        cells[COLUMN[row["data"]]] = f"**{row['fid']:.2f}**"
        minutes = row.get("train_minutes")
        label = f"this project: {name}" + (f" (class accuracy {row['class_accuracy']:.3f})"
                                           if "class_accuracy" in row else "")
        print(f"| {label} | {cells[0]} | {cells[1]} | {'-' if minutes is None else f'{minutes:.0f}'} | "
              f"{row['step']} |")
    for model, (mnist, fashion) in table["published"].items():
        print(f"| Lucic et al.: {model} | {mnist} | {fashion} | | |")
    for name, row in rows.items():
        print(f"{name}: [{row['protocol']}], scored in {row['score_minutes']:.1f} min")


if __name__ == "__main__":
    main()
