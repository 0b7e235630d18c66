"""Masks: polygons rasterised onto a tile's pixel grid, and tissue detection.

Tile pixel (i, j) (row, column) covers the square ``[j, j+1) × [i, i+1)`` of tile
coordinates; a level-0 point (x, y) lies at tile coordinates
``((x - origin_x) · scale, (y - origin_y) · scale)`` with ``scale = slide_mpp / tile_mpp``
(tile pixels per level-0 pixel).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import cv2
import numpy as np
import shapely
from shapely.geometry import GeometryCollection, MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

__all__ = ["mask_to_polygons", "rasterize", "tissue_mask", "union_mask"]

#: Otsu's saturation threshold is clipped to this range (fractions of full saturation):
#: the floor keeps a blank (white) tile free of tissue, the ceiling keeps pale stroma in
#: a tile that is all tissue (where Otsu would split tissue from tissue).
SATURATION_RANGE = (0.08, 0.20)


def _polygons(geometry: BaseGeometry) -> Iterable[Polygon]:
    if geometry is None or geometry.is_empty:
        return
    if isinstance(geometry, Polygon):
        yield geometry
    elif isinstance(geometry, (MultiPolygon, GeometryCollection)):
        for part in geometry.geoms:
            if isinstance(part, (Polygon, MultiPolygon, GeometryCollection)):
                yield from _polygons(part)
    else:
        raise TypeError(f"cannot rasterise a {geometry.geom_type}; expected polygons")


def _fill_polygon(
    out: np.ndarray, polygon: Polygon, origin: tuple[float, float], scale: float
) -> None:
    """OR into ``out`` the pixels whose centre lies inside ``polygon`` (even-odd over its
    rings, so holes are cleared)."""
    height, width = out.shape
    ox, oy = origin
    starts, ends = [], []
    for ring in (polygon.exterior, *polygon.interiors):
        coords = np.asarray(ring.coords, dtype=float)
        if len(coords) < 3:
            continue
        pts = np.empty_like(coords[:, :2])
        pts[:, 0] = (coords[:, 0] - ox) * scale
        pts[:, 1] = (coords[:, 1] - oy) * scale
        starts.append(pts[:-1])
        ends.append(pts[1:])
    if not starts:
        return
    p0, p1 = np.concatenate(starts), np.concatenate(ends)
    if not (np.isfinite(p0).all() and np.isfinite(p1).all()):
        raise ValueError("polygon has non-finite coordinates")
    # pixel centres: x = j + 0.5, y = i + 0.5; an edge crosses row i when its
    # half-open y-range [ymin, ymax) contains i + 0.5
    ymin = np.minimum(p0[:, 1], p1[:, 1])
    ymax = np.maximum(p0[:, 1], p1[:, 1])
    row_first = np.clip(np.ceil(ymin - 0.5), 0, height).astype(np.int64)
    row_stop = np.clip(np.ceil(ymax - 0.5), 0, height).astype(np.int64)
    counts = row_stop - row_first
    keep = counts > 0
    if not keep.any():
        return
    p0, p1 = p0[keep], p1[keep]
    row_first, counts = row_first[keep], counts[keep]
    edge = np.repeat(np.arange(len(counts)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    rows = row_first[edge] + offsets
    x0, y0 = p0[edge, 0], p0[edge, 1]
    x1, y1 = p1[edge, 0], p1[edge, 1]
    yc = rows + 0.5
    xc = x0 + (yc - y0) * (x1 - x0) / (y1 - y0)
    # crossing at x toggles inside/outside for every pixel whose centre is right of it
    cols = np.clip(np.ceil(xc - 0.5), 0, width).astype(np.int64)
    r0, r1 = int(rows.min()), int(rows.max()) + 1
    c0, c1 = int(cols.min()), int(cols.max())
    if c1 <= c0:
        return
    span = c1 - c0 + 1
    toggles = np.bincount((rows - r0) * span + (cols - c0), minlength=(r1 - r0) * span)
    parity = np.cumsum(toggles.reshape(r1 - r0, span), axis=1) & 1
    out[r0:r1, c0:c1] |= parity[:, : c1 - c0].astype(bool)


def rasterize(
    geometries: Iterable[BaseGeometry] | BaseGeometry,
    *,
    origin: tuple[float, float],
    scale: float,
    shape: tuple[int, int],
) -> np.ndarray:
    """Binary mask (uint8, 0 / 255) of the union of polygons on a tile's pixel grid.

    Args:
        geometries: shapely ``Polygon`` / ``MultiPolygon`` (or a collection of them) in
            level-0 pixels; holes are excluded, overlaps are a union.
        origin: tile's top-left corner in level-0 pixels.
        scale: tile pixels per level-0 pixel (``slide_mpp / tile_mpp``).
        shape: (height, width) of the tile in pixels.

    A pixel is set when its centre lies inside the geometry, so axis-aligned rectangles
    on pixel edges are exact and the area error of other shapes is a boundary effect.
    """
    height, width = (int(v) for v in shape)
    if height < 0 or width < 0:
        raise ValueError(f"shape must be non-negative, not {shape!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, not {scale!r}")
    out = np.zeros((height, width), dtype=bool)
    if isinstance(geometries, BaseGeometry):
        geometries = [geometries]
    if height and width:
        for geometry in geometries:
            for polygon in _polygons(geometry):
                _fill_polygon(out, polygon, origin, scale)
    return out.astype(np.uint8) * 255


def _remove_small(mask: np.ndarray, min_area: int) -> np.ndarray:
    """``mask`` without its 8-connected components smaller than ``min_area`` pixels."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8
    )
    if count <= 1:
        return mask
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False
    return keep[labels]


