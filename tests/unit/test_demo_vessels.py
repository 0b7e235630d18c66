"""Demo vessels built from real H&E crops (``histosynth.integration.demo.vessels``).

Claims tested: the crop library holds real nuclei (hematoxylin-dense, much denser than
the stroma patches) and eosin-rich stroma, cut once per process; the same seed paints
the same pixels; a painted wall has the high-frequency texture of real tissue (not a
blur); the lumen is brighter than the wall; dark nuclei line the lumen all round;
invasive vessels carry a hematoxylin-dense embolus in the lumen; nothing is painted
outside the vessel's outline (its annotation), whatever the seed, size or position.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.color import rgb2hed

from histosynth.integration.demo.data import (
    _crop_library,
    _quilted_background,
    he_source_image,
)
from histosynth.integration.demo.vessels import (
    CropLibrary,
    build_crop_library,
    paint_tumour,
    paint_vessel,
    random_shape,
)

MPP = 0.25  # µm per px
UM = 1 / MPP  # px per µm
#: Hematoxylin optical density above which a pixel counts as nuclear.
DARK_OD = 0.08


@pytest.fixture(scope="module")
def library() -> CropLibrary:
    return _crop_library()


def _high_frequency(rgb: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean squared ``grey − GaussianBlur(grey, 2 px)``, over ``mask`` where given."""
    grey = rgb.mean(axis=-1).astype(np.float32)
    detail = grey - cv2.GaussianBlur(grey, (0, 0), 2.0)
    return float((detail[mask] ** 2).mean() if mask is not None else (detail**2).mean())


