"""Distribution metrics on feature arrays: how close synthetic tiles are to real ones.

Every function takes ``(N, D)`` arrays ``real`` and ``fake`` (numpy or torch; computed in
float64 numpy) of one feature space and is memory-bounded: pairwise quantities are built
``block`` rows at a time, never as a whole N × M matrix.

* :func:`frechet_distance` — ‖μ_r − μ_f‖² + Tr(Σ_r + Σ_f − 2 (Σ_r Σ_f)^½) (FID on
  Inception features), the trace of the square root from the eigenvalues of
  Σ_r^½ Σ_f Σ_r^½ (``eigh``, symmetric, no complex ``sqrtm``).
* :func:`kid` — kernel inception distance: the unbiased MMD² with the cubic polynomial
  kernel k(x, y) = (x·y / D + 1)³, on all samples or as the mean ± sd over random subsets
  (Bińkowski et al. 2018; torch-fidelity's and clean-fid's estimator).
* :func:`precision_recall`, :func:`density_coverage` — k-NN manifold precision / recall
  (Kynkäänniemi et al. 2019) and density / coverage (Naeem et al. 2020).
* :func:`nnd` — mean nearest-neighbour distance synth → real and real → real (a
  synthetic set closer to the real tiles than they are to each other hints at copies).
* :func:`cosine_similarity` — mean cosine of paired reference ↔ synthetic features.
* :func:`cmmd` — MMD² with a Gaussian RBF kernel, σ = 10, × 1000, on CLIP embeddings
  (Jayasumana et al. 2024; google-research/cmmd ``distance.py``: the biased estimate).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, TypedDict, Unpack

import numpy as np

__all__ = [
    "KID",
    "NearestOptions",
    "cmmd",
    "cosine_similarity",
    "density_coverage",
    "frechet_distance",
    "kid",
    "nearest_distances",
    "nnd",
    "pca_2d",
    "precision_recall",
]

#: Rows of a pairwise block (a block is ``BLOCK × M`` float64: 2048 × 50 000 = 0.8 GB).
BLOCK = 2048


class RankWarning(UserWarning):
    """Fewer samples than feature dimensions: the covariance is rank-deficient."""


class KID(NamedTuple):
    """KID as the mean over subsets and its standard deviation (``None`` without subsets)."""

    mean: float
    std: float | None


def _features(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty (N, D) feature array, got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: the features hold NaN or infinite values")
    return a


def feature_pair(real: Any, fake: Any, *, min_n: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Both feature sets as float64 ``(N, D)`` arrays of one dimension, each with at least
    ``min_n`` rows and finite values; ValueError naming the set otherwise."""
    r, f = _features(real, "real"), _features(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(
            f"real and fake features differ in dimension ({r.shape[1]} and {f.shape[1]})"
        )
    for name, a in (("real", r), ("fake", f)):
        if a.shape[0] < min_n:
            raise ValueError(f"{name}: {a.shape[0]} sample(s); this metric needs ≥ {min_n}")
    return r, f


def _blocks(n: int, block: int) -> Iterator[slice]:
    for start in range(0, n, block):
        yield slice(start, min(n, start + block))


def _sq_distances(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0, out=d)


# ----------------------------------------------------------------------------- Fréchet


def _mean_cov(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """The Fréchet distance of two Gaussians N(μ1, Σ1), N(μ2, Σ2)."""
    root = _sqrt_psd(sigma1)
    inner = root @ sigma2 @ root
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def frechet_distance(real: Any, fake: Any) -> float:
    """FID's formula on the two feature sets (≥ 2 samples each). Warns
    (:class:`RankWarning`) when a set has fewer samples than dimensions: the value is
    then biased and not comparable with published ones."""
    r, f = feature_pair(real, fake, min_n=2)
    dim = r.shape[1]
    for name, a in (("real", r), ("fake", f)):
        if a.shape[0] < dim:
            warnings.warn(
                f"Fréchet distance: {a.shape[0]} {name} samples for {dim} feature dimensions; "
                "the covariance is rank-deficient and the value is not comparable with "
                "published ones (use at least as many samples as dimensions)",
                RankWarning,
                stacklevel=2,
            )
    return frechet_from_stats(*_mean_cov(r), *_mean_cov(f))


# ----------------------------------------------------------------------------- KID


def _kernel_sums(x: np.ndarray, y: np.ndarray, dim: int, block: int) -> tuple[float, float]:
    """(Σ k(x_i, y_j), Σ_i k(x_i, y_i) if x is y) with k = (x·y / dim + 1)³, blocked."""
    total = 0.0
    for rows in _blocks(len(x), block):
        total += float((((x[rows] @ y.T) / dim + 1.0) ** 3).sum())
    return total, float((((x * y).sum(1) / dim + 1.0) ** 3).sum()) if x is y else 0.0


def _mmd2_polynomial(x: np.ndarray, y: np.ndarray, block: int) -> float:
    dim, m, n = x.shape[1], len(x), len(y)
    kxx, dxx = _kernel_sums(x, x, dim, block)
    kyy, dyy = _kernel_sums(y, y, dim, block)
    kxy, _ = _kernel_sums(x, y, dim, block)
    return (kxx - dxx) / (m * (m - 1)) + (kyy - dyy) / (n * (n - 1)) - 2.0 * kxy / (m * n)


def kid(
    real: Any,
    fake: Any,
    *,
    subsets: int | None = None,
    subset_size: int = 1000,
    seed: int = 0,
    block: int = BLOCK,
) -> KID:
    """Kernel inception distance (MMD², cubic polynomial kernel, unbiased).

    ``subsets=None``: the estimate on all samples (``std`` None). Otherwise the mean and
    the (population) standard deviation over ``subsets`` random subsets of
    ``min(subset_size, N_real, N_fake)`` samples of each set, drawn without replacement
    (seeded): torch-fidelity's ``kid_subsets`` / ``kid_subset_size``.
    """
    r, f = feature_pair(real, fake, min_n=2)
    if subsets is None:
        return KID(_mmd2_polynomial(r, f, block), None)
    if subsets < 1:
        raise ValueError(f"subsets must be ≥ 1, not {subsets}")
    size = min(subset_size, len(r), len(f))
    if size < 2:
        raise ValueError(f"subset size {size}: KID needs ≥ 2 samples per subset")
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            _mmd2_polynomial(
                r[rng.choice(len(r), size, replace=False)],
                f[rng.choice(len(f), size, replace=False)],
                block,
            )
            for _ in range(subsets)
        ]
    )
    return KID(float(values.mean()), float(values.std()))


