"""The commands: `dcgan-train` (also `accelerate launch launch/train.py`), `dcgan-sample`, `dcgan-export`,
`dcgan-prepare`, `dcgan-plot` (`dcgan-eval`: `eval_cli`). Each parses its arguments, makes one call into the
module that owns the work (imported inside the command, so --help stays light) and prints its result; how it
runs, fails and exits is `command`'s.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dcgan_dist.command import EXIT_PREEMPTED, Parser, run_command


def train_main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="dcgan-train", description="Train a DCGAN. Same code under `accelerate launch`.")
    parser.add_argument("--config", help="YAML recipe, e.g. configs/mnist5k.yaml (default: built-in defaults)")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in the run directory")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.steps=200")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags

    def train() -> None:
        import yaml

        from dcgan_dist.recipe import load_config

        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return
        from dcgan_dist.train.trainer import Trainer

        with Trainer(cfg, overwrite=args.overwrite) as trainer:  # closed before the interpreter's teardown
            complete = trainer.train()
        if not complete:
            sys.exit(EXIT_PREEMPTED)

    run_command(train)


def sample_main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="dcgan-sample", description="Generate images from a checkpoint.")
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
        from dcgan_dist import hub, sample_files

        out = Path(args.out)
        sample_files.check_request(args.num, out, bool(args.interpolate), args.steps)
        generator, _, _ = hub.load_generator(args.checkpoint, ema=not args.no_ema)
        sample_files.check_class(generator, args.label, args.checkpoint)
        print(sample_files.write(generator, out, args.num, args.seed, args.label, args.interpolate, args.steps))

    run_command(sample)


def export_main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="dcgan-export", description="Write just the generator, in the Hugging Face Hub's layout "
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

    run_command(export)


def plot_main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="dcgan-plot", description="Draw every metric in the runs' metrics.jsonl (losses, D(x) and "
                     "D(G(z)), gradient norms, throughput, eval/*) against step and images seen, the runs overlaid, "
                     "into one PNG.")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (each with its metrics.jsonl)")
    parser.add_argument("--out", required=True, help="the .png to write")
    args = parser.parse_args(argv)

    def plot() -> None:
        from dcgan_dist import plot as curves

        print(f"wrote {curves.write([Path(r) for r in args.runs], Path(args.out))}")

    run_command(plot)


def prepare_main(argv: list[str] | None = None) -> None:
    parser = Parser(prog="dcgan-prepare", description="Decode, resize and centre-crop a dataset once into a store "
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

    run_command(prepare, disk_full="nothing half-written is visible at --out, and the finished units are kept: free "
                                   "space and run the same command again to finish")