def _fill(vertices: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 mask (h, w) of a polygon given in px (pixel centres at i + 0.5)."""
    mask = np.zeros(size, np.uint8)
    points = np.round((vertices - 0.5) * 16).astype(np.int32)
    cv2.fillPoly(mask, [points], 1, cv2.LINE_8, shift=4)
    return mask


def _painted(
    library: CropLibrary, seed: int, diameter_px: float, *, invasive: bool = False
) -> dict[str, np.ndarray]:
    """A vessel painted into the middle of a real H&E background, with its masks."""
    rng = np.random.default_rng(seed)
    size = int(diameter_px * 1.5) + 24
    background = _quilted_background(size, size, np.random.default_rng(1000 + seed))
    shape = random_shape(rng, diameter_px, 0.05)
    shape.cx = shape.cy = size / 2
    image = background.copy()
    lumen = paint_vessel(image, shape, 0.3, MPP, rng, library, invasive=invasive)
    outer = _fill(shape.outline(), (size, size))
    inner = _fill(lumen, (size, size))
    k = np.ones((7, 7), np.uint8)
    return {
        "image": image,
        "background": background,
        "outer": outer > 0,
        # the wall away from its edges, the lumen away from the lining
        "wall": (cv2.erode(outer, k) > 0) & ~(cv2.dilate(inner, k) > 0),
        "lumen": cv2.erode(inner, np.ones((13, 13), np.uint8)) > 0,
        # ±2 µm round the lumen edge
        "lining": (cv2.dilate(inner, np.ones((17, 17), np.uint8)) > 0)
        & ~(cv2.erode(inner, np.ones((17, 17), np.uint8)) > 0),
        "centre": np.array([shape.cx, shape.cy]),
    }


# ----------------------------------------------------------------------------- the library


def test_library_holds_real_crops(library):
    assert len(library.nuclei) >= 30
    assert len(library.spindle) >= 5 and len(library.tumour) >= 5
    assert len(library.stroma) >= 8
    for nucleus in library.nuclei:
        assert nucleus.rgba.ndim == 3 and nucleus.rgba.shape[2] == 4
        alpha = nucleus.rgba[..., 3]
        assert 0 <= alpha.min() and alpha.max() <= 1 and alpha.max() > 0.5
        # a soft mask, not a pasted rectangle: the crop's border is transparent
        border = np.concatenate([alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]])
        assert border.max() < 0.2
        assert nucleus.length >= 0.9 * nucleus.width  # long axis (by moments) along x
    assert all(n.length >= 1.7 * n.width for n in library.spindle)


def test_nuclei_are_denser_in_hematoxylin_than_stroma(library):
    def od(rgb: np.ndarray) -> np.ndarray:
        return rgb2hed(np.clip(rgb, 0, 255).astype(np.uint8))

    nuclei = [od(n.rgba[..., :3])[..., 0][n.rgba[..., 3] > 0.5].mean() for n in library.nuclei]
    stroma = [od(p) for p in library.stroma]
    nuclei_h = float(np.mean(nuclei))
    stroma_h = float(np.mean([s[..., 0].mean() for s in stroma]))
    stroma_e = float(np.mean([s[..., 1].mean() for s in stroma]))
    assert nuclei_h > 3 * stroma_h
    # stroma is eosin-rich: more eosin than the source's median pixel, and not white
    source_e = float(np.median(rgb2hed(he_source_image())[..., 1]))
    assert stroma_e > source_e
    assert max(float(p.mean()) for p in library.stroma) < 220


def test_library_is_deterministic_and_cut_once(library):
    again = build_crop_library(he_source_image())
    pairs = zip(again.nuclei, library.nuclei, strict=True)
    assert all(np.array_equal(a.rgba, b.rgba) for a, b in pairs)
    assert all(np.array_equal(a, b) for a, b in zip(again.stroma, library.stroma, strict=True))
    assert _crop_library() is library


# ----------------------------------------------------------------------------- a vessel


def test_same_seed_same_pixels(library):
    a = _painted(library, 5, 200)["image"]
    b = _painted(library, 5, 200)["image"]
    c = _painted(library, 6, 200)["image"]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(("seed", "diameter_um"), [(0, 40), (1, 80), (2, 150)])
def test_wall_has_the_texture_of_real_tissue(library, seed, diameter_um):
    """High-frequency energy of the wall within 0.3–3× that of the real source (a
    painted, blurred ring has almost none)."""
    vessel = _painted(library, seed, diameter_um * UM)
    ratio = _high_frequency(vessel["image"], vessel["wall"]) / _high_frequency(he_source_image())
    assert 0.3 < ratio < 3
    blurred = cv2.GaussianBlur(vessel["image"], (0, 0), 3.0)
    assert _high_frequency(blurred, vessel["wall"]) < 0.3 * _high_frequency(
        vessel["image"], vessel["wall"]
    )


@pytest.mark.parametrize(("seed", "diameter_um"), [(0, 40), (3, 100)])
def test_lumen_is_pale_and_the_wall_stained(library, seed, diameter_um):
    vessel = _painted(library, seed, diameter_um * UM)
    image = vessel["image"]
    grey = image.mean(axis=-1)
    assert grey[vessel["lumen"]].mean() > grey[vessel["wall"]].mean() + 40
    # pale plasma, red cells in some of it
    assert np.median(grey[vessel["lumen"]]) > 215
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    assert hsv[..., 1][vessel["wall"]].mean() > 50  # pink, not grey


@pytest.mark.parametrize(("seed", "diameter_um"), [(0, 40), (4, 120)])
def test_dark_nuclei_line_the_lumen(library, seed, diameter_um):
    """Endothelial nuclei: hematoxylin-dark pixels along the lumen edge, in most of
    twelve 30° sectors round the centre, and none in the (non-invasive) lumen."""
    vessel = _painted(library, seed, diameter_um * UM)
    dark = rgb2hed(vessel["image"])[..., 0] > DARK_OD
    lining = vessel["lining"]
    assert dark[lining].mean() > 0.02
    assert dark[vessel["lumen"]].mean() < 0.005
    ys, xs = np.nonzero(lining & dark)
    cx, cy = vessel["centre"] - 0.5
    sectors = np.floor((np.arctan2(ys - cy, xs - cx) + math.pi) / (math.pi / 6)).astype(int)
    assert len(np.unique(sectors % 12)) >= 8


def test_invasive_vessel_holds_a_tumour_embolus(library):
    """Same seed and size: the invasive vessel's lumen is full of hematoxylin-dense
    tumour, the plain vessel's is not; both keep a pale lumen somewhere."""
    plain = _painted(library, 7, 120 * UM)
    invasive = _painted(library, 7, 120 * UM, invasive=True)
    od_plain = rgb2hed(plain["image"])[..., 0][plain["lumen"]]
    od_invasive = rgb2hed(invasive["image"])[..., 0][invasive["lumen"]]
    assert (od_plain > DARK_OD).mean() < 0.005
    assert (od_invasive > DARK_OD).mean() > 0.03
    assert (invasive["image"].mean(axis=-1)[invasive["lumen"]] > 215).mean() > 0.2


def test_tumour_region_crowds_real_nuclei(library):
    rng = np.random.default_rng(2)
    size = 600
    image = _quilted_background(size, size, np.random.default_rng(9))
    before = image.copy()
    shape = random_shape(rng, 400, 0.12)
    shape.cx = shape.cy = size / 2
    paint_tumour(image, shape, MPP, rng, library)
    inside = cv2.erode(_fill(shape.outline(), (size, size)), np.ones((5, 5), np.uint8)) > 0
    outside = ~(cv2.dilate(_fill(shape.outline(), (size, size)), np.ones((7, 7))) > 0)
    od_before = rgb2hed(before)[..., 0]
    od_after = rgb2hed(image)[..., 0]
    assert od_after[inside].mean() > 1.2 * od_before[inside].mean()
    assert np.array_equal(image[outside], before[outside])


# ----------------------------------------------------------------------------- properties


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    diameter=st.floats(8, 260),
    wall=st.floats(0.15, 0.45),
    offset=st.tuples(st.floats(-0.6, 0.6), st.floats(-0.6, 0.6)),
    invasive=st.booleans(),
)
def test_vessel_stays_inside_its_annotation(seed, diameter, wall, offset, invasive):
    """For any seed, size, wall and position (even partly off the image) painting never
    raises, changes nothing beyond the outline's bounding box dilated by 2 px, and
    returns a lumen outline inside the vessel's outline."""
    library = _crop_library()  # cached; not a fixture, which hypothesis would print
    rng = np.random.default_rng(seed)
    size = 300
    image = np.full((size, size, 3), 200, np.uint8)
    shape = random_shape(rng, diameter, 0.05)
    shape.cx = size / 2 + offset[0] * size
    shape.cy = size / 2 + offset[1] * size
    lumen = paint_vessel(image, shape, wall, MPP, rng, library, invasive=invasive)
    changed = np.nonzero((image != 200).any(axis=-1))
    if changed[0].size:
        minx, miny, maxx, maxy = shape.bounds()
        assert changed[1].min() >= math.floor(minx) - 2
        assert changed[1].max() <= math.ceil(maxx) + 2
        assert changed[0].min() >= math.floor(miny) - 2
        assert changed[0].max() <= math.ceil(maxy) + 2
    centre = np.array([shape.cx, shape.cy])
    rho, _ = shape.rho(lumen[:, 0], lumen[:, 1])
    assert lumen.shape[1] == 2 and np.all(rho < 1.0)
    assert np.all(np.isfinite(lumen - centre))
