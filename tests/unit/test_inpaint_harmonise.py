"""Multiband seam harmonisation on real H&E (TIAToolbox's sample): exact far from the seam,
a softer edge than the plain composite, and the pyramid arithmetic on any tile size."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from histosynth.integration.demo.data import he_source_image
from histosynth.synthesis.inpaint import composite
from histosynth.synthesis.inpaint.harmonise import (
    harmonise_multiband,
    multiband_blend,
    pyramid_levels,
)
from histosynth.synthesis.inpaint.seam import SEAM_CUTOFF


def _scene(size: int = 256, radius: int = 60):
    he = he_source_image()
    background = np.ascontiguousarray(he[:size, :size])
    donor = np.ascontiguousarray(he[500 : 500 + size, 500 : 500 + size])
    donor = cv2.add(donor, np.full_like(donor, 25))  # a visibly different colour
    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(mask, (size // 2, size // 2), (radius, int(radius * 0.7)), 30, 0, 360, 255, -1)
    x, m = composite(background, donor, mask, 0, 0)
    return background, x, m


def _distance_to_seam(mask):
    inside = (mask > 0).astype(np.uint8)
    d_out = cv2.distanceTransform(1 - inside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    d_in = cv2.distanceTransform(inside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return d_out + d_in


@pytest.mark.parametrize("sigma", [4.0, 15.0])
def test_beyond_four_sigma_the_result_is_the_composite_bit_for_bit(sigma):
    background, x, mask = _scene()
    out = harmonise_multiband(background, x, mask, sigma=sigma)
    far = _distance_to_seam(mask) > SEAM_CUTOFF * sigma
    assert np.array_equal(out[far], x[far])
    near = _distance_to_seam(mask) < sigma
    assert (out[near] != x[near]).any()


def test_the_seam_is_softer_than_the_hard_composite():
    background, x, mask = _scene()
    out = harmonise_multiband(background, x, mask, sigma=15.0)
    ring = _distance_to_seam(mask) < 2

    def edge_energy(image):
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
        gx, gy = cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1)
        return float(np.hypot(gx, gy)[ring].mean())

    assert edge_energy(out) < 0.8 * edge_energy(x)
    # and the colour jump across the seam shrinks: mean brightness just inside vs outside
    d_in = cv2.distanceTransform((mask > 0).astype(np.uint8), cv2.DIST_L2, 5)
    d_out = cv2.distanceTransform((mask == 0).astype(np.uint8), cv2.DIST_L2, 5)
    band_in, band_out = (d_in > 0) & (d_in < 6), (d_out > 0) & (d_out < 6)
    jump = lambda im: abs(float(im[band_in].mean()) - float(im[band_out].mean()))  # noqa: E731
    assert jump(out) < 0.6 * jump(x)


def test_far_inside_is_the_donor_far_outside_the_background_and_empty_is_a_no_op():
    background, x, mask = _scene(radius=90)
    levels = 3
    out = multiband_blend(background, x, mask, levels=levels).astype(int)
    d = _distance_to_seam(mask)
    far_in, far_out = (mask > 0) & (d > 3 * 2**levels), (mask == 0) & (d > 3 * 2**levels)
    assert far_in.sum() > 1000 and far_out.sum() > 1000
    assert np.abs(out[far_in] - x[far_in]).max() <= 2
    assert np.abs(out[far_out] - background[far_out]).max() <= 2
    empty = np.zeros_like(mask)
    assert np.array_equal(harmonise_multiband(background, x, empty), x)


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(17, 300),
    w=st.integers(17, 300),
    levels=st.integers(1, 5),
    inner=st.integers(0, 255),
    outer=st.integers(0, 255),
)
def test_pyramids_work_on_any_tile_size_and_stay_between_the_two_colours(
    h, w, levels, inner, outer
):
    background = np.full((h, w, 3), outer, np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : h // 2 + 1, w // 4 : w // 2 + 1] = 255
    x = background.copy()
    x[mask > 0] = inner
    out = multiband_blend(background, x, mask, levels=levels)
    assert out.shape == x.shape and out.dtype == np.uint8
    low, high = min(inner, outer), max(inner, outer)
    assert out.min() >= low - 1 and out.max() <= high + 1
    if inner == outer:
        assert np.abs(out.astype(int) - outer).max() <= 1
    assert 1 <= pyramid_levels(15.0, min(h, w)) <= 5


def test_bad_shapes_are_refused():
    background, x, mask = _scene()
    with pytest.raises(ValueError, match="one shape"):
        multiband_blend(background[:10], x, mask, levels=2)
    with pytest.raises(ValueError, match="does not match"):
        multiband_blend(background, x, mask[:10], levels=2)
