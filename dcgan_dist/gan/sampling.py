"""Turning a generator into images: fixed noise, the classes asked of a conditional generator, BatchNorm
recalibration, grids as arrays, uint8 NHWC, latent interpolation. No files: `sample_files` writes them.

A class-conditional generator (`generator.num_classes` > 0) takes labels beside z: `class_labels` asks for every
class equally often, `class_grid` lays a grid out as one row per class.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchvision.utils import make_grid


def fixed_noise(num: int, latent_dim: int, seed: int) -> torch.Tensor:
    """The same z on every rank and every run with this seed (drawn on the CPU: device-independent)."""
    return torch.randn(num, latent_dim, generator=torch.Generator().manual_seed(seed))


def class_labels(num: int, num_classes: int) -> torch.Tensor | None:
    """Uniform classes: sample i asks for class i mod K ([num] int64); None for an unconditional generator."""
    return torch.arange(num) % num_classes if num_classes else None


def class_grid(num: int, latent_dim: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """The fixed grid's (z, labels, images per row). Unconditional: `num` seeded z, 8 per row. Conditional: one
    row per class, max(1, num // K) columns, each column one z across every class (style fixed, class varied)."""
    if not num_classes:
        return fixed_noise(num, latent_dim, seed), None, 8
    cols = max(1, num // num_classes)
    z = fixed_noise(cols, latent_dim, seed).repeat(num_classes, 1)  # [K * cols, latent], row-major
    return z, torch.arange(num_classes).repeat_interleave(cols), cols


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
    labels = class_labels(num, getattr(generator, "num_classes", 0))
    try:
        for i, z in enumerate(fixed_noise(num, generator.latent_dim, seed).split(batch_size)):
            y = None if labels is None else labels[i * batch_size:(i + 1) * batch_size].to(device)
            generator(z.to(device), y)
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        generator.train(was_training)


@torch.no_grad()
def generate(generator: nn.Module, z: torch.Tensor, labels: torch.Tensor | None = None,
             batch_size: int = 256) -> torch.Tensor:
    """Images in [-1, 1], [N, C, H, W], float32 on the CPU. Runs G in eval mode (running BN statistics).
    `labels` [N]: the requested classes (conditional generators only)."""
    was_training = generator.training
    generator.eval()
    device = next(generator.parameters()).device
    ys = [None] * len(z.split(batch_size)) if labels is None else [y.to(device) for y in labels.split(batch_size)]
    try:
        out = [generator(part.to(device), y).float().cpu() for part, y in zip(z.split(batch_size), ys)]
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


def requested_labels(generator: nn.Module, num: int, label: int | None = None) -> torch.Tensor | None:
    """The classes asked of a conditional generator: `label` throughout, else every class equally often
    (`class_labels`); None for an unconditional one."""
    if label is not None:
        return torch.full((num,), label, dtype=torch.int64)
    return class_labels(num, generator.num_classes)


def draw(generator: nn.Module, num: int, seed: int = 0,
         label: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`num` images of the seeded noise `fixed_noise(num, latent_dim, seed)` and the classes asked for them
    (`requested_labels`): what `dcgan-sample` writes."""
    labels = requested_labels(generator, num, label)
    return generate(generator, fixed_noise(num, generator.latent_dim, seed), labels), labels


def interpolation(generator: nn.Module, seed_a: int, seed_b: int, steps: int, label: int | None = None) -> torch.Tensor:
    """`steps` images from the image of seed A to that of seed B (slerp in z; seed s gives the z of
    `draw(generator, 1, s)`); a conditional model: class `label`, else class 0 throughout."""
    z_a, z_b = (fixed_noise(1, generator.latent_dim, s)[0] for s in (seed_a, seed_b))
    labels = requested_labels(generator, steps, label)
    labels = None if labels is None else labels[:1].expand(steps)
    return generate(generator, interpolate_latents(z_a, z_b, steps), labels)


