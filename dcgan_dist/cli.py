"""The commands: `dcgan-train` (also `accelerate launch launch/train.py`), `dcgan-sample`, `dcgan-export`.

Exit status: 0 done; 2 a user mistake (`UserError`, printed as one line); 75 stopped by a signal after
writing a checkpoint (requeue). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # stopped by SIGTERM/SIGUSR1 after writing a checkpoint: requeue with train.resume=auto


def _run(fn: Callable[[], None]) -> None:
    from dcgan_dist.errors import UserError

    try:
        fn()
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # one line per job, not one per rank
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


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
        from dcgan_dist.trainer import Trainer

        if not Trainer(cfg, overwrite=args.overwrite).train():
            sys.exit(EXIT_PREEMPTED)

    _run(train)


def sample_main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="dcgan-sample", description="Generate images from a checkpoint.")
    parser.add_argument("checkpoint", help="a checkpoint dir, a run dir (its latest), or generator*.safetensors")
    parser.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--out", required=True, help="x.npz (uint8 NHWC array arr_0) or x.png (a grid)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw generator even if EMA weights exist")
    args = parser.parse_args(argv)

    def sample() -> None:
        from dcgan_dist import sampling
        from dcgan_dist.errors import UserError

        if args.num < 1:
            raise UserError(f"--num {args.num}: ask for at least one image")
        out = Path(args.out)
        if out.suffix not in (".npz", ".png"):
            raise UserError(f"--out {out}: use a .npz (uint8 NHWC array) or .png (grid) file name")
        generator, _ = sampling.load_generator(args.checkpoint, ema=not args.no_ema)
        z = sampling.fixed_noise(args.num, generator.latent_dim, args.seed)
        sampling.save_samples(sampling.generate(generator, z), out)
        print(f"wrote {args.num} samples to {out}")

    _run(sample)


def export_main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="dcgan-export", description="Write just the generator, for sharing and inference.")
    parser.add_argument("checkpoint", help="a checkpoint dir or a run dir (its latest)")
    parser.add_argument("out_dir", help="new directory for generator.safetensors + meta.json")
    parser.add_argument("--no-ema", action="store_true", help="export the raw generator even if EMA weights exist")
    args = parser.parse_args(argv)

    def export() -> None:
        from dcgan_dist import checkpoint
        from dcgan_dist.errors import UserError

        out = Path(args.out_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"{out} already exists and is not an empty directory; choose a new OUT_DIR")
        src, _ = checkpoint.resolve(args.checkpoint)
        meta = checkpoint.read_meta(src)
        stem = "generator"
        if not args.no_ema and (src / "generator_ema.safetensors").is_file():
            stem = "generator_ema"
        tensors = checkpoint.load_tensors(src, stem)
        checkpoint.write_dir(out, {"generator": tensors},
                             {"step": meta["step"], "generator": meta["generator"], "ema": stem == "generator_ema"})
        print(f"exported {src / stem}.safetensors (step {meta['step']}) to {out / 'generator.safetensors'}")

    _run(export)
