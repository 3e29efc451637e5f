"""Sample quality: metrics in a feature space, from a domain classifier or from the standard FID Inception.

Two feature spaces:
- the project's own small CNN classifier, trained on a fixed stratified split of a labelled dataset
  (`fit_classifier`); its penultimate layer gives features, its softmax gives the class metrics. Its real
  reference (the held-out split) is cut into two disjoint halves A and B of n images. `fd_floor` = FD(A, B) is
  what two real samples of that size score; `fd` is the mean of FD(chunk, B) over the disjoint chunks of n
  generated images, so both carry the same small-sample bias and `fd / fd_floor` is a fair ratio. KID (unbiased)
  and precision/recall compare the generated images with B.
- "inception": the FID of the published numbers (`fid`: pytorch-fid's TF-Inception, pool3): the generated
  images' statistics against the cached statistics (mu, sigma) of the real images (`reference.fid_reference`),
  and KID against the cached features of up to `reference.KID_REF_MAX` of them.

This module builds the spaces (extractors: `features`, `fid`; maths: `metrics`) and scores images or a generator
in them. Plain arguments in, floats out: nothing here knows of ranks or configs, except `evaluate`, which takes
an optional accelerate `Accelerator` to split generation across ranks and gather the features (the trainer's
train.eval_every: `train.evaluator`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dcgan_dist import fileio
from dcgan_dist.data.builtin import fit_back
from dcgan_dist.data.sources import load_dataset
from dcgan_dist.errors import UserError
from dcgan_dist.fileio import user_cache_dir
from dcgan_dist.gan.sampling import class_labels, fixed_noise, generate
from dcgan_dist.quality import metrics as M
from dcgan_dist.quality.features import (
    Classifier,
    classifier_outputs,
    classifier_path,
    load_classifier,
    save_classifier,
    to_uint8,
    train_classifier,
)
from dcgan_dist.quality.fid import FID_WEIGHTS_NAME, build_fid_inception, fid_features, find_weights
from dcgan_dist.quality.reference import fid_reference, reference_stats
from dcgan_dist.registry import DATASETS, LABELLED

HOLDOUT_FRACTION = 0.2  # per class, of the labelled training split
SPLIT_SEED = 0

# --- one feature space: its real reference and the metrics -----------------------------------------


def split_indices(labels: torch.Tensor, holdout: float = HOLDOUT_FRACTION,
                  seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed stratified split: (train, held-out) indices, `holdout` of every class held out."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().view(-1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = max(1, round(len(idx) * holdout))
        test.append(idx[:k]), train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


@dataclass
class FeatureSpace:
    """A feature extractor and its real reference halves A, B ([n, D] each); `probs` spaces also score classes."""

    name: str  # "classifier" | "inception"
    extract: object  # images -> (features, probs or None)
    ref_a: torch.Tensor
    ref_b: torch.Tensor
    data_hist: torch.Tensor | None = None  # [K] the data's class shares (classifier space only)
    real_probs: torch.Tensor | None = None  # softmax of the held-out real images (for the "real" column)
    info: dict = field(default_factory=dict)

    def real_metrics(self) -> dict[str, float]:
        """The class metrics of the real reference images (what a perfect generator would score)."""
        return {} if self.real_probs is None else M.class_metrics(self.real_probs, self.data_hist)

    def metrics(self, feats: torch.Tensor, probs: torch.Tensor | None) -> dict[str, float]:
        out = M.reference_metrics(feats, self.ref_a, self.ref_b)
        if probs is not None and self.data_hist is not None:
            out |= M.class_metrics(probs, self.data_hist)
        return out


def classifier_space(model: Classifier, meta: dict, images: torch.Tensor, labels: torch.Tensor) -> FeatureSpace:
    """The classifier's space with its held-out split (recomputed from the split in `meta`) as the reference.

    `images` uint8 [N, C, S, S] and `labels` [N] are the dataset the classifier was trained on, in load order.
    """
    _, test = split_indices(labels, meta["holdout_fraction"], meta["split_seed"])
    # the held-out images in a seeded order, halved; each half keeps roughly the class balance of the data
    test = test[torch.randperm(len(test), generator=torch.Generator().manual_seed(SPLIT_SEED + 1))]
    feats, probs = classifier_outputs(model, images[test])
    n = len(test) // 2
    hist = torch.bincount(labels, minlength=model.num_classes).double() / len(labels)
    return FeatureSpace("classifier", lambda x: classifier_outputs(model, x), feats[:n], feats[n:2 * n],
                        data_hist=hist, real_probs=probs, info={"reference": f"2 x {n} held-out images"})


@dataclass
class FidSpace:
    """The standard FID/KID: TF-Inception features of the generated images (brought to the reference's size by
    `adapt`) against the real images' statistics `mu` [2048], `sigma` [2048, 2048] (float64; FID) and the features
    of up to KID_REF_MAX of them (KID). `info["protocol"]` says what was compared (`protocol_note`); it is printed
    beside every figure."""

    name: str  # "inception"
    extract: object  # uint8 images -> (features, None)
    mu: torch.Tensor
    sigma: torch.Tensor
    kid_ref: torch.Tensor
    info: dict = field(default_factory=dict)

    def real_metrics(self) -> dict[str, float]:
        return {}

    def metrics(self, feats: torch.Tensor, probs: torch.Tensor | None) -> dict[str, float]:
        fd = M.frechet_from_stats(*M.stats(feats), self.mu, self.sigma)
        return {"fd": fd, "kid": M.kid(feats, self.kid_ref)}


STANDARD_NUM = 50000  # the published protocol: 50,000 samples against the whole training split's statistics
LUCIC_NUM = 10000  # Lucic et al. 2018: 10,000 samples against the 10,000 test images


def fid_space(net: nn.Module, weights: dict, ref: dict, data: str, image_size: int, protocol: str = "run",
              sample_fit: str = "resize") -> FidSpace:
    """The FID/KID space over reference statistics `ref` (`fid_reference`) of `data`, weights `weights` (info),
    for samples made at `image_size`: brought to the reference's size by `fit_back(..., sample_fit)` when it
    differs (a model trained on images padded to its size: its centre)."""
    size = ref["size"]
    how = "as made" if size == image_size else "centre crop" if sample_fit == "pad" else "resized"
    info = {"protocol": protocol, "weights": weights["weights"], "weights_sha256": weights["sha256"],
            "reference": data, "split": ref["split"], "reference_count": ref["count"], "whole_split": ref["whole"],
            "reference_size": size, "sample_size": image_size, "samples": how,
            "kid_reference_count": len(ref["kid_ref"])}

    def extract(images: torch.Tensor) -> tuple[torch.Tensor, None]:
        return fid_features(net, fit_back(images, size, sample_fit)), None

    return FidSpace("inception", extract, ref["mu"], ref["sigma"], ref["kid_ref"],
                    info={"reference": f"statistics of {ref['count']} {data} {ref['split']} images at {size}x{size}",
                          "protocol": info, "stats_path": ref["path"]})


def pair_space(net: nn.Module, weights: dict, images: torch.Tensor, path: str, sample_fit: str = "resize") -> FidSpace:
    """FID/KID against any set of uint8 images [N, C, H, W] (`path`: `image_sets.read_image_set`'s). Square
    samples of another size than square references are brought to theirs (`fit_back(..., sample_fit)`); any
    other pair is compared as it is (Inception resizes each image to 299x299)."""
    if len(images) < 2:
        raise UserError(f"--ref {path}: FID statistics need at least 2 images; it holds {len(images)}")
    ref = reference_stats(fid_features(net, images))
    h, w = images.shape[-2:]
    info = {"protocol": "pair", "weights": weights["weights"], "weights_sha256": weights["sha256"], "reference": path,
            "reference_count": len(images), "reference_size": h, "kid_reference_count": len(ref["kid_ref"])}

    def extract(x: torch.Tensor) -> tuple[torch.Tensor, None]:
        square = h == w and x.shape[-1] == x.shape[-2]
        return fid_features(net, fit_back(x, h, sample_fit) if square else x), None

    return FidSpace("inception", extract, ref["mu"], ref["sigma"], ref["kid_ref"],
                    info={"reference": f"{len(images)} images of {path} at {w}x{h}", "protocol": info})


def protocol_note(space: FidSpace, num: int) -> str:
    """What a FID/KID figure compares, printed beside it: the protocol's name, the samples, the reference set and
    its count, split and size, the weights."""
    p = space.info["protocol"]
    size = p["reference_size"]
    if p["protocol"] == "pair":
        return f"pair: {num} images vs {p['reference_count']} images of {p['reference']}, {p['weights']}"
    made = p["sample_size"]
    how = {"as made": "", "centre crop": f" (centre {size}x{size} of {made}x{made})",
           "resized": f" ({made}x{made} resized to {size}x{size})"}[p["samples"]]
    split = {"train": "training", "test": "test"}[p["split"]]
    whole = "all " if p["whole_split"] else ""
    return (f"{p['protocol']}: {num} samples{how} vs {whole}{p['reference_count']} {p['reference']} {split} images at "
            f"{size}x{size}, {p['weights']}")


# --- evaluation of a generator ---------------------------------------------------------------------


@torch.no_grad()
def evaluate(generator: nn.Module, num: int, spaces: list[FeatureSpace | FidSpace], seed: int = 0, batch_size: int = 50,
             accelerator=None) -> dict[str, float]:
    """Generate `num` images from the seeded noise `fixed_noise(num, latent_dim, seed)` and score them.
    A conditional generator is asked for every class equally often (`class_labels`), and spaces with class
    probabilities also score `class_accuracy`: the share of samples classified as the class requested.

    Returns {"<space>/<metric>": value}, e.g. "classifier/fd", "classifier/fd_floor", "classifier/coverage",
    "inception/fd". With an `accelerator`, each rank generates and extracts features for its contiguous share
    of the same noise, and the features are gathered (`gather_for_metrics`, in rank order), so the values equal
    a single-process evaluation of the same samples. Collective: every rank must call it, with the same
    arguments; the generator runs in eval mode (running BN statistics, no SyncBN collectives) and the result
    is the same on every rank. `generator` may be DDP-wrapped or not; it is put back in its previous mode.
    """
    assert num >= 1
    g = generator.module if hasattr(generator, "module") else generator
    z = fixed_noise(num, g.latent_dim, seed)  # [num, latent]: the same on every rank
    num_classes = getattr(g, "num_classes", 0)
    labels = class_labels(num, num_classes)  # [num] or None
    for space in spaces:
        hist = getattr(space, "data_hist", None)  # a space with class probabilities (FidSpace has none)
        if num_classes and hist is not None and len(hist) != num_classes:
            raise UserError(f"the generator has {num_classes} classes but the {space.name} space's data has "
                            f"{len(hist)}: evaluate it against the dataset it was trained on (--data)")
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    # Every rank's share is a whole number of batches, so each batch of noise is generated and measured in
    # exactly the same batch whatever the world size: the values do not depend on how the work was split.
    per = math.ceil(num / (world * batch_size)) * batch_size
    z = torch.cat([z, z[:1].expand(per * world - num, -1)])  # pad so every rank makes the same count
    mine = slice(rank * per, (rank + 1) * per)
    y = None if labels is None else torch.cat([labels, labels[:1].expand(per * world - num)])[mine]
    images = to_uint8(generate(g, z[mine], y, batch_size))  # [per, C, H, W] uint8, CPU
    out = {}
    for space in spaces:
        feats, probs = _extract(space, images, batch_size)
        if accelerator is not None:  # rank order = noise order
            device = accelerator.device
            feats = accelerator.gather_for_metrics(feats.to(device)).cpu()
            probs = None if probs is None else accelerator.gather_for_metrics(probs.to(device)).cpu()
        feats, probs = feats[:num], None if probs is None else probs[:num]  # the padding goes
        out |= {f"{space.name}/{k}": v for k, v in space.metrics(feats, probs).items()}
        if labels is not None and probs is not None:  # requested-class accuracy
            out[f"{space.name}/class_accuracy"] = float((probs.argmax(1) == labels).double().mean())
    return out


def _extract(space, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    parts = [space.extract(part) for part in images.split(batch_size)]
    feats = torch.cat([f for f, _ in parts])
    return feats, None if parts[0][1] is None else torch.cat([p for _, p in parts])


@torch.no_grad()
def score(images: torch.Tensor, spaces: list[FeatureSpace | FidSpace], batch_size: int = 50) -> dict[str, float]:
    """The metrics of ready-made uint8 images [N, C, S, S] (e.g. `image_sets.read_image_set`'s), as `evaluate` scores
    a generator's: {"<space>/<metric>": value}."""
    out = {}
    for space in spaces:
        out |= {f"{space.name}/{k}": v for k, v in space.metrics(*_extract(space, images, batch_size)).items()}
    return out


# --- building the spaces for a dataset --------------------------------------------------------------


def labelled_data(data: str, root: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(uint8 images [N, C, S, S], labels [N]) of a labelled dataset; None for an unlabelled one."""
    if data not in LABELLED:
        return None
    return load_dataset(data, root, image_size, DATASETS[data].channels)


def fit_classifier(data: str, root: str, image_size: int = 32, epochs: int = 6, seed: int = 0,
                   log=print) -> tuple[Classifier, dict]:
    """Train on the fixed split's training part; returns the model and its info (held-out accuracy ...)."""
    found = labelled_data(data, root, image_size)
    if found is None:
        raise UserError(f"data {data} has no labels: a classifier needs one of {', '.join(LABELLED)}")
    images, labels = found
    train, test = split_indices(labels)
    num_classes = int(labels.max()) + 1
    model = train_classifier(images[train], labels[train], num_classes, epochs=epochs, seed=seed, log=log)
    _, probs = classifier_outputs(model, images[test])
    accuracy = float((probs.argmax(1) == labels[test]).double().mean())
    info = {"data": data, "image_size": image_size, "holdout_fraction": HOLDOUT_FRACTION, "split_seed": SPLIT_SEED,
            "num_train": len(train), "num_heldout": len(test), "epochs": epochs, "seed": seed, "accuracy": accuracy}
    return model, info


def feature_spaces(data: str, root: str = "data", cache_dir: str | Path = "", classifier: str | Path | None = None,
                   classifier_size: int = 32, fid: bool | None = None, fid_weights: str | None = None,
                   image_size: int = 32, channels: int = 1, num_images: int | None = None, train_missing: bool = True,
                   compute_missing: bool = True, device: str | None = None, wait_minutes: float = 60.0,
                   log=print, announce=print, protocol: str = "run", fit: str = "resize",
                   use_classifier: bool = True) -> tuple[list[FeatureSpace | FidSpace], list[str]]:
    """The feature spaces available for dataset `data`, and one note per space that is not (why, how to get it).

    Classifier (unless not `use_classifier`): `classifier` (a .safetensors path), else
    `<cache_dir>/classifier-<data>-<size>.safetensors` (cache_dir defaults to `data.user_cache_dir()`),
    trained there when missing and `train_missing`.
    FID/KID (`fid_space`): `fid=True` requires the TF-Inception weights (`fid_weights`, the torch hub cache, or
    pytorch-fid's download; UserError without them); None uses them when on disk (no download); False skips.
    Its reference (`protocol`, one of registry.FID_PROTOCOLS) is the statistics of `data`'s training images at
    the generator's `image_size`/`channels`, as data.fit = `fit` brought them there (`num_images`: the fixed
    subset trained on; None: the whole training split), or for "lucic" of its test images at their own size (the
    samples brought back to it: `fid_space`), cached under `<cache_dir or user cache>/fid-stats`; without
    `compute_missing`, missing statistics skip FID with a note. Under several ranks call it on every
    rank together: one trains a missing classifier (a file lock, `wait_minutes`), the others wait for its file;
    `log` says so (rank 0 alone, in training), `announce` reports the training, from whichever rank does it.
    """
    spaces, notes = [], []
    fid_net, weights = None, None
    lucic, on_test = protocol == "lucic", protocol in ("lucic", "test")
    if on_test and not (data in DATASETS and DATASETS[data].test_split and (DATASETS[data].size or not lucic)):
        with_test = ", ".join(n for n, i in DATASETS.items() if i.test_split and (i.size or not lucic))
        at = " at its own size" if lucic else ""
        raise UserError(f"FID protocol {protocol} scores against the test split{at}: {data} has none; use one "
                        f"of {with_test}")
    if fid or (fid is None and (fid_weights or _has_weights())):
        fid_net, weights = build_fid_inception(fid_weights, download=bool(fid), device=device)  # fails early
    if use_classifier and (data in LABELLED or classifier):
        spaces.append(_classifier_space(data, root, cache_dir, classifier, classifier_size, train_missing,
                                        wait_minutes, log, announce, fit))
    elif use_classifier:
        notes.append(f"classifier metrics (fd, kid, precision/recall, inception score, coverage, confidence, "
                     f"class KL) need a labelled dataset ({', '.join(LABELLED)}); {data} has no labels")
    if fid_net is None:
        if fid is None:
            notes.append(f"FID/KID skipped: no TF-Inception weights ({FID_WEIGHTS_NAME}) in the torch hub cache "
                         "(run dcgan-eval fid-weights once, or pass --fid-weights PATH)")
        return spaces, notes
    size, split = DATASETS[data].size if lucic else image_size, "test" if on_test else "train"
    ref = fid_reference(fid_net, weights["sha256"], data, root, size, channels, num_images, cache_dir or None,
                        compute=compute_missing, log=log, split=split, fit="resize" if lucic else fit,
                        wait_minutes=wait_minutes)
    if ref is None:
        notes.append(f"FID/KID skipped: no cached reference statistics of {data} at {image_size}x{image_size}; "
                     f"compute them once with dcgan-eval fid-stats --data {data} --data-root {root} --image-size "
                     f"{image_size} --channels {channels}" + (f" --num-images {num_images}" if num_images else "")
                     + (f" --fit {fit}" if fit != "resize" else "")
                     + (f" --cache-dir {cache_dir}" if cache_dir else ""))
    else:
        spaces.append(fid_space(fid_net, weights, ref, data, image_size, protocol, sample_fit=fit))
    return spaces, notes


def _classifier_space(data: str, root: str, cache_dir: str | Path, classifier: str | Path | None,
                      classifier_size: int, train_missing: bool, wait_minutes: float, log, announce,
                      fit: str) -> FeatureSpace:
    """`feature_spaces`' classifier space: the classifier at `classifier` or in the cache (trained there once when
    missing and `train_missing`), its real reference the held-out split of `data`."""
    path = Path(classifier) if classifier else classifier_path(cache_dir or user_cache_dir(), data,
                                                               classifier_size)
    if not path.is_file() and not classifier and train_missing:
        # one process trains it (a file lock, no collective); the others wait for it and read it
        with fileio.exclusive(path.with_name(f".{path.name}.lock"), f"training {path}", wait_minutes, log):
            if not path.is_file():
                announce(f"no classifier for {data} at {path}: training one (once; dcgan-eval "
                         "train-classifier does it ahead)")
                model, info = fit_classifier(data, root, classifier_size, log=announce)
                save_classifier(model, path, info)
                announce(f"classifier held-out accuracy {info['accuracy']:.2%}, saved to {path}")
    model, meta = load_classifier(path)
    if meta["data"] != data:
        raise UserError(f"classifier {path} was trained on {meta['data']}, not {data}; "
                        "pass the matching --classifier")
    images, labels = labelled_data(data, root, meta["image_size"])
    space = classifier_space(model, meta, images, labels)
    space.info |= {"path": str(path), "accuracy": meta["accuracy"], "image_size": meta["image_size"]}
    if fit == "pad" and DATASETS[data].size:  # the samples' centre, resized as the classifier's images were
        size, extract = DATASETS[data].size, space.extract
        space.extract = lambda x: extract(fit_back(x, size, "pad"))
    return space


def _has_weights() -> bool:
    try:
        find_weights(None, download=False)
        return True
    except UserError:
        return False
