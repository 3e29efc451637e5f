"""Sample quality: metrics in a feature space, from a domain classifier or from Inception-v3.

Two feature spaces, one protocol:
- the project's own small CNN classifier, trained on a fixed stratified split of a labelled dataset
  (`train_classifier`); its penultimate layer gives features, its softmax gives the class metrics;
- torchvision's `inception_v3` (pool3, 2048 features) when its ImageNet weights are on disk: the usual FID/KID.

In each space the real pool (the classifier's held-out split, or a seeded subset of the data for Inception)
is cut into two disjoint halves A and B of n images. `fd_floor` = FD(A, B) is what two real samples of that
size score; `fd` is the mean of FD(chunk, B) over the disjoint chunks of n generated images, so both carry the
same small-sample bias and `fd / fd_floor` is a fair ratio. KID (unbiased) and precision/recall compare the
generated images with B.

This module builds the spaces (extractors: `features`; maths: `metrics`) and scores a generator in them.
Plain arguments in, floats out: nothing here knows of ranks or configs, except `evaluate`, which takes an
optional accelerate `Accelerator` to split generation across ranks and gather the features, and
`DuringTraining`, the trainer's train.eval_every.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dcgan_dist import metrics as M
from dcgan_dist.catalog import DATASETS, LABELLED, is_better
from dcgan_dist.data import load_dataset, load_images
from dcgan_dist.errors import UserError
from dcgan_dist.features import (
    INCEPTION_FILE,
    Classifier,
    build_inception,
    classifier_outputs,
    classifier_path,
    inception_features,
    inception_weights_path,
    load_classifier,
    save_classifier,
    to_uint8,
    train_classifier,
)
from dcgan_dist.sampling import class_labels, fixed_noise, generate

HOLDOUT_FRACTION = 0.2  # per class, of the labelled training split
SPLIT_SEED = 0


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


# --- one feature space: its real reference and the metrics -----------------------------------------


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


def inception_space(model: nn.Module, images: torch.Tensor, max_ref: int = 10000, seed: int = 0) -> FeatureSpace:
    """Inception space with a seeded random subset of the real images (at most `max_ref`) as the reference."""
    keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:max_ref]
    feats = inception_features(model, images[keep])
    n = len(feats) // 2
    return FeatureSpace("inception", lambda x: (inception_features(model, x), None), feats[:n], feats[n:2 * n],
                        info={"reference": f"2 x {n} real images"})


# --- evaluation of a generator ---------------------------------------------------------------------


@torch.no_grad()
def evaluate(generator: nn.Module, num: int, spaces: list[FeatureSpace], seed: int = 0, batch_size: int = 50,
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
        if num_classes and space.data_hist is not None and len(space.data_hist) != num_classes:
            raise UserError(f"the generator has {num_classes} classes but the {space.name} space's data has "
                            f"{len(space.data_hist)}: evaluate it against the dataset it was trained on (--data)")
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
        parts = [space.extract(part) for part in images.split(batch_size)]
        feats = torch.cat([f for f, _ in parts])
        probs = None if parts[0][1] is None else torch.cat([p for _, p in parts])
        if accelerator is not None:  # rank order = noise order
            device = accelerator.device
            feats = accelerator.gather_for_metrics(feats.to(device)).cpu()
            probs = None if probs is None else accelerator.gather_for_metrics(probs.to(device)).cpu()
        feats, probs = feats[:num], None if probs is None else probs[:num]  # the padding goes
        out |= {f"{space.name}/{k}": v for k, v in space.metrics(feats, probs).items()}
        if labels is not None and probs is not None:  # requested-class accuracy
            out[f"{space.name}/class_accuracy"] = float((probs.argmax(1) == labels).double().mean())
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
                   classifier_size: int = 32, inception: bool | None = None, inception_weights: str | None = None,
                   image_size: int = 32, channels: int = 1, num_images: int | None = None, train_missing: bool = True,
                   log=print) -> tuple[list[FeatureSpace], list[str]]:
    """The feature spaces available for dataset `data`, and one note per space that is not (why, how to get it).

    Classifier: `classifier` (a .safetensors path), else `<cache_dir>/classifier-<data>-<size>.safetensors`
    (cache_dir defaults to `<root>/cache`), trained there when missing and `train_missing`. Inception:
    `inception=True` requires the weights (UserError without them), None uses them when present, False skips.
    The Inception reference is the dataset at the generator's `image_size`/`channels` (and `num_images`, as
    trained), upsampled to 299 like the generated images. Under several ranks call it on the main process
    first (it may train and write the classifier).
    """
    spaces, notes = [], []
    weights = inception_weights_path(inception_weights)
    use_inception = inception or (inception is None and weights is not None)
    inception_model = build_inception(weights) if use_inception else None  # fails early when weights are missing
    if data in LABELLED or classifier:
        path = Path(classifier) if classifier else classifier_path(cache_dir or Path(root) / "cache", data,
                                                                   classifier_size)
        if not path.is_file() and not classifier and train_missing:
            log(f"no classifier for {data} at {path}: training one (once; dcgan-eval train-classifier does it ahead)")
            model, info = fit_classifier(data, root, classifier_size, log=log)
            save_classifier(model, path, info)
            log(f"classifier held-out accuracy {info['accuracy']:.2%}, saved to {path}")
        model, meta = load_classifier(path)
        if meta["data"] != data:
            raise UserError(f"classifier {path} was trained on {meta['data']}, not {data}; "
                            "pass the matching --classifier")
        images, labels = labelled_data(data, root, meta["image_size"])
        space = classifier_space(model, meta, images, labels)
        space.info |= {"path": str(path), "accuracy": meta["accuracy"], "image_size": meta["image_size"]}
        spaces.append(space)
    else:
        notes.append(f"classifier metrics (fd, kid, precision/recall, inception score, coverage, confidence, "
                     f"class KL) need a labelled dataset ({', '.join(LABELLED)}); {data} has no labels")
    if inception_model is not None:
        images = load_images(data, root, image_size, channels, num_images=num_images)
        spaces.append(inception_space(inception_model, images))
    else:
        notes.append(f"FID/KID (Inception-v3) skipped: no {INCEPTION_FILE} in the torch hub cache "
                     "(pass --inception-weights PATH, or fetch it once on a connected machine)")
    return spaces, notes


class DuringTraining:
    """train.eval_every: the metrics of train.eval_num samples, the same seeded noise every time, generated in
    shares by all ranks; and whether they beat the best so far by train.keep_best."""

    def __init__(self, cfg, accelerator, log):
        d, t = cfg.data, cfg.train
        self.accelerator, self.num, self.seed, self.keep_best = accelerator, t.eval_num, t.seed, t.keep_best
        with accelerator.main_process_first():  # rank 0 may train the classifier (once); the others read it
            self.spaces, notes = feature_spaces(d.name, d.root, d.cache_dir, image_size=cfg.model.image_size,
                                                channels=cfg.image_channels, num_images=d.num_images, log=log)
        names = [s.name for s in self.spaces]
        if not self.spaces:
            raise UserError(f"train.eval_every = {t.eval_every} has nothing to measure: " + "; ".join(notes))
        if t.keep_best and t.keep_best.split("/")[0] not in names:
            raise UserError(f"train.keep_best = {t.keep_best!r}: no {t.keep_best.split('/')[0]} metrics for "
                            f"{d.name} (available: {', '.join(names)}); " + "; ".join(notes))

    def __call__(self, generator: nn.Module) -> dict[str, float]:
        """{"<space>/<metric>": value}, the same on every rank. Collective: every rank calls it."""
        return evaluate(generator, self.num, self.spaces, seed=self.seed, accelerator=self.accelerator)

    def improves(self, metrics: dict[str, float], best: dict | None) -> bool:
        """Whether `metrics` beat `best` ({"metric", "value", "step"} or None) by train.keep_best."""
        value = metrics.get(self.keep_best, math.nan)
        return bool(self.keep_best) and math.isfinite(value) and (
            best is None or is_better(self.keep_best, value, best["value"]))
