"""Rasterising polygons onto tiles, and tissue detection on real H&E."""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from shapely import affinity
from shapely.geometry import LineString, MultiPolygon, Point, Polygon, box

from histosynth.integration.demo.data import he_source_image
from histosynth.integration.masks import rasterize, tissue_mask

# ----------------------------------------------------------------------------- helpers


def centre_reference(geometry, origin, scale, shape) -> np.ndarray:
    """Pixels whose centre lies inside ``geometry`` (shapely's own point test)."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    xs = (cols + 0.5) / scale + origin[0]
    ys = (rows + 0.5) / scale + origin[1]
    return shapely.contains_xy(geometry, xs, ys)


def near_boundary(geometry, origin, scale, shape, eps=1e-6) -> np.ndarray:
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    points = shapely.points((cols + 0.5) / scale + origin[0], (rows + 0.5) / scale + origin[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        return shapely.distance(geometry.boundary, points) * scale < eps


coordinate = st.floats(-20, 120, allow_nan=False, allow_infinity=False)


@st.composite
def polygons(draw):
    """Valid polygons (possibly with holes) from random points, repaired by shapely."""
    points = draw(st.lists(st.tuples(coordinate, coordinate), min_size=3, max_size=12))
    geometry = shapely.make_valid(Polygon(points))
    parts = [g for g in getattr(geometry, "geoms", [geometry]) if g.geom_type == "Polygon"]
    assume(parts)
    polygon = max(parts, key=lambda g: g.area)
    if draw(st.booleans()) and polygon.area > 200:
        hole = polygon.centroid.buffer(math.sqrt(polygon.area) / 6)
        polygon = polygon.difference(hole)
    assume(not polygon.is_empty and polygon.area > 0)
    return polygon


origins = st.tuples(st.floats(-10, 10), st.floats(-10, 10))
scales = st.floats(0.25, 3.0)


# ----------------------------------------------------------------------------- rasterize


@settings(max_examples=120, deadline=None)
@given(polygon=polygons(), origin=origins, scale=scales)
def test_pixel_centre_rule(polygon, origin, scale):
    """A pixel is set exactly when its centre is inside (holes cleared)."""
    shape = (60, 70)
    mask = rasterize([polygon], origin=origin, scale=scale, shape=shape)
    expected = centre_reference(polygon, origin, scale, shape)
    undecided = near_boundary(polygon, origin, scale, shape)
    assert np.array_equal((mask > 0) & ~undecided, expected & ~undecided)


@settings(max_examples=150, deadline=None)
@given(
    centre=st.tuples(st.floats(30, 70), st.floats(30, 70)),
    radii=st.tuples(st.floats(6, 40), st.floats(6, 40)),
    angle=st.floats(0, 180),
    scale=scales,
)
def test_area_error_is_a_boundary_effect(centre, radii, angle, scale):
    """|pixels - area| is bounded by the boundary: only pixels the outline crosses can
    be wrong, and a polygon edge of length l crosses at most sqrt(2)·l + 1 pixels."""
    ellipse = affinity.rotate(
        affinity.scale(Point(centre).buffer(1.0, 32), radii[0], radii[1]), angle
    )
    tile = ellipse.buffer(5).bounds
    origin = (tile[0], tile[1])
    shape = (
        math.ceil((tile[3] - tile[1]) * scale) + 1,
        math.ceil((tile[2] - tile[0]) * scale) + 1,
    )
    mask = rasterize(ellipse, origin=origin, scale=scale, shape=shape)
    area = ellipse.area * scale**2
    assume(area > 100)
    perimeter = ellipse.length * scale
    edges = len(ellipse.exterior.coords) - 1
    pixels = np.count_nonzero(mask)
    assert abs(pixels - area) <= math.sqrt(2) * perimeter + edges


@pytest.mark.parametrize("diameter_um", [30, 45, 60, 120, 180, 300])
@pytest.mark.parametrize("aspect", [1.0, 1.7])
def test_vessel_sized_ellipses_within_one_percent(diameter_um, aspect):
    """Vessels of the demo sizes (0.25 µm/px slide) in a 0.5 µm/px tile: area within 1 %."""
    slide_mpp, tile_mpp = 0.25, 0.5
    radius = diameter_um / slide_mpp / 2
    ellipse = affinity.rotate(
        affinity.scale(Point(2000.3, 1500.7).buffer(1.0, 64), radius * math.sqrt(aspect),
                       radius / math.sqrt(aspect)),
        33,
    )
    scale = slide_mpp / tile_mpp
    origin = (2000.3 - 1024, 1500.7 - 1024)
    mask = rasterize([ellipse], origin=origin, scale=scale, shape=(1024, 1024))
    area_px = ellipse.area * scale**2
    assert abs(np.count_nonzero(mask) - area_px) <= 0.01 * area_px


@settings(max_examples=150, deadline=None)
@given(
    x0=st.integers(-30, 80),
    y0=st.integers(-30, 80),
    w=st.integers(1, 60),
    h=st.integers(1, 60),
    ox=st.integers(-20, 20),
    oy=st.integers(-20, 20),
)
def test_integer_rectangles_are_exact(x0, y0, w, h, ox, oy):
    shape = (64, 72)
    mask = rasterize([box(x0, y0, x0 + w, y0 + h)], origin=(ox, oy), scale=1.0, shape=shape)
    expected = np.zeros(shape, dtype=np.uint8)
    r0, r1 = max(y0 - oy, 0), max(y0 + h - oy, 0)
    c0, c1 = max(x0 - ox, 0), max(x0 + w - ox, 0)
    expected[r0:r1, c0:c1] = 255
    assert np.array_equal(mask, expected)


def test_scaled_rectangle_on_pixel_edges():
    # level-0 box 1010..1050 × 2020..2100 in a tile at origin (1000, 2000), 0.5 tile px / px
    mask = rasterize([box(1010, 2020, 1050, 2100)], origin=(1000, 2000), scale=0.5, shape=(64, 64))
    expected = np.zeros((64, 64), dtype=np.uint8)
    expected[10:50, 5:25] = 255
    assert np.array_equal(mask, expected)


def test_holes_are_subtracted_and_islands_kept():
    outer = box(10, 10, 90, 90)
    donut = outer.difference(box(30, 30, 70, 70))
    island = box(40, 40, 60, 60)
    mask = rasterize([MultiPolygon([donut, island])], origin=(0, 0), scale=1.0, shape=(100, 100))
    assert np.count_nonzero(mask) == 80 * 80 - 40 * 40 + 20 * 20
    assert mask[35, 35] == 0 and mask[50, 50] == 255 and mask[15, 15] == 255


def test_overlaps_are_a_union_whatever_the_order():
    donut = box(0, 0, 60, 60).difference(box(20, 20, 40, 40))
    inside_hole = box(25, 25, 35, 35)
    overlapping = box(50, 50, 80, 80)
    a = rasterize([donut, inside_hole, overlapping], origin=(0, 0), scale=1, shape=(90, 90))
    b = rasterize([overlapping, inside_hole, donut], origin=(0, 0), scale=1, shape=(90, 90))
    assert np.array_equal(a, b)
    union = shapely.union_all([donut, inside_hole, overlapping])
    assert np.count_nonzero(a) == round(union.area)


def test_output_is_binary_uint8_of_the_asked_shape():
    mask = rasterize([Point(20, 10).buffer(7.3)], origin=(0.5, 0.25), scale=1.3, shape=(33, 47))
    assert mask.shape == (33, 47)
    assert mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 255}


def test_geometry_outside_the_tile_gives_zeros():
    far = [box(500, 500, 600, 600), box(-100, -100, -10, -10), box(20, 70, 30, 90)]
    mask = rasterize(far, origin=(0, 0), scale=1.0, shape=(64, 64))
    assert mask.shape == (64, 64) and not mask.any()
    assert not rasterize([], origin=(0, 0), scale=1.0, shape=(8, 8)).any()
    assert rasterize([box(0, 0, 10, 10)], origin=(0, 0), scale=1.0, shape=(0, 5)).shape == (0, 5)


def test_partly_outside_is_clipped():
    mask = rasterize([box(-50, -50, 10, 10)], origin=(0, 0), scale=1.0, shape=(20, 20))
    assert np.count_nonzero(mask) == 100


def test_non_polygons_are_refused():
    with pytest.raises(TypeError):
        rasterize([LineString([(0, 0), (5, 5)])], origin=(0, 0), scale=1.0, shape=(8, 8))
    with pytest.raises(ValueError):
        rasterize([box(0, 0, 1, 1)], origin=(0, 0), scale=0.0, shape=(8, 8))


# ----------------------------------------------------------------------------- tissue


@pytest.fixture(scope="module")
def he():
    return he_source_image()


def test_tissue_on_real_he(he):
    mask = tissue_mask(he)
    assert mask.dtype == bool and mask.shape == he.shape[:2]
    assert mask.mean() > 0.85


def test_no_tissue_on_white():
    white = np.full((256, 320, 3), 255, np.uint8)
    assert not tissue_mask(white).any()
    noise = np.random.default_rng(0).integers(0, 12, white.shape)
    glass = (white.astype(int) - noise).astype(np.uint8)  # near-white with sensor noise
    assert tissue_mask(glass).mean() < 0.001


def test_white_rectangle_is_not_tissue(he):
    image = he.copy()
    image[300:600, 200:550] = (248, 248, 246)
    mask = tissue_mask(image)
    assert mask[305:595, 205:545].mean() < 0.01
    outside = np.ones(mask.shape, bool)
    outside[280:620, 180:570] = False
    assert mask[outside].mean() > 0.85


def test_background_beside_tissue(he):
    image = np.full((600, 1000, 3), 245, np.uint8)
    image[:, :500] = he[:600, :500]
    mask = tissue_mask(image)
    assert mask[:, :490].mean() > 0.85
    assert mask[:, 510:].mean() < 0.01


def test_explicit_threshold(he):
    assert not tissue_mask(he, saturation_threshold=1.0).any()
    assert tissue_mask(he, saturation_threshold=0.0, min_area_px=1).mean() > 0.99
    with pytest.raises(ValueError):
        tissue_mask(he, saturation_threshold=2.0)


def test_small_specks_are_removed(he):
    image = np.full((200, 200, 3), 250, np.uint8)
    image[50:54, 50:54] = (120, 40, 140)  # 16 px of stain: dust, not tissue
    image[100:160, 100:160] = he[:60, :60]
    mask = tissue_mask(image, min_area_px=100)
    assert not mask[45:60, 45:60].any()
    assert mask[110:150, 110:150].mean() > 0.8


# ----------------------------------------------------------------------------- vectorising

from histosynth.integration.masks import mask_to_polygons  # noqa: E402


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(4, 40), st.integers(4, 40))
def test_mask_to_polygons_round_trips_exactly(seed, h, w):
    rng = np.random.default_rng(seed)
    mask = (rng.random((h, w)) < rng.uniform(0.05, 0.95)).astype(np.uint8) * 255
    geometry = mask_to_polygons(mask)
    if not mask.any():
        assert geometry is None
        return
    assert geometry.is_valid
    assert geometry.area == pytest.approx((mask > 0).sum())
    again = rasterize([geometry], origin=(0, 0), scale=1.0, shape=mask.shape)
    assert np.array_equal(again, mask)


def test_mask_to_polygons_keeps_holes():
    mask = np.zeros((20, 20), np.uint8)
    mask[2:18, 2:18] = 255
    mask[8:12, 8:12] = 0
    geometry = mask_to_polygons(mask)
    assert isinstance(geometry, Polygon) and len(geometry.interiors) == 1
    assert geometry.area == 16 * 16 - 4 * 4


def test_union_mask_is_any_of_its_masks():
    from histosynth.integration.masks import union_mask

    a = np.zeros((4, 5), np.uint8)
    a[1, 1] = 255
    b = np.zeros((4, 5), bool)
    b[2, 3] = True
    out = union_mask(a, b)
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 255}
    assert out[1, 1] == out[2, 3] == 255 and out.sum() == 2 * 255
    with pytest.raises(ValueError, match="shapes differ"):
        union_mask(a, b[:2])
