"""DCGAN against the published table: FID under Lucic et al. 2018's protocol, over seeds, beside their rows.

Lucic, Kurach, Michalski, Gelly, Bousquet, "Are GANs Created Equal? A Large-Scale Study" (NeurIPS 2018): the best
FID of each model after a large hyperparameter search, 10,000 samples against the 10,000 test images at 28x28,
TF-Inception pool3 (grey tiled to RGB), batch 64, 20 epochs of 50,000 images = 15,625 steps. Their own finding is
that random restarts move a GAN's FID about as much as the choice of model: a row is several seeds, not one.

usage: python benchmarks/fid_table.py [--train | --score] [--only mnist fashion ...] [--seeds 0 1 2]
                                      [--jobs 2] [--runs-dir runs/lucic] [--fid-weights PATH] [--json OUT]
                                      [--export models]

Rows are this project's recipes `configs/<name>_lucic.yaml` (`mnist`, `fashion`, `mnist_cond`, `fashion_cond`),
each trained once per seed (`train.seed`) into `<runs-dir>/<name>-seed<S>` with `--train` when no finished run is
there (a killed run resumes where its last checkpoint left it), then scored by `dcgan-eval RUN --protocol lucic
--json <runs-dir>/<name>-seed<S>.eval.json` (the EMA generator; a conditional one asked for every class equally
often, with the requested-class accuracy of the project's classifier beside it); a run already scored is not
scored again. `--score` scores the finished runs and trains none. `--jobs J` runs J trainings (and scorings) side
by side, each on cpu_count / J threads. The recipes log FID while training (train.eval_every, lucic protocol at
train.eval_num samples): `dcgan-plot` draws it against steps and training minutes.

`--export DIR` writes each row's seed-0 generator as the Hub folder `DIR/<name>-lucic` (`dcgan-export RUN
DIR/<name>-lucic --eval <its report>`: the card carries its FID/KID under the protocol), unless it is there.

The table gives per row the seeds' mean ± sample standard deviation, the range and each seed's FID, the
training minutes (the steps' own time from metrics.jsonl) and the CPU, then the published rows, and says plainly
whether the mean beats the best published figure. With neither --train nor --score (as `make bench` runs it)
it prints the last table it wrote (`<runs-dir>/table.json`), or how to make one. Results: docs/QUALITY.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
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
    if not ckpts:
        return False
    meta = checkpoint.read_meta(ckpts[0])
    return meta["step"] >= meta["config"]["train"]["steps"]


def train_minutes(run: Path) -> float | None:
    """The training steps' wall time (`plot.run_training_minutes`: set-up, evaluations, grids, checkpoints left out)."""
    from dcgan_dist.plot import run_training_minutes

    return run_training_minutes(run)


LICENCES = {"mnist": "cc-by-sa-3.0", "fashion_mnist": "mit"}  # the training data's terms, in the card
_PRINT = threading.Lock()  # one line at a time from the side-by-side jobs


def say(line: str) -> None:
    with _PRINT:
        print(line, flush=True)


def export(run: Path, report: Path, out: Path) -> None:
    """The seed-0 generator of a row as a Hub folder `out` with its report's figures in the card."""
    data = json.loads(report.read_text())["data"]
    command = [str(Path(sys.executable).parent / "dcgan-export"), str(run), str(out), "--eval", str(report),
               "--license", LICENCES.get(data, "other")]
    say(f"{run.name}: exporting: {' '.join(command)}")
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def one(name: str, seed: int, args, threads: int) -> dict | None:
    """Train (if asked and not finished) and score (if not scored) `name` at `seed`: its row, or None."""
    run, bin_dir = Path(args.runs_dir) / f"{name}-seed{seed}", Path(sys.executable).parent
    report = run.with_name(f"{run.name}.eval.json")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if not finished(run):
        if not args.train:
            say(f"{run.name}: no finished run (pass --train to train configs/{name}_lucic.yaml)")
            return None
        command = [str(bin_dir / "dcgan-train"), "--config", f"configs/{name}_lucic.yaml", f"run.dir={run}",
                   f"train.seed={seed}", "log.wandb.mode=disabled", "log.progress=false"]
        say(f"{run.name}: training ({threads} thread(s)): {' '.join(command)} > {run}.train.log")
        with open(f"{run}.train.log", "a") as log:
            status = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if status == 75:  # stopped by a signal after writing its checkpoint
            say(f"{run.name}: stopped by a signal, checkpoint written; run the same command again to resume")
            return None
        if status:
            raise SystemExit(f"{run.name}: training failed (exit {status}); see {run}.train.log")
    if not report.is_file() or json.loads(report.read_text()).get("step") != _last_step(run):
        command = [str(bin_dir / "dcgan-eval"), str(run), "--protocol", "lucic", "--quiet", "--json", str(report),
                   *(["--fid-weights", args.fid_weights] if args.fid_weights else [])]
        say(f"{run.name}: scoring: {' '.join(command)}")
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    scored = json.loads(report.read_text())
    metrics = scored["metrics"]
    row = {"name": name, "seed": seed, "fid": metrics["inception/fd"], "kid": metrics["inception/kid"],
           "protocol": scored["protocol"]["inception"]["note"], "data": scored["data"], "step": scored["step"],
           "train_minutes": train_minutes(run)}
    if "classifier/class_accuracy" in metrics:
        row["class_accuracy"] = metrics["classifier/class_accuracy"]
    say(f"{run.name}: FID {row['fid']:.2f} [{row['protocol']}]")
    out = Path(args.export or "") / f"{name.replace('_', '-')}-lucic"
    if args.export and seed == 0 and not out.exists():
        export(run, report, out)
    return row


