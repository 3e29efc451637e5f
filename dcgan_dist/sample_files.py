"""Sample files, as `dcgan-sample` writes them and runs keep them: `.npz` (arr_0: uint8 NHWC, `labels`: the requested
classes of a conditional model) and `.png` grids; what `dcgan-sample` may be asked (`check_request`,
`check_class`) and its one call (`write`). The images themselves come from `gan.sampling`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.utils import save_image

from dcgan_dist.errors import UserError
from dcgan_dist.gan.sampling import draw, interpolation, to_uint8_nhwc


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=nrow, normalize=True, value_range=(-1, 1), padding=2)


def save_samples(images: torch.Tensor, path: Path, labels: torch.Tensor | None = None) -> None:
    """`.npz` (arr_0: uint8 NHWC; `labels`: int64 [N], the requested classes, when given) or `.png` (a grid),
    chosen by the suffix."""
    if path.suffix == ".npz":
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {} if labels is None else {"labels": labels.numpy()}
        np.savez(path, to_uint8_nhwc(images), **extra)
    elif path.suffix == ".png":
        save_grid(images, path, nrow=max(1, int(round(len(images) ** 0.5))))
    else:
        raise UserError(f"--out {path}: use a .npz (uint8 NHWC array) or .png (grid) file name")


def check_class(generator: nn.Module, label: int | None, name: str) -> None:
    """A UserError unless `label` (None: no class asked) is one of the classes of `generator` (loaded from `name`)."""
    k = generator.num_classes
    if label is not None and not 0 <= label < k:
        fix = f"use a class in 0..{k - 1}" if k else \
            f"{name} is an unconditional model (model.num_classes=0); drop --class"
        raise UserError(f"--class {label}: {fix}")


def check_request(num: int, out: Path, interpolate: bool, steps: int) -> None:
    """A UserError unless `dcgan-sample` was asked for something it can write (before any checkpoint is read)."""
    if num < 1:
        raise UserError(f"--num {num}: ask for at least one image")
    if out.suffix not in (".npz", ".png"):
        raise UserError(f"--out {out}: use a .npz (uint8 NHWC array) or .png (grid) file name")
    if interpolate and (steps < 2 or out.suffix != ".png"):
        raise UserError("--interpolate writes a strip of --steps >= 2 images to a .png --out")


def write(generator: nn.Module, out: Path, num: int, seed: int, label: int | None = None,
          between: tuple[int, int] | None = None, steps: int = 8) -> str:
    """`dcgan-sample`: `draw`n samples to a .npz or a grid .png, or the `interpolation` strip `between` two seeds;
    returns the line that says what was written."""
    if between:
        save_grid(interpolation(generator, *between, steps, label), out, nrow=steps)
        return f"wrote a {steps}-image interpolation from seed {between[0]} to {between[1]} to {out}"
    images, labels = draw(generator, num, seed, label)
    save_samples(images, out, labels)
    what = "" if labels is None else f" of class {label}" if label is not None else \
        f" ({generator.num_classes} classes, equally often)"
    return f"wrote {num} samples{what} to {out}"
