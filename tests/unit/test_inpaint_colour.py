"""Reinhard colour transfer in CIELAB (context-aware inpainting, step 3).

Claims tested on real H&E pixels: with λ = 1 and σ ratios inside the clip the donor's
CIELAB mean reaches the target's within 1.5 units and its σ the target's within 10 %;
λ = 0 leaves the donor unchanged; λ in between moves the mean proportionally; pixels
outside the donor mask never change; the σ ratio is clipped to [0.5, 2]; the CIELAB is
the true one (agrees with skimage's rgb2lab).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.color import rgb2lab

from histosynth.integration.demo.data import he_source_image
from histosynth.integration.masks import tissue_mask as tissue
from histosynth.synthesis.inpaint import lab_stats, reinhard_transfer

HE = he_source_image()


def restain(rgb: np.ndarray, gains=(0.85, 0.95, 1.08), offset=(10, -5, 0)) -> np.ndarray:
    """A differently stained copy: per-channel gain and offset in RGB."""
    out = rgb.astype(np.float32) * np.array(gains, np.float32) + np.array(offset, np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def donor_and_mask(size: int = 120) -> tuple[np.ndarray, np.ndarray]:
    donor = np.ascontiguousarray(HE[400 : 400 + size, 300 : 300 + size])
    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(mask, (size // 2, size // 2), (size // 2 - 4, size // 3), 20, 0, 360, 255, -1)
    return donor, mask


def test_cielab_is_the_true_one() -> None:
    pixels = HE[:200, :200]
    mean, std = lab_stats(pixels)
    ref = rgb2lab(pixels).reshape(-1, 3)
    np.testing.assert_allclose(mean, ref.mean(axis=0), atol=0.3)
    np.testing.assert_allclose(std, ref.std(axis=0), atol=0.3)


def test_full_transfer_matches_the_target_statistics() -> None:
    donor, mask = donor_and_mask()
    target = restain(np.ascontiguousarray(HE[:300, 600:900]))
    out = reinhard_transfer(donor, mask, target, tissue(target), blend=1.0)
    mu_t, sd_t = lab_stats(target, tissue(target))
    mu_d, sd_d = lab_stats(donor, mask)
    ratio = sd_t / sd_d
    assert ((ratio > 0.5) & (ratio < 2.0)).all()  # inside the clip
    mu_o, sd_o = lab_stats(out, mask)
    assert np.abs(mu_o - mu_t).max() < 1.5
    assert np.abs(mu_o - mu_t).max() < np.abs(mu_d - mu_t).max()
    np.testing.assert_allclose(sd_o, sd_t, rtol=0.1)


def test_blend_zero_is_the_identity_and_half_moves_half_way() -> None:
    donor, mask = donor_and_mask()
    target = restain(np.ascontiguousarray(HE[:300, 600:900]), gains=(0.7, 0.9, 1.1))
    np.testing.assert_array_equal(reinhard_transfer(donor, mask, target, blend=0.0), donor)
    mu_d, _ = lab_stats(donor, mask)
    mu_t, _ = lab_stats(target, tissue(target))
    mu_half, _ = lab_stats(reinhard_transfer(donor, mask, target, tissue(target), blend=0.5),
                           mask)
    np.testing.assert_allclose(mu_half, (mu_d + mu_t) / 2, atol=1.5)
    # the default λ = 0.85 lands between
    mu_def, _ = lab_stats(reinhard_transfer(donor, mask, target, tissue(target)), mask)
    np.testing.assert_allclose(mu_def, 0.85 * mu_t + 0.15 * mu_d, atol=1.5)


@settings(max_examples=40, deadline=None)
@given(
    blend=st.floats(0, 1),
    gains=st.tuples(st.floats(0.6, 1.2), st.floats(0.6, 1.2), st.floats(0.6, 1.2)),
    size=st.integers(16, 96),
    angle=st.floats(0, 180),
)
def test_pixels_outside_the_mask_never_change(blend, gains, size, angle) -> None:
    donor = np.ascontiguousarray(HE[100 : 100 + size, 700 : 700 + size])
    mask = np.zeros((size, size), bool)
    cv2.ellipse(mask.view(np.uint8), (size // 2, size // 2), (size // 3, size // 4), angle, 0,
                360, 1, -1)
    target = restain(np.ascontiguousarray(HE[500:700, :200]), gains=gains)
    out = reinhard_transfer(donor, mask, target, blend=blend)
    assert out.dtype == np.uint8 and out.shape == donor.shape
    np.testing.assert_array_equal(out[~mask], donor[~mask])
    assert out is not donor


def test_sigma_ratio_is_clipped() -> None:
    donor, mask = donor_and_mask()
    flat = np.empty((50, 50, 3), np.uint8)
    flat[:] = (150, 100, 160)  # σ_T = 0 → ratio clipped to 0.5
    out = reinhard_transfer(donor, mask, flat, blend=1.0)
    _, sd_d = lab_stats(donor, mask)
    mu_o, sd_o = lab_stats(out, mask)
    mu_t, _ = lab_stats(flat)
    np.testing.assert_allclose(sd_o, 0.5 * sd_d, rtol=0.1, atol=0.3)
    assert np.abs(mu_o - mu_t).max() < 1.5
    # a wider clip lets the spread collapse further
    _, sd_narrow = lab_stats(reinhard_transfer(donor, mask, flat, blend=1.0,
                                               ratio_clip=(0.1, 2.0)), mask)
    assert (sd_narrow < sd_o).all()


def test_target_tissue_selects_the_reference_pixels() -> None:
    donor, mask = donor_and_mask()
    target = np.ascontiguousarray(HE[:200, :200]).copy()
    target[:, 100:] = restain(target[:, 100:], gains=(0.6, 0.8, 1.2))
    left = np.zeros((200, 200), bool)
    left[:, :100] = True
    out_left = reinhard_transfer(donor, mask, target, left & tissue(target), blend=1.0)
    mu_left, _ = lab_stats(target, left & tissue(target))
    assert np.abs(lab_stats(out_left, mask)[0] - mu_left).max() < 1.5


def test_errors() -> None:
    donor, mask = donor_and_mask(40)
    with pytest.raises(ValueError, match="donor mask is empty"):
        reinhard_transfer(donor, np.zeros_like(mask), HE[:50, :50])
    glass = np.full((30, 30, 3), 250, np.uint8)
    with pytest.raises(ValueError, match="no tissue"):
        reinhard_transfer(donor, mask, glass, tissue(glass))
    with pytest.raises(ValueError, match="blend"):
        reinhard_transfer(donor, mask, HE[:50, :50], blend=1.5)
    with pytest.raises(ValueError, match="uint8 RGB"):
        reinhard_transfer(donor.astype(np.float32), mask, HE[:50, :50])
    with pytest.raises(ValueError, match="does not match"):
        reinhard_transfer(donor, mask[:10], HE[:50, :50])


def test_without_a_tissue_mask_every_target_pixel_counts() -> None:
    donor, mask = donor_and_mask()
    target = np.ascontiguousarray(HE[:200, :200]).copy()
    target[:, 150:] = 250  # glass: counted when no tissue mask is given
    every = reinhard_transfer(donor, mask, target, blend=1.0)
    np.testing.assert_allclose(lab_stats(every, mask)[0], lab_stats(target)[0], atol=1.5)
    only = reinhard_transfer(donor, mask, target, tissue(target), blend=1.0)
    assert lab_stats(only, mask)[0][0] < lab_stats(every, mask)[0][0] - 2  # darker: no glass