# ----------------------------------------------------------------------------- k-NN manifolds


def _kth_neighbour_radii(x: np.ndarray, k: int, block: int) -> np.ndarray:
    """Distance of each sample to its k-th nearest neighbour in ``x`` (itself excluded)."""
    if len(x) <= k:
        raise ValueError(f"{len(x)} samples: a k-NN radius with k = {k} needs more than {k}")
    sq = (x * x).sum(1)
    radii = np.empty(len(x))
    for rows in _blocks(len(x), block):
        d = _sq_distances(x[rows], x, sq)
        # index k of the sorted row: index 0 is the sample itself (distance 0)
        radii[rows] = np.sqrt(np.partition(d, k, axis=1)[:, k])
    return radii


def _inside_counts(
    points: np.ndarray, centres: np.ndarray, radii: np.ndarray, block: int
) -> tuple[np.ndarray, np.ndarray]:
    """For each point, how many balls B(centre, radius) hold it; for each centre, whether
    any point lies in its ball."""
    sq = (centres * centres).sum(1)
    r2 = radii * radii
    counts = np.zeros(len(points), dtype=np.int64)
    hit = np.zeros(len(centres), dtype=bool)
    for rows in _blocks(len(points), block):
        inside = _sq_distances(points[rows], centres, sq) <= r2[None, :]
        counts[rows] = inside.sum(1)
        hit |= inside.any(0)
    return counts, hit


def precision_recall(
    real: Any, fake: Any, k: int = 3, *, block: int = BLOCK
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): precision = the share of
    fake samples inside some real sample's k-NN ball; recall = the share of real samples
    inside some fake sample's k-NN ball (Euclidean; radii to the k-th neighbour)."""
    r, f = feature_pair(real, fake, min_n=k + 1)
    in_real, _ = _inside_counts(f, r, _kth_neighbour_radii(r, k, block), block)
    in_fake, _ = _inside_counts(r, f, _kth_neighbour_radii(f, k, block), block)
    return float((in_real > 0).mean()), float((in_fake > 0).mean())