def _last_step(run: Path) -> int:
    from dcgan_dist import checkpoint

    return checkpoint.read_meta(checkpoint.complete_checkpoints(run / "checkpoints")[0])["step"]


def aggregate(runs: list[dict]) -> dict:
    """{name: {"fids", "mean", "sd", "min", "max", "seeds", ...}} over the seeds of each recipe."""
    rows = {}
    for r in runs:
        rows.setdefault(r["name"], []).append(r)
    out = {}
    for name, rs in rows.items():
        fids = [r["fid"] for r in sorted(rs, key=lambda r: r["seed"])]
        minutes = [r["train_minutes"] for r in rs if r["train_minutes"]]
        out[name] = {"data": rs[0]["data"], "seeds": sorted(r["seed"] for r in rs), "fids": fids,
                     "mean": statistics.fmean(fids), "sd": statistics.stdev(fids) if len(fids) > 1 else None,
                     "min": min(fids), "max": max(fids), "protocol": rs[0]["protocol"], "step": rs[0]["step"],
                     "train_minutes": statistics.fmean(minutes) if minutes else None}
        accuracies = [r["class_accuracy"] for r in rs if "class_accuracy" in r and r["name"].endswith("_cond")]
        if accuracies:
            out[name]["class_accuracy"] = statistics.fmean(accuracies)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="train the runs that are not finished, then score")
    parser.add_argument("--score", action="store_true", help="score the finished runs (train none)")
    parser.add_argument("--runs-dir", default="runs/lucic")
    parser.add_argument("--only", nargs="*", choices=RECIPES, help="these rows only")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0], help="train.seed of each row's runs")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side, each on cpu_count / JOBS threads")
    parser.add_argument("--fid-weights", help="TF-Inception weights (default: dcgan-eval fid-weights' file)")
    parser.add_argument("--json", help="where the table is written (default <runs-dir>/table.json)")
    parser.add_argument("--export", metavar="DIR", help="write each row's seed-0 generator to DIR/<name>-lucic")
    args = parser.parse_args()
    last = Path(args.json or Path(args.runs_dir) / "table.json")
    if not (args.train or args.score):
        if last.is_file():
            print_table(json.loads(last.read_text()))
        else:
            print(f"fid_table: no table yet ({last}); --score scores finished runs in {args.runs_dir}, --train "
                  "trains them first (hours on a CPU)")
        return
    Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
    todo = [(name, seed) for name in args.only or RECIPES if Path(f"configs/{name}_lucic.yaml").is_file()
            for seed in args.seeds]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = [r for r in pool.map(lambda job: one(*job, args, threads), todo) if r]
    if not runs:
        print("fid_table: nothing to score")
        return
    table = {"cpu": cpu_name(), "runs": runs, "rows": aggregate(runs), "published": PUBLISHED}
    print_table(table)
    last.parent.mkdir(parents=True, exist_ok=True)
    last.write_text(json.dumps(table, indent=2) + "\n")
    print(f"wrote {last}")


def print_table(table: dict) -> None:
    rows = table["rows"]
    print(f"\nFID, Lucic et al. 2018's protocol; this project on {table['cpu']}: mean ± sd over seeds [range]\n")
    print("| model | seeds | MNIST | Fashion-MNIST | each seed | train (min) |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        cells = ["", ""]
        sd = "" if row["sd"] is None else f" ± {row['sd']:.2f}"
        cells[COLUMN[row["data"]]] = f"**{row['mean']:.2f}**{sd} [{row['min']:.2f}, {row['max']:.2f}]"
        label = f"this project: {name}" + (f" (class accuracy {row['class_accuracy']:.3f})"
                                           if "class_accuracy" in row else "")
        minutes = "-" if row["train_minutes"] is None else f"{row['train_minutes']:.0f}"
        print(f"| {label} | {len(row['seeds'])} | {cells[0]} | {cells[1]} | "
              f"{', '.join(f'{f:.2f}' for f in row['fids'])} | {minutes} |")
    for model, (mnist, fashion) in table["published"].items():
        print(f"| Lucic et al.: {model} | | {mnist} | {fashion} | | |")
    for name, row in rows.items():
        best = min(v[COLUMN[row["data"]]] for v in table["published"].values())
        verdict = "below" if row["mean"] < best else "NOT below"
        print(f"{name}: mean {row['mean']:.2f} over {len(row['seeds'])} seed(s) is {verdict} the best published "
              f"{best} [{row['protocol']}]")


if __name__ == "__main__":
    main()
