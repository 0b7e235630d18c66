"""Composite and seam blend (context-aware inpainting, steps 4 and 6).

Claims tested: X = (1 − M′)·T + M′·D′ with M′ the placed mask; the seam weights follow
A = exp(−d_out²/2σ²)·exp(−d_in²/2σ²) / max (checked against scipy's exact Euclidean
distance transform on the whole tile), are 1 at the seam and exactly 0 beyond 4σ; far
from the seam (beyond 4σ, inside and outside the donor) the blend equals the composite
bit for bit whatever the generated image is; elsewhere it is (1 − A)·X + A·X_gen rounded.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from histosynth.integration.demo.data import he_source_image
from histosynth.synthesis.inpaint import (
    SEAM_CUTOFF,
    composite,
    fill_holes,
    seam_blend,
    seam_weights,
)

HE = he_source_image()


def reference_weights(mask: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(A, distance to the seam) from the formula with scipy's exact EDT on the full tile."""
    inside = mask > 0
    d_in = ndimage.distance_transform_edt(inside)
    d_out = ndimage.distance_transform_edt(~inside)
    a = np.exp(-(d_out**2) / (2 * sigma**2)) * np.exp(-(d_in**2) / (2 * sigma**2))
    a /= a.max()
    seam_distance = d_in + d_out
    a[seam_distance > SEAM_CUTOFF * sigma] = 0.0
    return a, seam_distance


masks = st.builds(
    lambda h, w, ellipses: (h, w, ellipses),
    st.integers(16, 200),
    st.integers(16, 200),
    st.lists(
        st.tuples(
            st.floats(-0.2, 1.2),
            st.floats(-0.2, 1.2),
            st.integers(1, 60),
            st.integers(1, 60),
            st.floats(0, 180),
        ),
        min_size=1,
        max_size=3,
    ),
)


def draw(spec) -> np.ndarray:
    h, w, ellipses = spec
    mask = np.zeros((h, w), np.uint8)
    for fx, fy, a, b, angle in ellipses:
        cv2.ellipse(mask, (int(fx * w), int(fy * h)), (a, b), angle, 0, 360, 255, -1)
    return mask


@settings(max_examples=120, deadline=None)
@given(spec=masks, sigma=st.floats(0.5, 12.0))
def test_weights_follow_the_formula(spec, sigma: float) -> None:
    mask = draw(spec)
    a = seam_weights(mask, sigma)
    assert a.dtype == np.float32 and a.shape == mask.shape
    if not mask.any() or mask.all():
        assert not a.any()
        return
    ref, seam_distance = reference_weights(mask, sigma)
    np.testing.assert_allclose(a, ref, atol=2e-6)
    assert a.max() == pytest.approx(1.0)
    assert (a[seam_distance > SEAM_CUTOFF * sigma] == 0).all()
    assert (a[seam_distance <= SEAM_CUTOFF * sigma] > 0).all()


@settings(max_examples=120, deadline=None)
@given(spec=masks, sigma=st.floats(0.5, 12.0), seed=st.integers(0, 2**32 - 1))
def test_far_from_the_seam_the_blend_is_the_composite(spec, sigma: float, seed: int) -> None:
    mask = draw(spec)
    h, w = mask.shape
    rng = np.random.default_rng(seed)
    x_img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    generated = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    a = seam_weights(mask, sigma)
    out = seam_blend(x_img, generated, a)
    assert out.dtype == np.uint8 and out.shape == x_img.shape
    _, seam_distance = (
        reference_weights(mask, sigma)
        if mask.any() and not mask.all()
        else (None, np.full(mask.shape, np.inf))
    )
    far = seam_distance > SEAM_CUTOFF * sigma
    np.testing.assert_array_equal(out[far], x_img[far])  # both the donor and the background
    np.testing.assert_array_equal(out[a == 1.0], generated[a == 1.0])
    # elsewhere: (1 − A)·X + A·X_gen, rounded (float32 ties may round either way)
    exact = (1.0 - a[..., None].astype(np.float64)) * x_img + a[..., None] * generated
    diff = np.abs(out - exact)
    assert (diff <= 0.5 + 1e-3).all()


