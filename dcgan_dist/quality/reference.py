"""The real side of FID/KID: the TF-Inception statistics (mu, sigma) of a dataset's images and a seeded subset
of their features for KID, computed once per dataset, split, size, channels, count and weights, and cached as
safetensors (`fid_reference`). One process computes a missing file under a file lock; the others wait and read it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from dcgan_dist import fileio
from dcgan_dist.data.sources import load_images
from dcgan_dist.errors import UserError
from dcgan_dist.fileio import user_cache_dir, write_atomic
from dcgan_dist.quality import metrics as M
from dcgan_dist.quality.fid import FID_WEIGHTS_NAME, fid_features
from dcgan_dist.registry import DATASETS

KID_REF_MAX = 10000  # real features kept (a seeded subset) for KID: 100 subsets of 1,000 draw from them


def fid_stats_path(cache_dir: str | Path, data: str, root: str, image_size: int, channels: int,
                   num_images: int | None, weights_sha256: str, split: str = "train", fit: str = "resize") -> Path:
    """One file per (dataset, split, image size and fit, channels, count, weights):
    `<cache_dir>/fid-stats/...safetensors`."""
    where = f"-{hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]}" \
        if data in DATASETS and DATASETS[data].at_root else ""  # a folder dataset is its root
    count = "all" if num_images is None else str(num_images)
    split = "" if split == "train" else f"-{split}"
    fit = "" if fit == "resize" else f"-{fit}"
    name = f"{data}{where}{split}-{channels}x{image_size}x{image_size}{fit}-{count}-{weights_sha256[:16]}.safetensors"
    return Path(cache_dir) / "fid-stats" / name


def fid_reference(net: nn.Module, weights_sha256: str, data: str, root: str, image_size: int, channels: int,
                  num_images: int | None = None, cache_dir: str | Path | None = None, compute: bool = True,
                  log=print, split: str = "train", fit: str = "resize", wait_minutes: float = 60.0) -> dict | None:
    """{"mu", "sigma" (float64), "kid_ref" (float32), "count"} of the `split` images of `data` at `image_size` x
    `channels` (as `fit` brings them there; `num_images`: its fixed subset, as data.num_images picks; None: all),
    read from the cache or, with `compute`, computed once and cached (None when not cached and not `compute`).
    Plain per-process work, no collective: one process at a time computes them (a file lock, `wait_minutes`; the
    others then read its file), written atomically."""
    path = fid_stats_path(cache_dir or user_cache_dir(), data, root, image_size, channels, num_images,
                          weights_sha256, split, fit)
    if not path.is_file():
        if not compute:
            return None
        with fileio.exclusive(path.with_name(f".{path.name}.lock"), f"computing {path}", wait_minutes, log):
            if not path.is_file():  # else another process computed them while this one waited
                _write_reference(net, weights_sha256, data, root, image_size, channels, num_images, path, log,
                                 split, fit)
    with safe_open(path, "pt") as f:
        return {"mu": f.get_tensor("mu"), "sigma": f.get_tensor("sigma"), "kid_ref": f.get_tensor("kid_ref"),
                "count": int(f.metadata()["count"]), "whole": num_images is None, "path": str(path), "split": split,
                "size": image_size}


def _write_reference(net, weights_sha256, data, root, image_size, channels, num_images, path, log, split,
                     fit) -> None:
    images = load_images(data, root, image_size, channels, num_images=num_images, split=split, fit=fit)
    if len(images) < 2:
        raise UserError(f"FID statistics need at least 2 real images; {data} at {root} holds {len(images)}")
    log(f"FID reference: Inception features of {len(images)} {data} {split} images at {image_size}x{image_size} "
        f"(once; cached in {path})")
    tensors = reference_stats(fid_features(net, images))
    meta = {"data": data, "root": str(root), "split": split, "image_size": str(image_size), "fit": fit,
            "channels": str(channels), "count": str(len(images)), "weights_sha256": weights_sha256,
            "weights": FID_WEIGHTS_NAME}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, save(tensors, metadata=meta))


def reference_stats(feats: torch.Tensor) -> dict[str, torch.Tensor]:
    """The real side of FID/KID from its features: mu, sigma and a seeded subset of up to KID_REF_MAX features."""
    mu, sigma = M.stats(feats)
    keep = torch.randperm(len(feats), generator=torch.Generator().manual_seed(0))[:KID_REF_MAX]
    return {"mu": mu, "sigma": sigma, "kid_ref": feats[keep].contiguous()}
