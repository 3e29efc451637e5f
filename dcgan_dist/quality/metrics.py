"""Sample-quality metrics: pure maths on features and class probabilities (float64, on the CPU).

Features in, floats out; no model, dataset or rank here. Which metrics exist and which way is better:
`registry.METRICS`. Feature extractors: `features`. Putting them together
for a generator: `evaluation`.
"""

from __future__ import annotations

import torch

COVERAGE_MIN_SHARE = 0.02  # a class is covered when it holds at least 2% of the samples


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


def class_metrics(probs: torch.Tensor, data_hist: torch.Tensor) -> dict[str, float]:
    """Inception score, coverage, confidence and class KL of softmax outputs [N, K] against the data's shares [K],
    and the smallest and largest class share (how balanced the predicted classes are)."""
    hist = class_histogram(probs, len(data_hist))
    return {"inception_score": inception_score(probs), "coverage": coverage(hist),
            "confidence": mean_confidence(probs), "class_kl": class_kl(hist, data_hist),
            "class_share_min": float(hist.min()), "class_share_max": float(hist.max())}


def reference_metrics(feats: torch.Tensor, ref_a: torch.Tensor, ref_b: torch.Tensor) -> dict[str, float]:
    """FD, its real-vs-real floor, KID and precision/recall of features [N, D] against real halves A and B [n, D].

    `fd` is the mean of FD(chunk, B) over the disjoint chunks of n generated features and `fd_floor` is FD(A, B),
    so both carry the same small-sample bias and fd / fd_floor is a fair ratio. With fewer than n samples,
    equal sizes are compared, so the floor still applies.
    """
    n = len(ref_b)
    if len(feats) < n:
        a, b = ref_a[:len(feats)], ref_b[:len(feats)]
        fd, floor = frechet_distance(feats, b), frechet_distance(a, b)
    else:
        chunks = feats[: len(feats) // n * n].split(n)
        fd = sum(frechet_distance(c, ref_b) for c in chunks) / len(chunks)
        floor = frechet_distance(ref_a, ref_b)
        b = ref_b
    p, r = precision_recall(b, feats[:len(b)])
    return {"fd": fd, "fd_floor": floor, "kid": kid(feats, b), "precision": p, "recall": r}
