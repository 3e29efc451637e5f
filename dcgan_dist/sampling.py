"""Turning a generator into images: fixed-noise grids (PNG), sample files (npz, uint8 NHWC), latent interpolation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.utils import make_grid, save_image

from dcgan_dist import checkpoint
from dcgan_dist.errors import UserError
from dcgan_dist.models import Generator


def fixed_noise(num: int, latent_dim: int, seed: int) -> torch.Tensor:
    """The same z on every rank and every run with this seed (drawn on the CPU: device-independent)."""
    return torch.randn(num, latent_dim, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def recalibrate_batchnorm(generator: nn.Module, num: int = 1024, batch_size: int = 256, seed: int = 0) -> None:
    """Recompute the running BatchNorm statistics of `generator` for its own weights: the plain mean and
    variance of its BN inputs over `num` samples of seeded noise (then eval mode uses them).

    What an EMA generator needs: BN statistics copied from the live G belong to other weights, and measured
    on MNIST-5k they cost as much as a doubled Fréchet distance (docs/QUALITY.md).
    """
    bns = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return
    was_training, momenta = generator.training, [m.momentum for m in bns]
    device = next(generator.parameters()).device
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    generator.train()
    try:
        for z in fixed_noise(num, generator.latent_dim, seed).split(batch_size):
            generator(z.to(device))
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        generator.train(was_training)


@torch.no_grad()
def generate(generator: nn.Module, z: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Images in [-1, 1], [N, C, H, W], float32 on the CPU. Runs G in eval mode (running BN statistics)."""
    was_training = generator.training
    generator.eval()
    device = next(generator.parameters()).device
    try:
        out = [generator(part.to(device)).float().cpu() for part in z.split(batch_size)]
    finally:
        generator.train(was_training)
    return torch.cat(out)


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float [N, C, H, W] -> uint8 [N, H, W, C], the layout GAN evaluators read."""
    return images.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid_array(images: torch.Tensor, nrow: int = 8) -> np.ndarray:
    """[-1, 1] images -> one uint8 [H, W, C] grid (for trackers)."""
    grid = make_grid(images, nrow=nrow, normalize=True, value_range=(-1, 1), padding=2)  # [3, H, W] in [0, 1]
    return grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=nrow, normalize=True, value_range=(-1, 1), padding=2)


def save_samples(images: torch.Tensor, path: Path) -> None:
    """`.npz` (arr_0: uint8 NHWC) or `.png` (a grid), chosen by the suffix."""
    if path.suffix == ".npz":
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, to_uint8_nhwc(images))
    elif path.suffix == ".png":
        save_grid(images, path, nrow=max(1, int(round(len(images) ** 0.5))))
    else:
        raise UserError(f"--out {path}: use a .npz (uint8 NHWC array) or .png (grid) file name")


def load_samples(path: str | Path) -> torch.Tensor:
    """A samples file as `save_samples` writes it (`arr_0`: uint8 [N, S, S, 1|3]) -> uint8 [N, C, S, S].

    Any generator's samples in that layout are accepted; anything else is a UserError naming what is wrong.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            if "arr_0" not in f.files:
                raise UserError(f"{path}: no arr_0 array (it holds {', '.join(f.files) or 'nothing'}); write "
                                "samples as np.savez(path, uint8 array [N, H, W, C]), as dcgan-sample --out x.npz does")
            arr = f["arr_0"]
    except (OSError, ValueError, EOFError) as e:  # not a file, not a zip of .npy arrays, or an object array
        raise UserError(f"{path}: not a readable .npz of arrays ({str(e).splitlines()[0]})") from None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] not in (1, 3) or arr.shape[1] != arr.shape[2] \
            or len(arr) == 0:
        raise UserError(f"{path}: arr_0 is {arr.dtype} {list(arr.shape)}; expected uint8 [N, S, S, C] with C 1 or 3 "
                        "(NHWC, values 0..255)")
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def load_generator(arg: str, ema: bool = True) -> tuple[Generator, dict, bool]:
    """(generator in eval mode, its checkpoint's meta, whether it is an EMA generator) from a checkpoint dir,
    run dir or generator*.safetensors: the weights `checkpoint.choose_generator` picks, verified."""
    ckpt_dir, stem, meta = checkpoint.choose_generator(arg, ema)
    generator = Generator(**meta["generator"])  # checked against the file's tensors by read_meta
    generator.load_state_dict(checkpoint.load_tensors(ckpt_dir, stem))
    return generator.eval(), meta, checkpoint.is_ema(stem, meta)


def interpolate_latents(z_a: torch.Tensor, z_b: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` latents from z_a to z_b ([D] each) along the great circle (slerp), ends included: [steps, D].

    Gaussian latents concentrate near a sphere, so slerp keeps every point at a typical norm where a straight
    line would pass through the low-norm middle the generator never saw.
    """
    assert steps >= 2 and z_a.shape == z_b.shape and z_a.dim() == 1
    a, b = z_a.double(), z_b.double()
    t = torch.linspace(0, 1, steps, dtype=torch.float64)[:, None]
    omega = torch.arccos((a / a.norm() @ (b / b.norm())).clamp(-1, 1))
    if omega < 1e-6:  # (nearly) the same direction: a straight line is the same path
        return ((1 - t) * a + t * b).float()
    return ((torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)).float()