def density_coverage(
    real: Any, fake: Any, k: int = 5, *, block: int = BLOCK
) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020) with the real samples' k-NN balls:
    density = Σ_fake (balls holding it) / (k · N_fake); coverage = the share of real
    balls that hold at least one fake sample."""
    r, f = feature_pair(real, fake, min_n=k + 1)
    counts, hit = _inside_counts(f, r, _kth_neighbour_radii(r, k, block), block)
    return float(counts.sum() / (k * len(f))), float(hit.mean())


# ----------------------------------------------------------------------------- NND, cosine


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("a feature vector is all zeros: it has no direction")
    return x / norms


def nearest_distances(
    real: Any,
    fake: Any,
    *,
    metric: str = "cosine",
    exclude: Sequence[tuple[int, int]] = (),
    block: int = BLOCK,
) -> tuple[np.ndarray, np.ndarray]:
    """Per sample, the distance to the nearest real sample: (synth → real for each fake
    sample, real → real for each real one, itself left out). ``metric``: ``"cosine"``
    (1 − cos) or ``"euclidean"``; ``exclude``: (fake index, real index) pairs that are
    not candidates (a synthetic tile and the real tile it was made from)."""
    r, f = feature_pair(real, fake)
    if len(r) < 2:
        raise ValueError("real: real → real needs ≥ 2 samples")
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', not {metric!r}")
    banned: dict[int, list[int]] = {}
    for fi, ri in exclude:
        banned.setdefault(int(fi), []).append(int(ri))
    if any(len(set(v)) >= len(r) for v in banned.values()):
        raise ValueError("exclude leaves a fake sample without any real candidate")
    ref = _unit(r) if metric == "cosine" else r
    sq = (ref * ref).sum(1)

    def nearest(points: np.ndarray, exclude_self: bool, ban: dict[int, list[int]]) -> np.ndarray:
        pts = _unit(points) if metric == "cosine" else points
        out = np.empty(len(pts))
        for rows in _blocks(len(pts), block):
            if metric == "cosine":
                d = 1.0 - pts[rows] @ ref.T
            else:
                d = np.sqrt(_sq_distances(pts[rows], ref, sq))
            if exclude_self:
                idx = np.arange(rows.start, rows.stop)
                d[idx - rows.start, idx] = np.inf
            for i in range(rows.start, rows.stop):
                if i in ban:
                    d[i - rows.start, ban[i]] = np.inf
            out[rows] = d.min(1)
        return out

    return nearest(f, False, banned), nearest(r, True, {})


class NearestOptions(TypedDict, total=False):
    """Keyword options of :func:`nearest_distances` that :func:`nnd` passes on."""

    metric: str
    exclude: Sequence[tuple[int, int]]
    block: int


def nnd(real: Any, fake: Any, **options: Unpack[NearestOptions]) -> tuple[float, float]:
    """Mean nearest-neighbour distance (synth → real, real → real) of
    :func:`nearest_distances` (``options`` as there: ``metric`` = "cosine", ``exclude``,
    ``block``). Synth → real clearly below real → real hints at memorised tiles."""
    s2r, r2r = nearest_distances(real, fake, **options)
    return float(s2r.mean()), float(r2r.mean())


def pca_2d(real: Any, fake: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both sets projected on the first two principal axes of their union, (N, 2) each."""
    r, f = feature_pair(real, fake)
    both = np.concatenate([r, f])
    centred = both - both.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2].T if vt.shape[0] >= 2 else np.pad(vt.T, ((0, 0), (0, 1)))
    projected = centred @ axes
    return projected[: len(r)], projected[len(r) :]


def cosine_similarity(real: Any, fake: Any) -> float:
    """Mean cosine similarity of paired rows: ``real[i]`` (the reference tile) with
    ``fake[i]`` (the tile made from it)."""
    r, f = feature_pair(real, fake)
    if len(r) != len(f):
        raise ValueError(f"paired features: {len(r)} real and {len(f)} fake rows")
    return float((_unit(r) * _unit(f)).sum(1).mean())


# ----------------------------------------------------------------------------- CMMD

#: google-research/cmmd: the RBF bandwidth and the scale of the reported value.
CMMD_SIGMA, CMMD_SCALE = 10.0, 1000.0


def _rbf_mean(x: np.ndarray, y: np.ndarray, gamma: float, block: int) -> float:
    ysq = (y * y).sum(1)
    total = 0.0
    for rows in _blocks(len(x), block):
        total += float(np.exp(-gamma * _sq_distances(x[rows], y, ysq)).sum())
    return total / (len(x) * len(y))


def cmmd(real: Any, fake: Any, *, sigma: float = CMMD_SIGMA, block: int = BLOCK) -> float:
    """CMMD: scale · (mean k(r, r′) + mean k(f, f′) − 2 mean k(r, f)), k the Gaussian RBF
    exp(−‖x − y‖² / 2σ²) with σ = 10, scale 1000 — the biased estimate (diagonals
    included) of google-research/cmmd, on CLIP ViT-L/14-336 embeddings."""
    r, f = feature_pair(real, fake)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive number, not {sigma}")
    gamma = 1.0 / (2.0 * sigma * sigma)
    value = _rbf_mean(r, r, gamma, block) + _rbf_mean(f, f, gamma, block)
    value -= 2.0 * _rbf_mean(r, f, gamma, block)
    return float(CMMD_SCALE * value)
