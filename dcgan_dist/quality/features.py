"""The project's own feature extractor for sample quality: a small domain classifier, trained on a fixed split of
a labelled dataset and saved as safetensors. Images in, features and class probabilities out; the metric maths
is in `metrics`. The standard FID extractor (TF-Inception) is in `fid`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dcgan_dist.errors import UserError
from dcgan_dist.fileio import write_atomic


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 [0, 255]: generated images are quantised like the real ones before scoring."""
    return images.add(1).mul(127.5).round_().clamp_(0, 255).to(torch.uint8)


def prepare(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """uint8 or [-1, 1] float [N, C, H, W] -> float [-1, 1] [N, channels, size, size] (antialiased resize)."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    x = images.float()
    if x.shape[-2:] != (size, size):  # the same resize data.load_images applies to the real images
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x.round_().clamp_(0, 255)
    if x.shape[1] != channels:
        assert x.shape[1] == 1 or channels == 1, f"cannot map {x.shape[1]} channels to {channels}"
        x = x.expand(-1, channels, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
    return x.div(127.5).sub_(1.0)  # out of place: x may be an expanded (shared-memory) view


class Classifier(nn.Module):
    """A small CNN: images [N, C, S, S] in [-1, 1] -> logits [N, num_classes]; `features` is its penultimate layer."""

    def __init__(self, channels: int = 1, image_size: int = 32, num_classes: int = 10, width: int = 16,
                 feature_dim: int = 128):
        super().__init__()
        self.channels, self.image_size, self.num_classes = channels, image_size, num_classes
        self.width, self.feature_dim = width, feature_dim

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]

        w = width  # cheap on purpose (about 3M multiply-adds per 32x32 image): it trains in a minute on a CPU
        self.body = nn.Sequential(*block(channels, w), nn.MaxPool2d(2),  # [w, S/2, S/2]
                                  *block(w, 2 * w), nn.MaxPool2d(2),  # [2w, S/4, S/4]
                                  *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(4), nn.Flatten(),  # [4w * 16]
                                  nn.Linear(4 * w * 16, feature_dim), nn.ReLU(True))  # [N, feature_dim]
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, num_classes))

    def kwargs(self) -> dict:
        return dict(channels=self.channels, image_size=self.image_size, num_classes=self.num_classes,
                    width=self.width, feature_dim=self.feature_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.channels, self.image_size, self.image_size)
        assert x.dim() == 4 and tuple(x.shape[1:]) == expected, f"x must be [N, {expected}], got {list(x.shape)}"
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 6,
                     batch_size: int = 64, lr: float = 2e-3, seed: int = 0, log=None) -> Classifier:
    """Train on uint8 images [N, C, S, S] with labels [N]; random shifts of up to 2 pixels as augmentation.

    The global torch RNG (init, dropout) is seeded inside `fork_rng`, so a caller's random state is untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _train_classifier(images, labels, num_classes, epochs, batch_size, lr, seed, log)


def _train_classifier(images, labels, num_classes, epochs, batch_size, lr, seed, log) -> Classifier:
    model = Classifier(images.shape[1], images.shape[-1], num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(images) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    x_all = prepare(images, images.shape[-1], images.shape[1])
    model.train()
    for epoch in range(epochs):
        perm, total = torch.randperm(len(images), generator=g), 0.0
        for idx in perm.split(batch_size):
            x = _shift(x_all[idx], 2, g)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)  # a host sync per batch: fine on a CPU-sized classifier
        if log is not None:
            log(f"classifier epoch {epoch + 1}/{epochs}: loss {total / len(images):.4f}")
    return model.eval()


def _shift(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Every image moved by its own random offset in [-pad, pad] (background -1 enters at the border)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=g).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@torch.no_grad()
def classifier_outputs(model: Classifier, images: torch.Tensor,
                       batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, D], softmax probabilities [N, K]) of uint8 or [-1, 1] images, any size (resized)."""
    device = next(model.parameters()).device
    feats, probs = [], []
    for part in images.split(batch_size):
        x = prepare(part.cpu(), model.image_size, model.channels).to(device)
        f = model.features(x)
        feats.append(f.float().cpu()), probs.append(model.head(f).float().softmax(1).cpu())
    return torch.cat(feats), torch.cat(probs)


def save_classifier(model: Classifier, path: Path, info: dict) -> None:
    """`path` (.safetensors) + `path.with_suffix('.json')` (kwargs, data, split, accuracy, sha256)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    meta = {"kwargs": model.kwargs(), **info, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    write_atomic(path.with_suffix(".json"), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def load_classifier(path: Path) -> tuple[Classifier, dict]:
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise UserError(f"classifier {path} (with {meta_path.name} beside it) not found; train one with "
                        "dcgan-eval train-classifier --data NAME")
    meta = json.loads(meta_path.read_text())
    if hashlib.sha256(path.read_bytes()).hexdigest() != meta.get("sha256"):
        raise UserError(f"classifier {path} does not match the sha256 in {meta_path.name}; train it again")
    model = Classifier(**meta["kwargs"])
    try:
        model.load_state_dict(load_file(path))
    except (RuntimeError, SafetensorError) as e:
        raise UserError(f"classifier {path} does not fit {meta_path.name}: {str(e).splitlines()[-1]}") from None
    return model.eval(), meta


def classifier_path(cache_dir: str | Path, data: str, image_size: int) -> Path:
    return Path(cache_dir) / f"classifier-{data}-{image_size}.safetensors"
