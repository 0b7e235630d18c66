"""The metric functions against independent implementations on the same features —
torchmetrics, torch-fidelity, clean-fid's numpy helpers, prdc — to 1e-6 relative, and
against values computed by hand on tiny inputs (issue: fidelity metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from histosynth.synthesis.metrics import (
    RankWarning,
    cmmd,
    cosine_similarity,
    density_coverage,
    frechet_distance,
    kid,
    nnd,
    precision_recall,
)

REL = 1e-6


@pytest.fixture(scope="module")
def features():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(240, 12)) @ rng.normal(size=(12, 12))
    fake = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12)) * 0.9 + 0.4
    return real, fake


# ----------------------------------------------------------------------------- Fréchet


def test_frechet_matches_clean_fid_torch_fidelity_and_torchmetrics(features):
    from cleanfid.fid import frechet_distance as clean_fd
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torchmetrics.image.fid import _compute_fid

    real, fake = features
    ours = frechet_distance(real, fake)
    mu1, s1 = real.mean(0), np.cov(real, rowvar=False)
    mu2, s2 = fake.mean(0), np.cov(fake, rowvar=False)
    assert ours == pytest.approx(clean_fd(mu1, s1, mu2, s2), rel=REL)
    fidelity = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2},
                                        False)["frechet_inception_distance"]
    assert ours == pytest.approx(fidelity, rel=REL)
    t = [torch.as_tensor(v, dtype=torch.float64) for v in (mu1, s1, mu2, s2)]
    assert ours == pytest.approx(float(_compute_fid(*t)), rel=REL)


def test_frechet_by_hand():
    """1-D: (μ1 − μ2)² + (σ1 − σ2)²; identical sets: 0."""
    a = np.array([[0.0], [2.0]])  # μ 1, σ² 2
    b = np.array([[3.0], [7.0]])  # μ 5, σ² 8
    assert frechet_distance(a, b) == pytest.approx(16 + (math.sqrt(2) - math.sqrt(8)) ** 2)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-12)


def test_frechet_warns_about_rank(features):
    real, fake = features
    with pytest.warns(RankWarning, match="rank-deficient"):
        frechet_distance(real[:5], fake[:5])


# ----------------------------------------------------------------------------- KID


def test_kid_matches_torch_fidelity_and_clean_fid(features):
    from cleanfid.fid import kernel_distance
    from torch_fidelity.metric_kid import kid_features_to_metric

    real, fake = features
    n = 200
    ours = kid(real[:n], fake[:n]).mean
    fidelity = kid_features_to_metric(torch.as_tensor(real[:n]), torch.as_tensor(fake[:n]),
                                      kid_subsets=1, kid_subset_size=n, kid_degree=3,
                                      kid_gamma=None, kid_coef0=1, rng_seed=0, verbose=False)
    assert ours == pytest.approx(fidelity["kernel_inception_distance_mean"], rel=REL)
    assert ours == pytest.approx(kernel_distance(real[:n], fake[:n], num_subsets=1,
                                                 max_subset_size=n), rel=REL)


def test_kid_subsets_give_mean_and_sd_and_all_samples_none(features):
    real, fake = features
    full = kid(real, fake)
    assert full.std is None
    sub = kid(real, fake, subsets=20, subset_size=50, seed=3)
    assert sub.std is not None and sub.std > 0
    assert abs(sub.mean - full.mean) < 4 * sub.std
    assert kid(real, fake, subsets=20, subset_size=50, seed=3) == sub  # seeded


def test_kid_by_hand():
    """x = {0, 1}, y = {2, 3} in 1-D: k(a, b) = (ab + 1)³."""
    x, y = np.array([[0.0], [1.0]]), np.array([[2.0], [3.0]])

    def k(a, b):
        return (a * b + 1) ** 3

    expected = (2 * k(0, 1)) / 2 + (2 * k(2, 3)) / 2 - 2 * (k(0, 2) + k(0, 3) + k(1, 2)
                                                            + k(1, 3)) / 4
    assert kid(x, y).mean == pytest.approx(expected)


# ----------------------------------------------------------------------------- k-NN manifolds


@pytest.mark.parametrize("k", [3, 5])
def test_precision_recall_density_coverage_match_prdc(features, k):
    from prdc import compute_prdc

    real, fake = features
    reference = compute_prdc(real, fake, nearest_k=k)
    p, r = precision_recall(real, fake, k=k)
    d, c = density_coverage(real, fake, k=k)
    assert (p, r) == pytest.approx((reference["precision"], reference["recall"]), rel=REL)
    assert (d, c) == pytest.approx((reference["density"], reference["coverage"]), rel=REL)


def test_precision_recall_by_hand():
    """Real on a line 0, 1, 2, 3 (k = 1: radius 1 each); fake at 0.5 (inside) and 10
    (outside): precision 1/2; the fake radius (k = 1) is 9.5, so every real lies in the
    ball around 0.5 or 10: recall 1."""
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0]])
    assert precision_recall(real, fake, k=1) == pytest.approx((0.5, 1.0))


# ----------------------------------------------------------------------------- NND, cosine, CMMD


def test_nnd_by_hand_and_against_brute_force(features):
    real = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    fake = np.array([[1.0, 0.0]])
    s2r, r2r = nnd(real, fake, metric="euclidean")
    assert s2r == pytest.approx(1.0)
    assert r2r == pytest.approx((3 + 3 + 4) / 3)
    r, f = features
    from scipy.spatial.distance import cdist

    d_rr = cdist(r, r)
    np.fill_diagonal(d_rr, np.inf)
    assert nnd(r, f, metric="euclidean") == pytest.approx(
        (cdist(f, r).min(1).mean(), d_rr.min(1).mean()), rel=REL)
    c_rr = cdist(r, r, "cosine")
    np.fill_diagonal(c_rr, np.inf)
    assert nnd(r, f) == pytest.approx((cdist(f, r, "cosine").min(1).mean(),
                                       c_rr.min(1).mean()), rel=REL)


def test_cosine_similarity_matches_torch(features):
    real, fake = features
    n = min(len(real), len(fake))
    expected = torch.nn.functional.cosine_similarity(
        torch.as_tensor(real[:n]), torch.as_tensor(fake[:n]), dim=1).mean()
    assert cosine_similarity(real[:n], fake[:n]) == pytest.approx(float(expected), rel=REL)
    assert cosine_similarity([[1.0, 0.0]], [[0.0, 2.0]]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="paired"):
        cosine_similarity(real, fake)


def _cmmd_reference(x, y, sigma=10.0, scale=1000.0):
    """google-research/cmmd distance.py's formula, with full matrices."""
    gamma = 1 / (2 * sigma**2)
    xx, yy, xy = x @ x.T, y @ y.T, x @ y.T
    xs, ys = np.diag(xx), np.diag(yy)
    k_xx = np.exp(-gamma * (-2 * xx + xs[:, None] + xs[None, :])).mean()
    k_yy = np.exp(-gamma * (-2 * yy + ys[:, None] + ys[None, :])).mean()
    k_xy = np.exp(-gamma * (-2 * xy + xs[:, None] + ys[None, :])).mean()
    return scale * (k_xx + k_yy - 2 * k_xy)


