"""Polygon handling shared by every reader and writer: the areal part of a geometry,
repaired, and the level-0 → tile-pixel transform.

Coordinates are whatever the caller's are (level-0 px for slide annotations, tile px
after :func:`to_tile`); nothing here knows a file format.
"""

from __future__ import annotations

import shapely
from shapely import affinity
from shapely.geometry import GeometryCollection, MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

__all__ = ["polygon_parts", "polygonal", "to_tile"]


def polygon_parts(geometry: BaseGeometry | None) -> list[Polygon]:
    """Every non-empty Polygon inside ``geometry``, collections flattened (no repair)."""
    if geometry is None or geometry.is_empty:
        return []
    if isinstance(geometry, Polygon):
        return [geometry]
    if isinstance(geometry, MultiPolygon | GeometryCollection):
        return [p for part in geometry.geoms for p in polygon_parts(part)]
    return []


def polygonal(geometry: BaseGeometry | None) -> Polygon | MultiPolygon | None:
    """The areal part of ``geometry`` as one valid Polygon / MultiPolygon, or ``None``.

    Invalid input is repaired first (``shapely.make_valid``); points, lines and parts of
    zero area are dropped; several parts are merged (``unary_union``), so the result is
    valid. A valid Polygon / MultiPolygon comes back unchanged.
    """
    if geometry is None or geometry.is_empty:
        return None
    if isinstance(geometry, Polygon | MultiPolygon) and geometry.is_valid:
        return geometry if geometry.area > 0 else None
    if not geometry.is_valid:
        geometry = shapely.make_valid(geometry)
    parts = [p for p in polygon_parts(geometry) if p.area > 0]
    if not parts:
        return None
    merged = parts[0] if len(parts) == 1 else shapely.unary_union(parts)
    if not isinstance(merged, Polygon | MultiPolygon):
        parts = [p for p in polygon_parts(merged) if p.area > 0]
        if not parts:
            return None
        merged = parts[0] if len(parts) == 1 else MultiPolygon(parts)
    return None if merged.is_empty else merged


def to_tile(geometry: BaseGeometry, x0: float, y0: float, scale: float) -> BaseGeometry:
    """``geometry`` (level-0 px) in the pixels of the tile whose corner is (``x0``, ``y0``)
    level-0 px, ``scale`` tile px per level-0 px."""
    return affinity.affine_transform(geometry, [scale, 0, 0, scale, -x0 * scale, -y0 * scale])
