"""DCGAN (Radford et al.) and the original fully connected GAN. Plain kwargs in, tensors out.

The defaults are the seed's 64x64 MNIST networks exactly: G maps z [N, 100] through
ConvT(100->512,4,1,0) BN ReLU, ConvT(512->256) BN ReLU, ConvT(256->128) BN ReLU, ConvT(128->64) BN ReLU,
ConvT(64->1) Tanh; D mirrors it with LeakyReLU(0.2), no BN on its first layer, and returns logits
(the seed's final Sigmoid lives in the loss, as binary_cross_entropy_with_logits).
"""

from __future__ import annotations

import math

import torch
from torch import nn

MAX_MULT = 8  # widths grow x2 per block up to 8x the width unit (512 at width 64), as in DCGAN


def _mult(image_size: int, resolution: int) -> int:
    # channel multiplier of the feature map at `resolution`: 8,4,2,1 at 4,8,16,32 for a 64x64 model
    return min(image_size // (2 * resolution), MAX_MULT)


def _check_size(image_size: int) -> int:
    blocks = int(math.log2(image_size)) - 2  # stride-2 blocks between 4x4 and the image
    assert 2 ** (blocks + 2) == image_size and blocks >= 3, f"image_size must be 32..256, power of 2: {image_size}"
    return blocks


class Generator(nn.Module):
    """z [N, latent_dim] -> images [N, channels, image_size, image_size] in [-1, 1]."""

    def __init__(self, latent_dim: int = 100, channels: int = 1, image_size: int = 64, width: int = 64,
                 norm: str = "batch", arch: str = "dcgan"):
        super().__init__()
        self.latent_dim, self.channels, self.image_size = latent_dim, channels, image_size
        self.arch = arch
        if arch == "mlp":
            self.main = _mlp([latent_dim, 4 * width, 8 * width, 16 * width, channels * image_size**2], nn.Tanh())
            return
        assert arch == "dcgan", arch
        _check_size(image_size)
        bn = norm == "batch"
        res, c = 4, width * _mult(image_size, 4)
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, c, 4, 1, 0, bias=not bn)]  # -> [c, 4, 4]
        layers += [nn.BatchNorm2d(c)] if bn else []
        layers += [nn.ReLU(True)]
        while res * 2 < image_size:
            res, c_out = res * 2, width * _mult(image_size, res * 2)
            layers += [nn.ConvTranspose2d(c, c_out, 4, 2, 1, bias=not bn)]  # doubles H and W
            layers += [nn.BatchNorm2d(c_out)] if bn else []
            layers += [nn.ReLU(True)]
            c = c_out
        layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1, bias=not bn), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        assert z.dim() == 2 and z.shape[1] == self.latent_dim, f"z must be [N, {self.latent_dim}], got {list(z.shape)}"
        if self.arch == "mlp":
            return self.main(z).view(-1, self.channels, self.image_size, self.image_size)
        return self.main(z[:, :, None, None])  # [N, latent, 1, 1] -> [N, C, H, W]


class Discriminator(nn.Module):
    """images [N, channels, image_size, image_size] -> logits [N] (log D/(1-D); sigmoid gives D(x))."""

    def __init__(self, channels: int = 1, image_size: int = 64, width: int = 64, norm: str = "batch",
                 arch: str = "dcgan"):
        super().__init__()
        self.channels, self.image_size, self.arch = channels, image_size, arch
        if arch == "mlp":
            self.main = _mlp([channels * image_size**2, 16 * width, 8 * width, 4 * width, 1], None)
            return
        assert arch == "dcgan", arch
        _check_size(image_size)
        bn = norm == "batch"
        res, c = image_size // 2, width * _mult(image_size, image_size // 2)
        layers: list[nn.Module] = [nn.Conv2d(channels, c, 4, 2, 1, bias=not bn), nn.LeakyReLU(0.2, True)]  # no BN
        while res > 4:
            res, c_out = res // 2, width * _mult(image_size, res // 2)
            layers += [nn.Conv2d(c, c_out, 4, 2, 1, bias=not bn)]  # halves H and W
            layers += [nn.BatchNorm2d(c_out)] if bn else []
            layers += [nn.LeakyReLU(0.2, True)]
            c = c_out
        layers += [nn.Conv2d(c, 1, 4, 1, 0, bias=not bn)]  # [c, 4, 4] -> [1, 1, 1]
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.channels, self.image_size, self.image_size)
        assert x.dim() == 4 and tuple(x.shape[1:]) == expected, f"x must be [N, {expected}], got {list(x.shape)}"
        if self.arch == "mlp":
            x = x.flatten(1)
        return self.main(x).view(-1)  # [N]


def _mlp(sizes: list[int], last: nn.Module | None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(0.2, True))
    if last is not None:
        layers.append(last)
    return nn.Sequential(*layers)


@torch.no_grad()
def init_weights(module: nn.Module) -> None:
    """The seed's init: conv (and linear) weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