def tissue_mask(
    rgb: np.ndarray,
    *,
    saturation_threshold: float | None = None,
    min_area_px: int = 256,
    closing_px: int = 3,
) -> np.ndarray:
    """Boolean mask of tissue in an RGB brightfield image (True = tissue).

    Tissue is stained, background glass is not: pixels whose HSV saturation exceeds the
    threshold are tissue; then a morphological closing (disk of radius ``closing_px``),
    holes smaller than ``min_area_px`` filled and pieces smaller than ``min_area_px``
    removed.

    Args:
        rgb: (H, W, 3) uint8 RGB (an alpha channel is ignored).
        saturation_threshold: in [0, 1]; ``None`` uses Otsu's threshold of the image,
            clipped to ``SATURATION_RANGE`` so that a blank tile has no tissue.
        min_area_px: smallest piece of tissue (and largest hole filled), in pixels.
        closing_px: radius in pixels of the closing that joins nearby tissue.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    rgb = rgb[:, :, :3]
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB, got {rgb.dtype}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        return np.zeros(rgb.shape[:2], dtype=bool)
    saturation = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[:, :, 1]
    saturation = cv2.GaussianBlur(saturation, (0, 0), 1.0)
    if saturation_threshold is None:
        otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        low, high = SATURATION_RANGE
        threshold = float(np.clip(otsu / 255.0, low, high))
    else:
        threshold = float(saturation_threshold)
        if not 0 <= threshold <= 1:
            raise ValueError(f"saturation_threshold must be in [0, 1], not {threshold!r}")
    mask = saturation > threshold * 255
    if closing_px > 0:
        kernel = cv2.getStructuringElement(
            cv2.MORPH_ELLIPSE, (2 * closing_px + 1, 2 * closing_px + 1)
        )
        # pad so the closing does not erode tissue that touches the border
        padded = cv2.copyMakeBorder(
            mask.astype(np.uint8), closing_px, closing_px, closing_px, closing_px,
            cv2.BORDER_REPLICATE,
        )
        closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel)
        mask = closed[closing_px:-closing_px, closing_px:-closing_px].astype(bool)
    if min_area_px > 1:
        mask = ~_remove_small(~mask, min_area_px)  # fill small holes
        mask = _remove_small(mask, min_area_px)
    return mask


def union_mask(*masks: np.ndarray) -> np.ndarray:
    """The pixels non-zero in any of ``masks`` (same shape), as a uint8 0 / 255 mask."""
    if not masks:
        raise ValueError("union_mask needs at least one mask")
    shape = np.shape(masks[0])
    union = np.zeros(shape, dtype=bool)
    for mask in masks:
        if np.shape(mask) != shape:
            raise ValueError(f"mask shapes differ: {np.shape(mask)} vs {shape}")
        union |= np.asarray(mask) > 0
    return union.astype(np.uint8) * np.uint8(255)


def mask_to_polygons(mask: np.ndarray) -> Polygon | MultiPolygon | None:
    """The exact outline of a tile mask's non-zero pixels, in tile pixel coordinates.

    Each pixel (i, j) is the unit square ``[j, j+1) × [i, i+1)``; the result is the union
    of those squares (holes kept, pixel edges as boundaries), so
    ``rasterize([mask_to_polygons(m)], origin=(0, 0), scale=1, shape=m.shape)`` gives
    ``m`` back exactly. ``None`` for an empty mask.
    """
    from shapely import union_all

    binary = np.asarray(mask) != 0
    if binary.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {binary.shape}")
    if not binary.any():
        return None
    # runs of set pixels per row: a rectangle each, merged by one union
    padded = np.zeros((binary.shape[0], binary.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = binary
    edges = np.diff(padded, axis=1)
    rows_start, cols_start = np.nonzero(edges == 1)
    rows_end, cols_end = np.nonzero(edges == -1)
    boxes = shapely.box(cols_start, rows_start, cols_end, rows_end + 1)
    merged = union_all(boxes).simplify(0)
    if isinstance(merged, GeometryCollection):
        merged = MultiPolygon([g for g in merged.geoms if isinstance(g, Polygon)])
    return merged
