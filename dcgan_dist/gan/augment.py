"""Differentiable augmentation of everything D sees (Zhao et al. 2020, "DiffAugment").

On a small dataset D memorises the real images and wins: on MNIST-5k, D's accuracy reaches 0.999 by step
5,000 and G's loss climbs (docs/QUALITY.md). Augmenting the real *and* the generated images with the same
random, differentiable transforms, in D's phase and in G's, lets D see more distinct images while G still
gets gradients through the transform; because real and fake pass through the same distribution of
transforms, G is not pushed to draw the transforms themselves (they do not "leak").

Policies (a comma-separated list, applied in this order):
  translation  shift each image by up to 1/8 of its size in x and y, zero padding
  cutout       zero a random square of half the image's size in each image
  color        random brightness (±0.5), saturation (x0..2, colour only) and contrast (x0.5..1.5)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcgan_dist.registry import AUGMENT_POLICIES as POLICIES  # noqa: F401  (the names, in one table)
from dcgan_dist.registry import parse_augment as parse  # noqa: F401


def augment(x: torch.Tensor, policy: tuple[str, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """x [B, C, H, W] in [-1, 1] -> the same shape, each image transformed independently.

    Differentiable in x; the random draws come from `generator` (the trainer's per-rank noise generator,
    which checkpoints save, so a resumed run draws the same transforms)."""
    for name in policy:
        x = _OPS[name](x, generator)
    return x


def _rand(x: torch.Tensor, *shape: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(*shape, device=x.device, generator=generator)  # fp32 on x's device, [0, 1)


def _translation(x: torch.Tensor, g: torch.Generator | None, ratio: float = 0.125) -> torch.Tensor:
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = (_rand(x, b, 1, 1, generator=g) * (2 * sh + 1)).long() - sh  # [B, 1, 1] in [-sh, sh]
    dx = (_rand(x, b, 1, 1, generator=g) * (2 * sw + 1)).long() - sw
    rows = (torch.arange(h, device=x.device).view(1, h, 1) - dy + sh).expand(b, h, w)  # source row in the padded image
    cols = (torch.arange(w, device=x.device).view(1, 1, w) - dx + sw).expand(b, h, w)
    padded = F.pad(x, (sw, sw, sh, sh))  # [B, C, H + 2sh, W + 2sw], zeros outside
    flat = padded.flatten(2)  # [B, C, (H + 2sh)(W + 2sw)]
    index = (rows * (w + 2 * sw) + cols).flatten(1).unsqueeze(1).expand(-1, x.shape[1], -1)  # [B, C, H*W]
    return flat.gather(2, index).view_as(x).contiguous(memory_format=_layout(x))


def _cutout(x: torch.Tensor, g: torch.Generator | None, ratio: float = 0.5) -> torch.Tensor:
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = (_rand(x, b, 1, 1, generator=g) * (h + 1 - ch % 2)).long()  # [B, 1, 1] square centres
    cx = (_rand(x, b, 1, 1, generator=g) * (w + 1 - cw % 2)).long()
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    oy, ox = ys - cy + ch // 2, xs - cx + cw // 2  # position inside the square
    inside = (oy >= 0) & (oy < ch) & (ox >= 0) & (ox < cw)  # [B, H, W]; squares may leave the image
    return x * (~inside).unsqueeze(1).to(x.dtype)


def _color(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    b = x.shape[0]
    x = x + (_rand(x, b, 1, 1, 1, generator=g) - 0.5).to(x.dtype)  # brightness
    if x.shape[1] > 1:  # saturation
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (_rand(x, b, 1, 1, 1, generator=g) * 2).to(x.dtype) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # contrast
    return (x - mean) * (_rand(x, b, 1, 1, 1, generator=g) + 0.5).to(x.dtype) + mean


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


_OPS = {"translation": _translation, "cutout": _cutout, "color": _color}
