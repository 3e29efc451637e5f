"""DCGAN (Radford et al.) and the original fully connected GAN. Plain kwargs in, tensors out.

The defaults are the seed's 64x64 MNIST networks exactly: G maps z [N, 100] through
ConvT(100->512,4,1,0) BN ReLU, ConvT(512->256) BN ReLU, ConvT(256->128) BN ReLU, ConvT(128->64) BN ReLU,
ConvT(64->1) Tanh; D mirrors it with LeakyReLU(0.2), no BN on its first layer, and returns logits
(the seed's final Sigmoid lives in the loss, as binary_cross_entropy_with_logits).

Class-conditional (`num_classes` > 0, dcgan arch), two label paths (`cond`):
- "projection" (Miyato & Koyama 2018): G joins a learned label embedding to z; D's logit is
  psi(phi(x)) + <embed(y), phi(x)>, phi(x) the sum-pooled features of its last 4x4 block, psi its last conv.
- "concat" (cDCGAN, Mirza & Osindero 2014): G joins the one-hot label to z; D reads the one-hot label as
  `num_classes` constant feature maps concatenated to the image.
With `num_classes` = 0 (the default) nothing is added: no label layers, the plain DCGAN's parameters alone.
`spectral_norm` re-parametrises every convolution (and the embedding) by its largest singular value.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as _sn

from dcgan_dist.registry import ARCHS, CONDS

MAX_MULT = 8  # widths grow x2 per block up to 8x the width unit (512 at width 64), as in DCGAN


def _mult(image_size: int, resolution: int) -> int:
    # channel multiplier of the feature map at `resolution`: 8,4,2,1 at 4,8,16,32 for a 64x64 model
    return min(image_size // (2 * resolution), MAX_MULT)


def _check_size(image_size: int) -> int:
    blocks = int(math.log2(image_size)) - 2  # stride-2 blocks between 4x4 and the image
    assert 2 ** (blocks + 2) == image_size and blocks >= 3, f"image_size must be 32..256, power of 2: {image_size}"
    return blocks


# --- the architectures, by registry.ARCHS' names: each builds (input reshape, layers) ---------------------------
# The reshape has no weights, so the layers' state_dict keys are the models' (main.0.weight, ...).


def _dcgan_generator(z_dim: int, channels: int, image_size: int, width: int, bn: bool):
    """ConvT(z_dim->8w, 4, 1, 0) then stride-2 ConvT blocks halving the width, BN and ReLU between, Tanh."""
    _check_size(image_size)
    res, c = 4, width * _mult(image_size, 4)
    layers: list[nn.Module] = [nn.ConvTranspose2d(z_dim, c, 4, 1, 0, bias=not bn)]  # [c, 4, 4]
    layers += [nn.BatchNorm2d(c)] if bn else []
    layers += [nn.ReLU(True)]
    while res * 2 < image_size:
        res, c_out = res * 2, width * _mult(image_size, res * 2)
        layers += [nn.ConvTranspose2d(c, c_out, 4, 2, 1, bias=not bn)]  # doubles H and W
        layers += [nn.BatchNorm2d(c_out)] if bn else []
        layers += [nn.ReLU(True)]
        c = c_out
    layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1, bias=not bn), nn.Tanh()]
    return nn.Unflatten(1, (z_dim, 1, 1)), nn.Sequential(*layers)  # z [N, z_dim] as [N, z_dim, 1, 1]


def _dcgan_discriminator(channels_in: int, image_size: int, width: int, bn: bool):
    """Stride-2 convolutions doubling the width, LeakyReLU(0.2), BN from the second on; psi: [c, 4, 4] -> 1."""
    _check_size(image_size)
    res, c = image_size // 2, width * _mult(image_size, image_size // 2)
    layers: list[nn.Module] = [nn.Conv2d(channels_in, c, 4, 2, 1, bias=not bn), nn.LeakyReLU(0.2, True)]
    while res > 4:
        res, c_out = res // 2, width * _mult(image_size, res // 2)
        layers += [nn.Conv2d(c, c_out, 4, 2, 1, bias=not bn)]  # halves H and W
        layers += [nn.BatchNorm2d(c_out)] if bn else []
        layers += [nn.LeakyReLU(0.2, True)]
        c = c_out
    layers += [nn.Conv2d(c, 1, 4, 1, 0, bias=not bn)]  # psi: [c, 4, 4] -> [1, 1, 1]
    return nn.Identity(), nn.Sequential(*layers)


def _mlp_generator(z_dim: int, channels: int, image_size: int, width: int, bn: bool):
    sizes = [z_dim, 4 * width, 8 * width, 16 * width, channels * image_size**2]
    return nn.Identity(), _mlp(sizes, nn.Tanh(), nn.Unflatten(1, (channels, image_size, image_size)))


def _mlp_discriminator(channels_in: int, image_size: int, width: int, bn: bool):
    return nn.Flatten(), _mlp([channels_in * image_size**2, 16 * width, 8 * width, 4 * width, 1])


GENERATORS = {"dcgan": _dcgan_generator, "mlp": _mlp_generator}
DISCRIMINATORS = {"dcgan": _dcgan_discriminator, "mlp": _mlp_discriminator}


class Generator(nn.Module):
    """z [N, latent_dim] -> images [N, channels, image_size, image_size] in [-1, 1]."""

    def __init__(self, latent_dim: int = 100, channels: int = 1, image_size: int = 64, width: int = 64,
                 norm: str = "batch", arch: str = "dcgan", num_classes: int = 0, cond: str = "projection",
                 spectral_norm: bool = False):
        super().__init__()
        self.latent_dim, self.channels, self.image_size = latent_dim, channels, image_size
        self.num_classes, self.cond = num_classes, cond
        assert cond in CONDS and not (num_classes and not ARCHS[arch].conditional), (cond, num_classes, arch)
        # projection: a learned embedding of latent_dim; concat: the one-hot label itself
        label_dim = 0 if not num_classes else latent_dim if cond == "projection" else num_classes
        if num_classes and cond == "projection":
            self.embed = nn.Embedding(num_classes, label_dim)
        self.reshape, self.main = GENERATORS[arch](latent_dim + label_dim, channels, image_size, width, norm == "batch")
        if spectral_norm:
            _apply_spectral_norm(self)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """`y`: int64 class labels [N] (conditional models only)."""
        assert z.dim() == 2 and z.shape[1] == self.latent_dim, f"z must be [N, {self.latent_dim}], got {list(z.shape)}"
        assert (y is not None) == bool(self.num_classes), "labels y are given exactly to a conditional model"
        if y is not None:  # the label joins z: [N, latent + label_dim]
            code = self.embed(y) if self.cond == "projection" else F.one_hot(y, self.num_classes).to(z.dtype)
            z = torch.cat([z, code.to(z.dtype)], 1)
        return self.main(self.reshape(z))  # [N, C, H, W]


class Discriminator(nn.Module):
    """images [N, channels, image_size, image_size] -> logits [N] (log D/(1-D); sigmoid gives D(x))."""

    def __init__(self, channels: int = 1, image_size: int = 64, width: int = 64, norm: str = "batch",
                 arch: str = "dcgan", num_classes: int = 0, cond: str = "projection", spectral_norm: bool = False):
        super().__init__()
        self.channels, self.image_size = channels, image_size
        self.num_classes, self.cond = num_classes, cond
        assert cond in CONDS and not (num_classes and not ARCHS[arch].conditional), (cond, num_classes, arch)
        maps = num_classes if cond == "concat" else 0  # concat: one-hot label maps beside the image's channels
        self.reshape, self.main = DISCRIMINATORS[arch](channels + maps, image_size, width, norm == "batch")
        if num_classes and cond == "projection":  # one vector per class in phi(x)'s space (psi's input)
            self.embed = nn.Embedding(num_classes, self.main[-1].in_channels)
        if spectral_norm:
            _apply_spectral_norm(self)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """`y`: int64 class labels [N] (conditional models only)."""
        expected = (self.channels, self.image_size, self.image_size)
        assert x.dim() == 4 and tuple(x.shape[1:]) == expected, f"x must be [N, {expected}], got {list(x.shape)}"
        assert (y is not None) == bool(self.num_classes), "labels y are given exactly to a conditional model"
        if y is None:
            return self.main(self.reshape(x)).view(-1)  # [N]
        if self.cond == "concat":  # the one-hot label as constant feature maps: [N, C + K, S, S]
            maps = F.one_hot(y, self.num_classes).to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[2:])
            return self.main(self.reshape(torch.cat([x, maps], 1))).view(-1)
        phi = self.main[:-1](self.reshape(x))  # [N, c, 4, 4]
        projection = (self.embed(y).to(phi.dtype) * phi.sum((2, 3))).sum(1)  # <embed(y), sum-pooled phi(x)>
        return self.main[-1](phi).view(-1) + projection  # psi(phi(x)) + <embed(y), phi(x)>


def _mlp(sizes: list[int], *last: nn.Module) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(0.2, True))
    return nn.Sequential(*layers, *last)


def _apply_spectral_norm(module: nn.Module) -> None:
    """Every convolution and embedding divided by its largest singular value (one power iteration per training
    forward); weights then live in `<layer>.parametrizations.weight.original`."""
    for m in list(module.modules()):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            _sn(m)


@torch.no_grad()
def init_weights(module: nn.Module) -> None:
    """The seed's init: conv (and linear, embedding) weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            # under spectral norm `weight` is computed from `original`, which is what is initialised
            sn = parametrize.is_parametrized(m, "weight")
            nn.init.normal_(m.parametrizations.weight.original if sn else m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