def test_cmmd_matches_the_reference_formula(features):
    real, fake = features
    assert cmmd(real, fake) == pytest.approx(_cmmd_reference(real, fake), rel=REL)
    assert cmmd(real, real) == pytest.approx(0.0, abs=1e-9)


# ----------------------------------------------------------------------------- blocks, input


@settings(max_examples=25, deadline=None)
@given(block=st.integers(1, 64), seed=st.integers(0, 1000))
def test_blocked_computation_does_not_change_any_value(block, seed):
    rng = np.random.default_rng(seed)
    real, fake = rng.normal(size=(40, 5)), rng.normal(size=(33, 5)) + 0.2
    assert kid(real, fake, block=block).mean == pytest.approx(kid(real, fake).mean, rel=1e-9)
    assert precision_recall(real, fake, block=block) == precision_recall(real, fake)
    assert density_coverage(real, fake, block=block) == density_coverage(real, fake)
    assert nnd(real, fake, block=block) == pytest.approx(nnd(real, fake), rel=1e-9)
    assert cmmd(real, fake, block=block) == pytest.approx(cmmd(real, fake), rel=1e-9)


@pytest.mark.parametrize(
    ("real", "fake", "match"),
    [
        (np.zeros((5, 3)), np.zeros((5, 4)), "differ in dimension"),
        (np.zeros((0, 3)), np.zeros((5, 3)), "non-empty"),
        (np.full((5, 3), np.nan), np.zeros((5, 3)), "NaN"),
        (np.zeros((1, 3)), np.zeros((5, 3)), "needs ≥ 2"),
    ],
)
def test_bad_features_are_one_clear_error(real, fake, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(real, fake)


def test_torch_tensors_are_accepted(features):
    real, fake = features
    assert kid(torch.as_tensor(real), torch.as_tensor(fake)) == kid(real, fake)


def test_nnd_leaves_out_the_excluded_pairs():
    """Fake 0 is a copy of real 0: excluded, its nearest real is real 1 (distance 3)."""
    real = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 5.0]])
    fake = np.array([[0.0, 0.0]])
    assert nnd(real, fake, metric="euclidean")[0] == pytest.approx(0.0)
    assert nnd(real, fake, metric="euclidean", exclude=[(0, 0)])[0] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="without any real candidate"):
        nnd(real, fake, exclude=[(0, 0), (0, 1), (0, 2)])


