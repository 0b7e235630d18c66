"""The content check, on real H&E (TIAToolbox's sample) and on what must fail: speckle,
the untrained engine's tiles, blur, a hue rotation, a mask off the tissue."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from histosynth.integration.content_check import (
    QC_PASS,
    ContentThresholds,
    calibrate,
    check_tile,
    measure_tile,
    qc_failed,
)
from histosynth.integration.demo.data import he_source_image
from histosynth.integration.masks import tissue_mask

TILE = 256


@pytest.fixture(scope="module")
def he() -> np.ndarray:
    return he_source_image()


def _crops(image: np.ndarray, rows: range, step: int = 120) -> list[np.ndarray]:
    out = []
    for y in rows:
        for x in range(0, image.shape[1] - TILE + 1, step):
            out.append(np.ascontiguousarray(image[y : y + TILE, x : x + TILE]))
    return out


@pytest.fixture(scope="module")
def thresholds(he) -> ContentThresholds:
    """Calibrated on crops of the upper half only (the lower half is for the tests)."""
    return calibrate(_crops(he[:500], range(0, 500 - TILE + 1, 120)))


@pytest.fixture(scope="module")
def held_out(he) -> list[np.ndarray]:
    return _crops(he[500:], range(0, 500 - TILE + 1, 120))


def test_calibration_is_recorded_and_bounded(thresholds) -> None:
    data = thresholds.to_json()
    assert data["real_tiles"] == thresholds.real_tiles >= 8
    assert 0 < data["gamut_min"] <= 0.5
    low, high = data["detail_ratio"]
    assert low <= 0.4 and high >= 2.5
    assert data["real"]["gamut"][0] <= data["real"]["gamut"][1]
    assert ContentThresholds() == calibrate([])  # no real tile: the built-in bounds


def test_held_out_real_tissue_passes(thresholds, held_out) -> None:
    source = held_out[0]
    for tile in held_out:
        verdict = check_tile(tile, thresholds, source=source)
        assert verdict.passed, verdict.cell
        assert verdict.cell == QC_PASS


def test_a_real_vessel_mask_on_its_tissue_passes_and_one_on_glass_fails(he) -> None:
    tile = np.ascontiguousarray(he[600:856, 300:556])
    tissue = tissue_mask(tile)
    mask = np.zeros(tile.shape[:2], np.uint8)
    cv2.circle(mask, (128, 128), 40, 255, -1)
    masked = [(tile, mask, tissue)]
    thresholds = calibrate([tile], masked)
    assert check_tile(tile, thresholds, mask=mask, tissue=tissue).passed
    glass = tile.copy()
    glass[mask > 0] = 245  # the mask now lies on empty glass, a ring of tissue around it
    glass_tissue = np.zeros_like(tissue)
    verdict = check_tile(glass, thresholds, mask=mask, tissue=glass_tissue)
    assert not verdict.passed and "mask on tissue 0.00" in verdict.cell


def _speckle(seed: int) -> np.ndarray:
    """Black, white and cyan blobs: what the embedded engine drew from pure noise."""
    rng = np.random.default_rng(seed)
    palette = np.array([(0, 0, 0), (255, 255, 255), (40, 220, 230), (90, 90, 90)], np.uint8)
    small = palette[rng.integers(0, len(palette), (TILE // 4, TILE // 4))]
    return cv2.resize(small, (TILE, TILE), interpolation=cv2.INTER_NEAREST)


def test_speckle_fails_on_gamut_detail_and_outliers(thresholds, held_out) -> None:
    verdict = check_tile(_speckle(0), thresholds, source=held_out[0])
    assert not verdict.passed
    for reason in ("H&E gamut", "(noise)", "colour outliers"):
        assert reason in verdict.cell
    assert qc_failed(verdict.cell)


def test_a_real_donor_on_a_speckle_background_fails(thresholds, held_out) -> None:
    """What --background synthetic made with the embedded engine: a real vessel pasted
    onto speckle (and colour-matched to it)."""
    tile = _speckle(1)
    donor = held_out[2]
    mask = np.zeros(tile.shape[:2], np.uint8)
    cv2.circle(mask, (128, 128), 60, 255, -1)
    tile[mask > 0] = donor[mask > 0]
    verdict = check_tile(tile, thresholds, source=held_out[3], mask=mask,
                         tissue=tissue_mask(tile))
    assert not verdict.passed and "H&E gamut" in verdict.cell


def test_noise_confined_to_a_seam_band_fails_and_a_soft_seam_passes(thresholds, held_out) -> None:
    """A seam band redrawn as noise is a small part of the tile: its averages hide it, the
    redrawn pixels checked on their own do not. A band redrawn softer (the embedded
    engine's) is not a failure."""
    composite = held_out[4]
    ring = np.zeros(composite.shape[:2], np.uint8)
    cv2.circle(ring, (128, 128), 70, 255, 24)
    band = ring > 0
    rng = np.random.default_rng(3)
    noisy = composite.copy()
    green = np.clip(rng.normal((90, 200, 110), 50, composite.shape), 0, 255).astype(np.uint8)
    noisy[band] = green[band]
    assert check_tile(noisy, thresholds, source=composite).passed  # hidden in the averages
    verdict = check_tile(noisy, thresholds, source=composite, composite=composite)
    assert not verdict.passed and verdict.cell.startswith("fail: seam: H&E gamut")
    soft = composite.copy()
    soft[band] = cv2.GaussianBlur(composite, (0, 0), 2.5)[band]
    assert check_tile(soft, thresholds, source=composite, composite=composite).passed
    assert check_tile(composite, thresholds, source=composite, composite=composite).passed


def test_blur_and_hue_rotation_fail(thresholds, held_out) -> None:
    tile = held_out[1]
    blurred = cv2.GaussianBlur(tile, (0, 0), 3.0)
    assert "(blur)" in check_tile(blurred, thresholds, source=tile).cell
    hsv = cv2.cvtColor(tile, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(int) + 60) % 180  # 120° of hue
    rotated = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    verdict = check_tile(rotated, thresholds, source=tile)
    assert "H&E gamut" in verdict.cell and "(noise)" not in verdict.cell


def test_tiles_of_the_untrained_engine_fail(thresholds, held_out, untrained_engine) -> None:
    pipe = untrained_engine.variation_pipeline()
    pipe.set_progress_bar_config(disable=True)
    tiles = pipe(np.stack(held_out[:2]), seeds=[0, 1], num_inference_steps=3).images
    for tile, source in zip(tiles, held_out[:2], strict=True):
        verdict = check_tile(tile, thresholds, source=source)
        assert not verdict.passed, "the untrained engine's noise passed the content check"


@settings(max_examples=40, deadline=None)
@given(
    image=arrays(np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24), st.just(3))),
    with_mask=st.booleans(),
)
def test_measures_are_shares_and_the_cell_says_pass_or_fail(image, with_mask) -> None:
    mask = (image[..., 0] > 127).astype(np.uint8) * 255 if with_mask else None
    tissue = image[..., 1] > 100 if with_mask else None
    m = measure_tile(image, source=image, mask=mask, tissue=tissue)
    assert 0.0 <= m.gamut <= 1.0 and 0.0 <= m.outliers <= 1.0 and m.detail >= 0
    if m.mask_on_tissue is not None:
        assert 0.0 <= m.mask_on_tissue <= 1.0
    cell = check_tile(image, ContentThresholds(), source=image).cell
    assert cell == QC_PASS or (cell.startswith("fail: ") and qc_failed(cell))


