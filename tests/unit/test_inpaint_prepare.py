"""prepare_composite: orientation → rotation → placement → colour → composite, end to end
on the real H&E image, then the seam blend.

Claims tested: the output mask is exactly the rotated donor mask pasted at the placement;
the composite is the background outside it and the (recoloured) donor inside; existing
annotations are never overlapped; the same seed gives identical arrays and record while
different seeds vary; the rotation follows the orientation rule; with any "generated"
image the final tile equals the composite beyond 4σ from the seam; clear errors.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from histosynth.integration.demo.data import he_source_image
from histosynth.integration.masks import tissue_mask
from histosynth.synthesis.inpaint import (
    CompositeResult,
    fill_holes,
    prepare_composite,
    rotate_donor,
    seam_blend,
    seam_weights,
)

HE = he_source_image()


def donor_crop(h: int = 90, w: int = 110, angle: float = 25.0, at=(560, 620)):
    image = np.ascontiguousarray(HE[at[0] : at[0] + h, at[1] : at[1] + w])
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (w // 2, h // 2), (w // 2 - 6, h // 2 - 10), angle, 0, 360, 255, -1)
    return image, mask


def check_result(res: CompositeResult, background: np.ndarray, existing=None) -> None:
    H, W = background.shape[:2]
    p = res.placement
    h, w = res.donor_mask.shape
    assert (p.width, p.height) == (w, h)
    assert res.composite.shape == background.shape and res.composite.dtype == np.uint8
    assert res.mask.shape == (H, W) and res.mask.dtype == np.uint8
    assert set(np.unique(res.mask)) <= {0, 255}
    expected = np.zeros((H, W), bool)
    expected[p.y : p.y + h, p.x : p.x + w] = res.donor_mask > 0
    np.testing.assert_array_equal(res.mask > 0, expected)
    np.testing.assert_array_equal(res.composite[~expected], background[~expected])
    inside = res.donor_mask > 0
    np.testing.assert_array_equal(
        res.composite[p.y : p.y + h, p.x : p.x + w][inside], res.donor_image[inside]
    )
    if existing is not None:
        assert not (expected & (existing > 0)).any()
    assert 0.0 <= res.rotation_deg < 360.0
    if res.phi_donor is not None and res.phi_target is not None:
        base = (res.phi_donor - res.phi_target) % 360.0
        assert min(abs(res.rotation_deg - base), abs(res.rotation_deg - (base + 180) % 360)) < 1e-6


def test_end_to_end_on_a_real_tile() -> None:
    background = np.ascontiguousarray(HE[:256, :256])
    donor, mask = donor_crop()
    existing = np.zeros((256, 256), np.uint8)
    cv2.circle(existing, (128, 128), 50, 255, -1)
    res = prepare_composite(
        background, donor, mask, existing=existing, seed=11, tissue=tissue_mask(background)
    )
    assert res is not None
    check_result(res, background, existing)
    assert res.colour_reference == "local"
    # the output mask is the rotated donor mask (a rotation of the input, cropped tight)
    _, rotated = rotate_donor(donor, mask, res.rotation_deg, margin=0)
    np.testing.assert_array_equal(res.donor_mask, rotated)
    record = res.record()
    assert record["x"] == res.placement.x and record["rotation_deg"] == res.rotation_deg
    assert record["seed"] == 11
    assert {"penalty", "tissue_fraction", "colour_difference"} <= set(record)


def test_same_seed_same_result_different_seeds_differ() -> None:
    background = np.ascontiguousarray(HE[300:556, 100:356])
    donor, mask = donor_crop()
    a = prepare_composite(background, donor, mask, seed=5, tissue=tissue_mask(background))
    b = prepare_composite(background, donor, mask, seed=5, tissue=tissue_mask(background))
    assert a is not None and b is not None
    for name in ("composite", "mask", "donor_image", "donor_mask"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.record() == b.record()
    others = [
        prepare_composite(background, donor, mask, seed=s, tissue=tissue_mask(background))
        for s in range(6)
    ]
    signatures = {(r.placement.x, r.placement.y, r.rotation_deg) for r in others if r}
    assert len(signatures) > 1


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    origin=st.tuples(st.integers(0, 800), st.integers(0, 800)),
    donor=st.tuples(st.integers(30, 120), st.integers(30, 120), st.floats(0, 180)),
    blob=st.tuples(st.integers(0, 199), st.integers(0, 199), st.integers(5, 60)),
    seed=st.integers(0, 2**31 - 1),
    rotate=st.booleans(),
    sigma=st.floats(3.0, 15.0),
)
def test_prepared_composite_properties(origin, donor, blob, seed, rotate, sigma) -> None:
    background = np.ascontiguousarray(HE[origin[0] : origin[0] + 200, origin[1] : origin[1] + 200])
    image, mask = donor_crop(donor[0], donor[1], donor[2], at=(1000 - donor[0], 0))
    existing = np.zeros((200, 200), np.uint8)
    cv2.circle(existing, (blob[0], blob[1]), blob[2], 255, -1)
    res = prepare_composite(
        background,
        image,
        mask,
        existing=existing,
        seed=seed,
        rotate=rotate,
        tissue=tissue_mask(background),
    )
    if res is None:
        return
    check_result(res, background, existing)
    if not rotate:
        assert res.rotation_deg == 0.0 and res.phi_donor is None
    # the seam blend with any generated image keeps the composite far from the seam
    generated = np.random.default_rng(seed).integers(0, 256, background.shape, dtype=np.uint8)
    final = seam_blend(res.composite, generated, seam_weights(res.mask, sigma))
    inside = res.mask > 0
    seam_distance = ndimage.distance_transform_edt(inside) + ndimage.distance_transform_edt(~inside)
    far = seam_distance > 4 * sigma
    np.testing.assert_array_equal(final[far], res.composite[far])


def test_a_1024_tile() -> None:
    background = np.ascontiguousarray(np.pad(HE, ((12, 12), (12, 12), (0, 0)), mode="symmetric"))
    donor, mask = donor_crop(260, 240, 40.0, at=(600, 100))
    existing = np.zeros((1024, 1024), np.uint8)
    cv2.circle(existing, (300, 700), 150, 255, -1)
    res = prepare_composite(
        background, donor, mask, existing=existing, seed=0, tissue=tissue_mask(background)
    )
    assert res is not None
    check_result(res, background, existing)
    assert res.phi_donor is not None and res.phi_target is not None
    assert res.placement.tissue_fraction >= 0.5


def test_nothing_fits_gives_none() -> None:
    background = np.ascontiguousarray(HE[:128, :128])
    donor, mask = donor_crop(60, 60)
    existing = np.full((128, 128), 255, np.uint8)
    assert (
        prepare_composite(
            background, donor, mask, existing=existing, seed=0, tissue=tissue_mask(background)
        )
        is None
    )


def test_errors() -> None:
    background = np.ascontiguousarray(HE[:128, :128])
    donor, mask = donor_crop(60, 60)
    big = np.ascontiguousarray(HE[:200, :150])
    with pytest.raises(ValueError, match="larger than the background tile"):
        prepare_composite(
            background,
            big,
            np.full((200, 150), 255, np.uint8),
            seed=0,
            tissue=tissue_mask(background),
        )
    with pytest.raises(ValueError, match="donor mask is empty"):
        prepare_composite(
            background, donor, np.zeros_like(mask), seed=0, tissue=tissue_mask(background)
        )
    glass = np.full((128, 128, 3), 245, np.uint8)
    with pytest.raises(ValueError, match="no tissue"):
        prepare_composite(glass, donor, mask, seed=0, tissue=tissue_mask(glass))
    with pytest.raises(ValueError, match="does not match"):
        prepare_composite(background, donor, mask[:30], seed=0, tissue=tissue_mask(background))
    with pytest.raises(ValueError, match="existing annotations"):
        prepare_composite(
            background,
            donor,
            mask,
            existing=np.zeros((10, 10), bool),
            seed=0,
            tissue=tissue_mask(background),
        )
    with pytest.raises(ValueError, match="uint8 RGB"):
        prepare_composite(
            background.astype(np.float32), donor, mask, seed=0, tissue=tissue_mask(background)
        )


def test_a_large_donor_mask_in_a_larger_crop_is_cropped_first() -> None:
    background = np.ascontiguousarray(HE[:128, :128])
    crop = np.ascontiguousarray(HE[:300, :300])
    mask = np.zeros((300, 300), np.uint8)
    cv2.circle(mask, (150, 150), 25, 255, -1)
    res = prepare_composite(background, crop, mask, seed=1, tissue=tissue_mask(background))
    assert res is not None and max(res.donor_mask.shape) <= 55
    check_result(res, background)


@pytest.mark.parametrize("ring", [0, 6, 14])
def test_a_context_ring_pastes_the_vessel_with_its_own_tissue(ring: int) -> None:
    """``mask`` (the seam) is the vessel grown by the ring within the crop, ``vessel_mask``
    the vessel alone, placed at the same spot; without a ring the two are equal."""
    background = np.ascontiguousarray(HE[:256, :256])
    donor, mask = donor_crop()
    res = prepare_composite(
        background,
        donor,
        mask,
        seed=3,
        context_ring=ring,
        rotate=False,
        tissue=tissue_mask(background),
    )
    assert res is not None
    check_result(res, background)
    vessel, pasted = res.vessel_mask > 0, res.mask > 0
    assert vessel.sum() == (mask > 0).sum()  # no rotation: the vessel's own pixels
    assert (vessel <= pasted).all()
    if ring == 0:
        np.testing.assert_array_equal(vessel, pasted)
    else:
        disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * ring + 1, 2 * ring + 1))
        grown = cv2.dilate(vessel.astype(np.uint8), disc) > 0
        assert (pasted <= grown).all()  # the ring, as far as the donor's crop reaches
        in_crop = cv2.dilate((mask > 0).astype(np.uint8), disc) > 0  # donor coordinates
        assert pasted.sum() == in_crop.sum()
        # the donor's own tissue is what lies in the ring, not the background
        ring_px = pasted & ~vessel
        assert not np.array_equal(res.composite[ring_px], background[ring_px])
    rotated = prepare_composite(
        background, donor, mask, seed=3, context_ring=ring, tissue=tissue_mask(background)
    )
    assert rotated is not None and (rotated.vessel_mask > 0).sum() > 0.9 * (mask > 0).sum()
    assert ((rotated.vessel_mask > 0) <= (rotated.mask > 0)).all()


def test_the_ring_leaves_out_what_the_donor_excludes() -> None:
    """A neighbouring vessel in the donor's crop (``donor_exclude``) is not pasted along."""
    background = np.ascontiguousarray(HE[:256, :256])
    donor, mask = donor_crop()
    neighbour = np.zeros_like(mask)
    neighbour[:, : mask.shape[1] // 3] = 255  # the left third of the crop
    neighbour[mask > 0] = 0
    common = {"seed": 3, "context_ring": 10, "rotate": False}
    whole = prepare_composite(background, donor, mask, **common, tissue=tissue_mask(background))
    cut = prepare_composite(
        background, donor, mask, donor_exclude=neighbour, **common, tissue=tissue_mask(background)
    )
    assert whole is not None and cut is not None
    assert (cut.vessel_mask > 0).sum() == (whole.vessel_mask > 0).sum() == (mask > 0).sum()
    assert (cut.mask > 0).sum() < (whole.mask > 0).sum()
    # what was cut is exactly the ring inside the excluded region
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (21, 21))
    ring = (cv2.dilate((mask > 0).astype(np.uint8), disc) > 0) & (mask == 0)
    assert (whole.mask > 0).sum() - (cut.mask > 0).sum() == (ring & (neighbour > 0)).sum()
    with pytest.raises(ValueError, match="donor_exclude"):
        prepare_composite(
            background,
            donor,
            mask,
            donor_exclude=neighbour[:10],
            **common,
            tissue=tissue_mask(background),
        )