@settings(max_examples=25, deadline=None)
@given(n_real=st.integers(6, 40), n_fake=st.integers(6, 40), tile=st.integers(1, 50),
       seed=st.integers(0, 1000), n_excluded=st.integers(0, 10))
def test_the_one_pass_equals_the_separate_metrics(n_real, n_fake, tile, seed, n_excluded):
    """float64: every value of pairwise_metrics is the separate function's, at any tiling
    (tiles of 1 row, tiles cutting the symmetric products off the diagonal)."""
    import torch

    from histosynth.synthesis.metrics import pairwise_metrics

    rng = np.random.default_rng(seed)
    real, fake = rng.normal(size=(n_real, 4)), rng.normal(size=(n_fake, 4)) + 0.3
    exclude = [(int(rng.integers(n_fake)), int(rng.integers(n_real))) for _ in range(n_excluded)]
    exclude = [(f, r) for f, r in exclude if r != 0]  # real 0 stays a candidate for each
    pair = pairwise_metrics(real, fake, exclude=exclude, tile=tile, dtype=torch.float64)
    assert (pair.precision, pair.recall) == precision_recall(real, fake, k=3)
    assert (pair.density, pair.coverage) == pytest.approx(density_coverage(real, fake, k=5))
    assert (pair.nnd_synth_to_real, pair.nnd_real_to_real) == pytest.approx(
        nnd(real, fake, exclude=exclude), rel=1e-9)
    assert pair.kid == pytest.approx(kid(real, fake).mean, rel=1e-9, abs=1e-12)
    assert pair.cmmd == pytest.approx(cmmd(real, fake), rel=1e-9, abs=1e-12)


def test_the_float32_pass_keeps_the_decisions_and_the_sums():
    """The default float32 tiles give the same k-NN decisions on 2048-d features and KID /
    CMMD within 1e-4 relative of float64 (their kernel sums cancel)."""
    from histosynth.synthesis.metrics import pairwise_metrics

    rng = np.random.default_rng(4)
    real = np.abs(rng.normal(size=(300, 2048)))
    fake = np.abs(rng.normal(size=(260, 2048)) * 1.1)
    fast = pairwise_metrics(real, fake, tile=128)
    assert (fast.precision, fast.recall) == precision_recall(real, fake, k=3)
    assert (fast.density, fast.coverage) == pytest.approx(density_coverage(real, fake, k=5))
    assert (fast.nnd_synth_to_real, fast.nnd_real_to_real) == pytest.approx(
        nnd(real, fake), rel=1e-6)
    assert fast.kid == pytest.approx(kid(real, fake).mean, rel=1e-4)
    assert fast.cmmd == pytest.approx(cmmd(real, fake), rel=1e-4)


def test_the_one_pass_refuses_what_it_cannot_measure():
    from histosynth.synthesis.metrics import pairwise_metrics

    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(8, 3)), rng.normal(size=(8, 3))
    with pytest.raises(ValueError, match="beyond the feature arrays"):
        pairwise_metrics(real, fake, exclude=[(8, 0)])
    with pytest.raises(ValueError, match="without any real candidate"):
        pairwise_metrics(real, fake, exclude=[(0, j) for j in range(8)])
    with pytest.raises(ValueError, match="needs ≥ 6"):
        pairwise_metrics(real[:5], fake)
    with pytest.raises(ValueError, match="all zeros"):
        pairwise_metrics(np.vstack([real, np.zeros((1, 3))]), fake)
    with pytest.raises(ValueError, match="sigma"):
        pairwise_metrics(real, fake, sigma=0.0)