def test_blend_with_zero_weights_is_a_copy() -> None:
    x_img = np.ascontiguousarray(HE[:64, :64])
    out = seam_blend(x_img, np.zeros_like(x_img), np.zeros((64, 64), np.float32))
    np.testing.assert_array_equal(out, x_img)
    assert out is not x_img


def test_blend_input_errors() -> None:
    x_img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        seam_blend(x_img, x_img.astype(np.float32), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="differ"):
        seam_blend(x_img, np.zeros((8, 9, 3), np.uint8), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="weights"):
        seam_blend(x_img, x_img, np.zeros((4, 4)))
    with pytest.raises(ValueError, match="finite"):
        seam_blend(x_img, x_img, np.full((8, 8), np.nan))
    with pytest.raises(ValueError, match="sigma"):
        seam_weights(np.zeros((8, 8), bool), 0.0)


@settings(max_examples=80, deadline=None)
@given(
    size=st.tuples(st.integers(1, 80), st.integers(1, 80)),
    pos=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    as_bool=st.booleans(),
)
def test_composite_pastes_exactly_the_mask(size, pos, as_bool) -> None:
    background = np.ascontiguousarray(HE[:128, :160])
    h, w = size
    donor = np.ascontiguousarray(HE[-h:, -w:])
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (w // 2, h // 2), (max(1, w // 2), max(1, h // 2)), 0, 0, 360, 255, -1)
    if as_bool:
        mask = mask > 0
    x, y = int(pos[0] * (160 - w)), int(pos[1] * (128 - h))
    x_img, placed = composite(background, donor, mask, x, y)
    assert x_img.dtype == np.uint8 and placed.dtype == np.uint8
    assert set(np.unique(placed)) <= {0, 255}
    expected = np.zeros((128, 160), bool)
    expected[y : y + h, x : x + w] = mask > 0
    np.testing.assert_array_equal(placed > 0, expected)
    np.testing.assert_array_equal(x_img[~expected], background[~expected])
    np.testing.assert_array_equal(x_img[y : y + h, x : x + w][mask > 0], donor[mask > 0])
    # X = (1 − M′)·T + M′·D′ as arithmetic
    m = placed[..., None].astype(np.int32) // 255
    pasted = background.astype(np.int32).copy()
    pasted[y : y + h, x : x + w] = donor
    np.testing.assert_array_equal(x_img, (1 - m) * background + m * pasted)


def test_composite_refuses_a_crop_outside_the_tile() -> None:
    background = np.zeros((50, 50, 3), np.uint8)
    donor = np.zeros((20, 20, 3), np.uint8)
    mask = np.ones((20, 20), bool)
    for x, y in ((-1, 0), (0, -1), (31, 0), (0, 31)):
        with pytest.raises(ValueError, match="leaves"):
            composite(background, donor, mask, x, y)
    with pytest.raises(ValueError, match="differ in size"):
        composite(background, donor, np.ones((10, 20), bool), 0, 0)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.lists(st.booleans(), min_size=1, max_size=400),
    width=st.integers(1, 20),
)
def test_fill_holes_fills_what_the_border_cannot_reach(bits: list[bool], width: int) -> None:
    """Equal to scipy's binary_fill_holes (4-connected background) on random masks."""
    rows = max(1, len(bits) // width)
    mask = np.array((bits * (rows * width // len(bits) + 1))[: rows * width]).reshape(rows, width)
    filled = fill_holes(mask)
    np.testing.assert_array_equal(filled, ndimage.binary_fill_holes(mask))
    assert (filled >= mask).all()


def test_fill_holes_fills_a_ring_s_lumen() -> None:
    ring = np.zeros((60, 60), np.uint8)
    cv2.circle(ring, (30, 30), 20, 255, -1)
    cv2.circle(ring, (30, 30), 12, 0, -1)
    disc = np.zeros_like(ring)
    cv2.circle(disc, (30, 30), 20, 255, -1)
    np.testing.assert_array_equal(fill_holes(ring > 0), disc > 0)
    open_ring = ring.copy()
    open_ring[28:32, 40:] = 0  # a gap to the outside: nothing is enclosed
    np.testing.assert_array_equal(fill_holes(open_ring > 0), open_ring > 0)