@pytest.mark.parametrize("ring", [0, 10])
def test_a_vessel_annotated_as_a_ring_is_pasted_with_its_lumen(ring: int) -> None:
    """A wall annotation with its lumen as a hole: the pasted region holds the lumen (the
    donor's pixels, not the background), the vessel mask stays the wall alone."""
    background = np.ascontiguousarray(HE[:256, :256])
    donor, mask = donor_crop()
    wall = mask.copy()
    cy, cx = (int(v.mean()) for v in np.nonzero(mask))
    cv2.circle(wall, (cx, cy), 12, 0, -1)
    res = prepare_composite(
        background,
        donor,
        wall,
        seed=3,
        context_ring=ring,
        rotate=False,
        tissue=tissue_mask(background),
    )
    assert res is not None
    check_result(res, background)
    vessel, pasted = res.vessel_mask > 0, res.mask > 0
    assert vessel.sum() == (wall > 0).sum()  # the annotation's own pixels
    lumen = fill_holes(vessel) & ~vessel
    assert lumen.sum() > 300 and pasted[lumen].all()
    ys, xs = np.nonzero(lumen)
    px, py = res.placement.x, res.placement.y
    # the donor's lumen pixels, colour-matched: they differ from the background there
    assert not np.array_equal(res.composite[lumen], background[lumen])
    assert (ys.min() >= py) and (xs.min() >= px)


def test_the_donor_tissue_turns_with_the_donor_and_gives_its_colour() -> None:
    background = np.ascontiguousarray(HE[:256, :256])
    donor, mask = donor_crop()
    pale = donor.copy()
    pale[:, : donor.shape[1] // 2] = 245  # half the crop is glass
    common = {"seed": 3, "tissue": tissue_mask(background), "context_ring": 0}
    given = prepare_composite(background, pale, mask, donor_tissue=tissue_mask(pale), **common)
    every = prepare_composite(background, pale, mask, **common)
    assert given is not None and every is not None
    check_result(given, background)
    assert given.rotation_deg == every.rotation_deg != 0  # turned, as the donor was
    # measured on its tissue only, the donor's colour is nearer the background's tissue
    assert given.placement.colour_difference < every.placement.colour_difference
    with pytest.raises(ValueError, match="donor tissue"):
        prepare_composite(background, pale, mask, donor_tissue=np.ones((5, 5), bool), **common)
