"""Writing QuPath-importable GeoJSON: what ``PathIO.readObjects`` imports without error —
UUID ids, ``objectType``, a classification that always carries a ``color``, measurements as
a map of finite numbers, other properties as QuPath's string→string ``metadata``.
Coordinates are level-0 pixels unless an offset / scale moves them (e.g. to tile px).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np
import shapely
from shapely.geometry import GeometryCollection, MultiPolygon, Polygon, box
from shapely.geometry.base import BaseGeometry

from histosynth.common.files import atomic_write_bytes
from histosynth.integration.annotations import Annotation, normal_class_name
from histosynth.integration.class_colours import default_color
from histosynth.integration.geometry import polygonal

__all__ = ["geojson_bytes", "to_feature_collection", "write_annotations"]

#: QuPath object types a Feature may carry when written
WRITABLE_TYPES = {"annotation", "detection", "cell", "tile"}
_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)


def is_uuid(value: Any) -> bool:
    """True for a canonical UUID string (any case)."""
    return isinstance(value, str) and bool(_UUID_RE.fullmatch(value))


def is_real(value: Any) -> bool:
    """True for a real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def finite_float(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` (NaN, infinity, too large, not a number)."""
    if type(value) is float:  # the common case (parsed JSON), without the ABC checks
        return value if math.isfinite(value) else None
    if not is_real(value):
        return None
    try:
        result = float(value)
    except (OverflowError, ValueError, TypeError):
        return None
    return result if math.isfinite(result) else None


_RESERVED_PROPERTIES = {
    "objectType",
    "object_type",
    "classification",
    "name",
    "measurements",
    "metadata",
    "color",
    "isLocked",
    "plane",
}


def _metadata_string(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return None


def _metadata(annotation: Annotation, ann_id: str) -> dict[str, str]:
    """QuPath's string→string metadata: ``properties["metadata"]`` first, then the rest."""
    result: dict[str, str] = {}
    own = annotation.properties.get("metadata")
    if isinstance(own, dict):
        for key, value in own.items():
            text = _metadata_string(value)
            if text is not None:
                result[str(key)] = text
    for key, value in annotation.properties.items():
        if key in _RESERVED_PROPERTIES or str(key) in result:
            continue
        text = _metadata_string(value)
        if text is not None:
            result[str(key)] = text
    if ann_id != annotation.id and "original_id" not in result and annotation.id:
        result["original_id"] = str(annotation.id)
    return result


def _ring_coords(ring: Any) -> list[list[float]]:
    """The ring's (x, y) rounded to 0.01 px (``+ 0.0`` turns -0.0 into 0.0), closed."""
    coords = (np.round(shapely.get_coordinates(ring), 2) + 0.0).tolist()
    if coords and coords[0] != coords[-1]:
        coords.append(coords[0])
    return coords


def _polygon_coords(polygon: Polygon) -> list[list[list[float]]]:
    return [_ring_coords(polygon.exterior)] + [_ring_coords(r) for r in polygon.interiors]


def _geometry_json(geom: BaseGeometry) -> dict[str, Any]:
    if isinstance(geom, Polygon):
        return {"type": "Polygon", "coordinates": _polygon_coords(geom)}
    return {"type": "MultiPolygon", "coordinates": [_polygon_coords(p) for p in geom.geoms]}


def _output_geometry(
    geom: BaseGeometry,
    offset: tuple[float, float],
    scale: float,
    clip: Polygon | None,
) -> BaseGeometry | None:
    """Transform, clip and snap to QuPath's 0.01 px grid; ``None`` when nothing is left."""
    if not isinstance(geom, (Polygon, MultiPolygon, GeometryCollection)):
        raise ValueError(f"annotation geometry must be polygonal, got {geom.geom_type}")
    geom = polygonal(geom)
    if geom is None:
        return None
    ox, oy = offset
    geom = shapely.transform(geom, lambda xy: (xy - (ox, oy)) * scale)
    if clip is not None:
        geom = polygonal(geom.intersection(clip))
        if geom is None:
            return None
    geom = polygonal(shapely.set_precision(geom, 0.01))
    if geom is not None and not all(math.isfinite(v) for v in geom.bounds):
        raise ValueError("annotation geometry has non-finite coordinates")
    return geom


def _rgb_list(color: Any) -> list[int] | None:
    if isinstance(color, (list, tuple)) and len(color) == 3:
        try:
            return [int(c) for c in color] if all(0 <= int(c) <= 255 for c in color) else None
        except (TypeError, ValueError):
            return None
    return None


def to_feature_collection(
    annotations: Iterable[Annotation],
    *,
    offset: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    clip_to: tuple[float, float, float, float] | None = None,
) -> dict[str, Any]:
    """A GeoJSON FeatureCollection that QuPath (0.4+) imports without error.

    Coordinates are written as ``((x - offset_x) * scale, (y - offset_y) * scale)``, e.g.
    level-0 pixels → tile pixels with ``offset`` = the tile's top-left corner (level-0 px)
    and ``scale`` = level-0 px per tile px inverted. ``clip_to`` = (minx, miny, maxx,
    maxy) in OUTPUT coordinates clips every geometry to that box; features left empty are
    dropped. Coordinates are rounded to 0.01 px like QuPath.

    Raises ``ValueError`` for a non-positive or non-finite ``scale``, or an annotation
    whose geometry is not polygonal (a programming error, not a user one).
    """
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    offset = (float(offset[0]), float(offset[1]))
    clip = None
    if clip_to is not None:
        minx, miny, maxx, maxy = (float(v) for v in clip_to)
        if not (minx < maxx and miny < maxy):
            raise ValueError(f"clip_to must be (minx, miny, maxx, maxy), got {clip_to}")
        clip = box(minx, miny, maxx, maxy)
    features = []
    for annotation in annotations:
        geom = _output_geometry(annotation.geometry, offset, scale, clip)
        if geom is None:
            continue
        ann_id = annotation.id.lower() if is_uuid(annotation.id) else str(uuid.uuid4())
        object_type = annotation.object_type
        props: dict[str, Any] = {
            "objectType": object_type if object_type in WRITABLE_TYPES else "annotation"
        }
        if annotation.name:
            props["name"] = str(annotation.name)
        object_color = _rgb_list(annotation.properties.get("color"))
        if object_color is not None:
            props["color"] = object_color
        class_name = normal_class_name(annotation.class_name) if annotation.class_name else None
        if class_name:
            color = _rgb_list(annotation.color) or list(default_color(class_name))
            props["classification"] = {"name": class_name, "color": color}
        if annotation.properties.get("isLocked") is True:
            props["isLocked"] = True
        measurements = {
            str(k): v
            for k, v in ((k, finite_float(v)) for k, v in annotation.measurements.items())
            if v is not None
        }
        if measurements:
            props["measurements"] = measurements
        metadata = _metadata(annotation, ann_id)
        if metadata:
            props["metadata"] = metadata
        geometry = _geometry_json(geom)
        plane = annotation.properties.get("plane")
        if isinstance(plane, dict) and all(
            isinstance(plane.get(k), int) and not isinstance(plane.get(k), bool)
            for k in ("c", "z", "t")
        ):
            geometry["plane"] = {k: plane[k] for k in ("c", "z", "t")}
        features.append(
            {"type": "Feature", "id": ann_id, "geometry": geometry, "properties": props}
        )
    return {"type": "FeatureCollection", "features": features}


def write_annotations(
    path: str | os.PathLike,
    annotations: Iterable[Annotation],
    *,
    offset: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    clip_to: tuple[float, float, float, float] | None = None,
) -> None:
    """Write :func:`to_feature_collection` of ``annotations`` to ``path`` atomically."""
    atomic_write_bytes(path, geojson_bytes(annotations, offset=offset, scale=scale,
                                           clip_to=clip_to))


def geojson_bytes(
    annotations: Iterable[Annotation],
    *,
    offset: tuple[float, float] = (0.0, 0.0),
    scale: float = 1.0,
    clip_to: tuple[float, float, float, float] | None = None,
) -> bytes:
    """UTF-8 bytes of the file :func:`write_annotations` writes (for writers that batch I/O)."""
    collection = to_feature_collection(annotations, offset=offset, scale=scale, clip_to=clip_to)
    text = json.dumps(collection, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return (text + "\n").encode("utf-8")
