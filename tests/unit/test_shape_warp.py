"""Shape guidance's geometry: outlines resampled, paired and warped (thin-plate spline),
real outlines deformed for the bank."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from histosynth.synthesis.inpaint.shape import (
    donor_outline,
    prepare_shape_composite,
    warp_into_target,
)
from histosynth.synthesis.inpaint.warp import (
    deform_outline,
    match_outlines,
    outline_area,
    resample_outline,
    thin_plate_spline,
    warp_donor,
)


def _ellipse(cx, cy, rx, ry, n=80, wobble=0.0, phase=0.0):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False) + phase
    r = 1 + wobble * np.cos(3 * t)
    return np.stack([cx + rx * r * np.cos(t), cy + ry * r * np.sin(t)], axis=1)


def _fill(outline, shape):
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(outline).astype(np.int32)], 255)
    return mask > 0


@settings(max_examples=40, deadline=None)
@given(
    rx=st.floats(5, 200), ry=st.floats(5, 200), n=st.integers(3, 200),
    count=st.integers(8, 128), reverse=st.booleans(),
)
def test_resampled_outline_keeps_area_and_turns_one_way(rx, ry, n, count, reverse):
    outline = _ellipse(0, 0, rx, ry, n)
    if reverse:
        outline = outline[::-1]
    points = resample_outline(outline, count)
    assert points.shape == (count, 2)
    assert outline_area(points) > 0  # one orientation whatever the input's
    # a resampled polygon inscribed in the same outline: area within the chord error
    assert outline_area(points) <= abs(outline_area(outline)) * 1.001 + 1e-6
    if n >= 40 and count >= 64:
        assert outline_area(points) >= abs(outline_area(outline)) * 0.97


@settings(max_examples=30, deadline=None)
@given(shift=st.integers(0, 95), scale=st.floats(0.3, 3.0))
def test_pairing_undoes_a_cyclic_shift_at_any_scale(shift, scale):
    target = resample_outline(_ellipse(100, 80, 60, 30, wobble=0.2), 96)
    source = np.roll(target * scale + 17, shift, axis=0)
    paired = match_outlines(source, target)
    assert np.allclose(paired, target * scale + 17)


def test_thin_plate_spline_interpolates_and_is_affine_far_from_nothing():
    rng = np.random.default_rng(0)
    control = rng.uniform(0, 100, (30, 2))
    affine = control @ np.array([[1.2, 0.1], [-0.2, 0.9]]) + (5, -3)
    exact = thin_plate_spline(control, affine, smoothing=0.0)
    assert np.allclose(exact(control), affine, atol=1e-6)
    # an affine map is reproduced everywhere (a TPS has no bending to add)
    probe = rng.uniform(-50, 150, (50, 2))
    assert np.allclose(exact(probe), probe @ np.array([[1.2, 0.1], [-0.2, 0.9]]) + (5, -3),
                       atol=1e-6)


def test_warp_puts_the_donor_outline_on_the_target():
    donor = np.zeros((200, 200, 3), np.uint8)
    donor[..., 0] = np.arange(200)[None, :]  # a ramp, to see where pixels came from
    source = _ellipse(100, 100, 60, 60)
    vessel = _fill(source, (200, 200))
    target = _ellipse(150, 90, 110, 45, wobble=0.15)
    warped = warp_donor(donor, vessel, source, target, (180, 300), ring=8)
    landed = cv2.remap(vessel.astype(np.uint8) * 255, warped.source_x, warped.source_y,
                       cv2.INTER_NEAREST) > 0
    wanted = _fill(target, (180, 300))
    iou = (landed & wanted).sum() / (landed | wanted).sum()
    assert iou >= 0.97
    # identical outlines: the identity map (within a pixel)
    same = warp_donor(donor, vessel, source, source, (200, 200))
    ys, xs = np.mgrid[:200, :200]
    assert np.abs(same.source_x - xs).max() < 1.0 and np.abs(same.source_y - ys).max() < 1.0


def test_bank_deformations_are_seeded_distinct_and_within_the_area_range():
    outline = _ellipse(0, 0, 50, 30, wobble=0.1)
    shapes = [deform_outline(outline, np.random.default_rng(s), area_range=(2000, 6000))
              for s in range(20)]
    areas = [outline_area(s) for s in shapes]
    assert all(2000 * 0.99 <= a <= 6000 * 1.01 for a in areas)
    again = deform_outline(outline, np.random.default_rng(3), area_range=(2000, 6000))
    assert np.array_equal(again, shapes[3])
    masks = [_fill(s + 100, (200, 200)) for s in shapes]
    for i in range(20):
        for j in range(i):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.98, (i, j)


def test_shape_composite_mask_is_the_target_and_the_rest_is_the_background():
    rng = np.random.default_rng(1)
    background = rng.integers(120, 200, (256, 256, 3), dtype=np.uint8)
    donor = np.full((120, 120, 3), 230, np.uint8)
    donor_mask = np.zeros((120, 120), np.uint8)
    cv2.circle(donor_mask, (60, 60), 40, 255, -1)
    donor[donor_mask > 0] = (200, 60, 120)
    target = _ellipse(128, 120, 70, 35)
    target_mask = _fill(target, (256, 256)).astype(np.uint8) * 255
    made = prepare_shape_composite(
        background, warp_into_target(donor, donor_mask, target, target_mask, context_ring=6),
        tissue=np.ones((256, 256), bool), seed=0, place=False,
    )
    assert np.array_equal(made.vessel_mask > 0, target_mask > 0)
    grown = cv2.dilate(target_mask, np.ones((15, 15), np.uint8)) > 0
    assert not ((made.mask > 0) & ~grown).any()  # pasted: the outline and its ring only
    outside = made.mask == 0
    assert np.array_equal(made.composite[outside], background[outside])
    with pytest.raises(ValueError, match="covers no pixel"):
        warp_into_target(donor, donor_mask, target, np.zeros((256, 256), np.uint8))


def test_donor_outline_is_the_largest_part():
    mask = np.zeros((100, 100), np.uint8)
    cv2.circle(mask, (30, 30), 20, 255, -1)
    cv2.circle(mask, (80, 80), 5, 255, -1)
    outline = donor_outline(mask)
    assert abs(abs(outline_area(outline)) - np.pi * 20**2) < 0.1 * np.pi * 20**2
    with pytest.raises(ValueError, match="empty"):
        donor_outline(np.zeros((10, 10), np.uint8))
