"""Fidelity metrics of synthetic tiles against real ones, on feature arrays.

>>> import numpy as np
>>> from histosynth.synthesis.metrics import frechet_distance, kid, precision_recall
>>> rng = np.random.default_rng(0)
>>> real, fake = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
>>> abs(frechet_distance(real, real)) < 1e-9
True
>>> kid(real, fake).mean < 0.01 < kid(real, fake + 1).mean
True
"""

from histosynth.synthesis.metrics.distribution import (
    KID,
    RankWarning,
    cmmd,
    cosine_similarity,
    density_coverage,
    frechet_distance,
    frechet_from_stats,
    kid,
    nearest_distances,
    nnd,
    pca_2d,
    precision_recall,
)
from histosynth.synthesis.metrics.pairwise import Pairwise, pairwise_metrics

__all__ = [
    "KID",
    "Pairwise",
    "RankWarning",
    "cmmd",
    "cosine_similarity",
    "density_coverage",
    "frechet_distance",
    "frechet_from_stats",
    "kid",
    "nearest_distances",
    "nnd",
    "pairwise_metrics",
    "pca_2d",
    "precision_recall",
]