def test_bad_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match="uint8 RGB"):
        measure_tile(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="height and width"):
        measure_tile(np.zeros((8, 8, 3), np.uint8), mask=np.ones((4, 4)), tissue=np.ones((4, 4)))
    assert not qc_failed("") and not qc_failed(None) and not qc_failed("pass")


def _hue_rotated(tile: np.ndarray) -> np.ndarray:
    hsv = cv2.cvtColor(tile, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(int) + 60) % 180
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def test_one_odd_tile_does_not_call_h_and_e_another_stain(held_out) -> None:
    """The stain warning reads the real tiles' median gamut share: one off-gamut tile
    (blood, a hue shift) among H&E tiles lowers the bound but does not warn; slides whose
    tiles are mostly off the gamut do."""
    from histosynth.workflows.synthesize.run_checks import WEAK_GAMUT, stain_warning

    one_odd = calibrate([*held_out[:6], _hue_rotated(held_out[6])])
    assert one_odd.real["gamut"][0] < WEAK_GAMUT <= one_odd.real["gamut_median"]
    assert stain_warning(one_odd) is None
    mostly_odd = calibrate([held_out[0], *(_hue_rotated(t) for t in held_out[1:7])])
    line = stain_warning(mostly_odd)
    assert line is not None and "another stain?" in line and "median share" in line
    assert stain_warning(ContentThresholds(real={"gamut": [0.1, 0.9]})) is not None  # older
