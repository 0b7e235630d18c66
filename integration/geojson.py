"""QuPath-compatible GeoJSON: read what QuPath 0.2–0.7 (and other tools) write, write what
QuPath imports.

Coordinates are full-resolution (level-0) pixels, origin top-left, y down, on both sides.

Reading accepts a FeatureCollection, a single Feature, a bare geometry, or a JSON array of
any of these; every QuPath flavour of object type (``objectType`` 0.4+, ``object_type``
0.3, ``"id": "PathAnnotationObject"`` 0.2, ``type`` alias 0.6+), classification
(``{name, color}``, ``{names, color}``, ``{name, colorRGB}``, ``{parentClass, name,
colorRGB}``, plain string) and measurements (map or list of ``{name, value}``); plain
GeoJSON keeps its class in ``properties.class`` / ``type`` (TIAToolbox) / ``label``.
Any problem with the input raises :class:`InputError` naming the file and the feature;
nothing else escapes :func:`read_annotations`.

Writing (:mod:`histosynth.integration.geojson_write`, its names importable from here as
the public API) produces what ``PathIO.readObjects`` imports without error; the class
colours are :mod:`histosynth.integration.class_colours`'.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from histosynth.integration.annotations import (
    RGB,
    Annotation,
    class_matches,
    normal_class_name,
    of_classes,
)
from histosynth.integration.class_colours import argb_to_rgb, default_color, rgb_to_argb
from histosynth.integration.errors import InputError
from histosynth.integration.files import parse_json, read_input_bytes
from histosynth.integration.geojson_write import (
    finite_float,
    geojson_bytes,
    is_uuid,
    to_feature_collection,
    write_annotations,
)
from histosynth.integration.geometry import polygon_parts, polygonal

log = logging.getLogger(__name__)
# Namespace of the UUIDs given to features that carry none (QuPath 0.2/0.3, other tools).
_ID_NAMESPACE = uuid.UUID("5b1f6c1e-6f0b-4c7e-9d3a-0c2f3e4a5b6d")

__all__ = [
    "argb_to_rgb",
    "class_names",
    "default_color",
    "geojson_bytes",
    "read_annotations",
    "rgb_to_argb",
    "to_feature_collection",
    "write_annotations",
]

# --------------------------------------------------------------------------- reading

# QuPath object types, every spelling its versions wrote, to the 0.4+ name (shared with
# the annotation-store reader).
OBJECT_TYPES = {
    "annotation": "annotation",
    "detection": "detection",
    "cell": "cell",
    "tile": "tile",
    "tmaCore": "tmaCore",
    "tma_core": "tmaCore",
    "root": "root",
}
_LEGACY_TYPE_IDS = {  # QuPath 0.2 put the Java class name in the Feature id
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathTileObject": "tile",
    "TMACoreObject": "tmaCore",
    "PathRootObject": "root",
}
_NON_POLYGONAL = {"Point", "MultiPoint", "LineString", "MultiLineString"}
_GEOMETRY_TYPES = _NON_POLYGONAL | {"Polygon", "MultiPolygon", "GeometryCollection"}
_PLAIN_CLASS_KEYS = ("class", "type", "label")  # class keys of non-QuPath GeoJSON
def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _load(source: str | os.PathLike | dict | list, origin: str | None) -> tuple[Any, str]:
    """Parse ``source`` into a JSON value; returns it with the label used in errors."""
    if isinstance(source, (dict, list)):
        return source, origin or "<geojson>"
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(
            f"expected a GeoJSON file path or a parsed JSON object, got {type(source).__name__}",
            path=origin,
        )
    path = Path(source)
    label = origin or str(path)
    data = read_input_bytes(path, gunzip=True, label=label)
    if not data.strip():
        raise InputError("file is empty, expected GeoJSON", path=label)
    try:
        return parse_json(data, label), label
    except (UnicodeDecodeError, ValueError) as exc:  # not UTF-8 / -16 / -32 text
        raise InputError(f"not valid JSON: {exc}", path=label) from None


def _features(doc: Any, label: str) -> Iterator[tuple[str, dict]]:
    """Yield ``(item label, feature dict)`` for every feature of a GeoJSON document.

    Features are numbered from 0 in file order; a nested collection or array numbers its
    members ``"2.0"``, ``"2.1"``...
    """

    def container_error(what: Any) -> InputError:
        if isinstance(what, dict):
            got = f"an object with type {_short(what.get('type'))}"
        else:
            got = f"a JSON {type(what).__name__}"
        return InputError(
            "not GeoJSON: expected a FeatureCollection, a Feature or an array of "
            f"Features, got {got}",
            path=label,
        )

    def walk(value: Any, index: tuple[int, ...]) -> Iterator[tuple[str, dict]]:
        item = "feature " + (".".join(map(str, index)) or "0")
        if isinstance(value, list):
            for i, member in enumerate(value):
                yield from walk(member, (*index, i))
            return
        if not isinstance(value, dict):
            if not index:
                raise container_error(value)
            raise InputError(
                f"not a GeoJSON Feature but a JSON {type(value).__name__}", path=label, item=item
            )
        kind = value.get("type")
        if not isinstance(kind, str) and kind is not None:
            kind = _short(kind)  # unhashable or odd: only used in messages from here on
        if kind == "FeatureCollection" or (kind is None and "features" in value):
            features = value.get("features")
            if not isinstance(features, list):
                raise InputError(
                    "FeatureCollection has no 'features' array",
                    path=label,
                    item=item if index else None,
                )
            for i, member in enumerate(features):
                yield from walk(member, (*index, i))
        elif kind == "Feature" or (kind is None and "geometry" in value):
            yield (item, value)
        elif kind in _GEOMETRY_TYPES:  # QuPath also imports a bare geometry
            yield (item, {"type": "Feature", "geometry": value})
        elif not index:
            raise container_error(value)
        else:
            raise InputError(f"not a GeoJSON Feature (type {_short(kind)})", path=label, item=item)

    yield from walk(doc, ())


def _item_label(index_label: str, feature: dict) -> str:
    """``"feature 3 (id 5f0c…, name 'Vessel 1')"`` for messages."""
    bits = []
    fid = feature.get("id")
    if isinstance(fid, (str, int)) and not isinstance(fid, bool):
        bits.append(f"id {_short(fid)}")
    props = feature.get("properties")
    name = props.get("name") if isinstance(props, dict) else None
    if isinstance(name, str) and name:
        bits.append(f"name {_short(name)!r}")
    return f"{index_label} ({', '.join(bits)})" if bits else index_label


def _parse_color(value: Any) -> RGB | None:
    """A colour as QuPath writes it: ``[r, g, b]``, ``[r, g, b, a]`` or a packed int."""
    if isinstance(value, list) and len(value) in (3, 4):
        channels = [finite_float(c) for c in value[:3]]
        if all(c is not None and 0 <= c <= 255 for c in channels):
            return tuple(int(c) for c in channels)  # type: ignore[arg-type,return-value]
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return argb_to_rgb(value)
        except (TypeError, ValueError):
            return None
    return None


def _parse_classification(value: Any, label: str, item: str) -> tuple[str | None, RGB | None]:
    """Class name and colour from any classification QuPath 0.2–0.7 writes."""
    if value is None:
        return None, None
    if isinstance(value, str):
        return normal_class_name(value), None
    if isinstance(value, list):  # names only
        if all(isinstance(n, str) for n in value):
            return normal_class_name(": ".join(value)), None
        raise InputError("classification names must be strings", path=label, item=item)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value), None  # e.g. a class index from another tool
    if not isinstance(value, dict):
        raise InputError(f"classification not understood: {_short(value)}", path=label, item=item)
    color = _parse_color(value.get("color", value.get("colorRGB")))
    names = value.get("names")
    name = value.get("name")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InputError(
                "classification 'names' must be an array of strings", path=label, item=item
            )
        return normal_class_name(": ".join(names)), color
    if name is None:
        return None, color  # QuPath's "null class": unclassified
    if not isinstance(name, str):
        raise InputError(
            f"classification name must be a string, got {_short(name)}", path=label, item=item
        )
    parent = value.get("parentClass")  # derived class serialised by Gson before 0.4
    if parent is not None:
        parent_name, _ = _parse_classification(parent, label, item)
        if parent_name:
            name = f"{parent_name}: {name}"
    return normal_class_name(name), color


def _parse_measurements(value: Any) -> dict[str, float]:
    """Finite numeric measurements from a map or a list of ``{name, value}``; others skipped."""
    if isinstance(value, dict):
        pairs: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, list):
        pairs = [(m.get("name"), m.get("value")) for m in value if isinstance(m, dict)]
    else:
        return {}
    result: dict[str, float] = {}
    for key, raw in pairs:
        if not isinstance(key, str):
            continue
        number = finite_float(raw)
        if number is None and isinstance(raw, str):
            try:
                number = float(raw)
            except ValueError:
                number = None
            number = number if number is not None and math.isfinite(number) else None
        if number is not None:
            result[key] = number
        else:
            log.debug("measurement %r skipped: not a finite number (%r)", key, raw)
    return result


class _NotPolygonal(Exception):
    """The geometry has no polygonal part; carries its GeoJSON type."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _ring(value: Any, where: str, label: str, item: str) -> list[tuple[float, float]]:
    if not isinstance(value, list):
        raise InputError(f"{where}: not an array of positions", path=label, item=item)
    points: list[tuple[float, float]] = []
    for j, pos in enumerate(value):
        if not isinstance(pos, list) or len(pos) < 2:
            raise InputError(
                f"{where}, point {j}: not a position [x, y]: {_short(pos)}",
                path=label,
                item=item,
            )
        x, y = finite_float(pos[0]), finite_float(pos[1])
        if x is None or y is None:
            raise InputError(
                f"{where}, point {j}: coordinates must be finite numbers: {_short(pos)}",
                path=label,
                item=item,
            )
        points.append((x, y))
    if len(points) > 1 and points[0] == points[-1]:
        points.pop()
    if len(points) < 3:
        raise InputError(
            f"{where}: a polygon ring needs at least 3 distinct points, got {len(points)}",
            path=label,
            item=item,
        )
    points.append(points[0])
    return points


def _polygon(value: Any, where: str, label: str, item: str) -> Polygon:
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: polygon has no rings", path=label, item=item)
    rings = [_ring(r, f"{where} ring {k}", label, item) for k, r in enumerate(value)]
    return Polygon(rings[0], rings[1:])


def _geometry(value: Any, label: str, item: str) -> BaseGeometry:
    """Shapely (Multi)Polygon from a GeoJSON geometry; raises ``_NotPolygonal``."""
    if value is None:
        raise _NotPolygonal("null")
    if not isinstance(value, dict):
        raise InputError(f"geometry is not an object: {_short(value)}", path=label, item=item)
    kind = value.get("type")
    if kind == "Polygon":
        return _polygon(value.get("coordinates"), "polygon", label, item)
    if kind == "MultiPolygon":
        coords = value.get("coordinates")
        if not isinstance(coords, list) or not coords:
            raise InputError("MultiPolygon has no polygons", path=label, item=item)
        return MultiPolygon(
            [_polygon(p, f"polygon {k}", label, item) for k, p in enumerate(coords)]
        )
    if kind == "GeometryCollection":
        parts = value.get("geometries")
        if not isinstance(parts, list):
            raise InputError("GeometryCollection has no 'geometries' array", path=label, item=item)
        polygons: list[Polygon] = []
        for part in parts:
            try:
                geom = _geometry(part, label, item)
            except _NotPolygonal:
                continue
            polygons.extend(polygon_parts(geom))
        if not polygons:
            raise _NotPolygonal("GeometryCollection")
        return polygons[0] if len(polygons) == 1 else MultiPolygon(polygons)
    raise _NotPolygonal(kind if isinstance(kind, str) else _short(kind))


def _stable_id(index_label: str, feature: dict) -> str:
    """A UUID for a feature that has none, the same on every read of the same document
    (so tile ids built from it survive ``--resume``)."""
    try:
        content = json.dumps(
            [index_label, feature.get("id"), feature.get("geometry"), feature.get("properties")],
            sort_keys=True, default=str,
        )
    except (TypeError, ValueError):
        content = f"{index_label}:{feature.get('id')!r}:{feature.get('geometry')!r}"
    return str(uuid.uuid5(_ID_NAMESPACE, content))


def _selected(class_name: str | None, classes: Sequence[str] | None) -> bool:
    return classes is None or any(class_matches(class_name, wanted) for wanted in classes)


def _parse_feature(
    index_label: str,
    feature: dict,
    label: str,
    classes: Sequence[str] | None,
    out: list[Annotation],
) -> None:
    item = _item_label(index_label, feature)
    raw_props = feature.get("properties")
    if raw_props is None:
        raw_props = {}
    if not isinstance(raw_props, dict):
        raise InputError("'properties' is not an object", path=label, item=item)
    props = dict(raw_props)

    # id and object type
    fid = feature.get("id")
    object_type: str | None = None
    extra: dict[str, Any] = {}
    if isinstance(fid, str) and fid in _LEGACY_TYPE_IDS:
        object_type = _LEGACY_TYPE_IDS[fid]
        ann_id = _stable_id(index_label, feature)
    elif is_uuid(fid):
        ann_id = fid.lower()
    else:
        ann_id = _stable_id(index_label, feature)
        if fid is not None:
            extra["original_id"] = fid
    for key in ("objectType", "object_type"):
        if key in props:
            value = props.pop(key)
            if object_type is None and isinstance(value, str):
                object_type = OBJECT_TYPES.get(value, _LEGACY_TYPE_IDS.get(value))
    type_value = props.get("type")
    if isinstance(type_value, str) and (
        type_value in OBJECT_TYPES or type_value in _LEGACY_TYPE_IDS
    ):  # QuPath 0.6+ reads "type" as an alias of objectType
        props.pop("type")
        if object_type is None:
            object_type = OBJECT_TYPES.get(type_value, _LEGACY_TYPE_IDS.get(type_value))

    # classification
    class_name, color = None, None
    if "classification" in props:
        class_name, color = _parse_classification(props.pop("classification"), label, item)
    else:
        for key in _PLAIN_CLASS_KEYS:
            value = props.get(key)
            if not isinstance(value, (str, dict)) and not (
                isinstance(value, int) and not isinstance(value, bool)
            ):
                continue
            try:
                class_name, color = _parse_classification(value, label, item)
            except InputError:
                continue
            if class_name:
                props.pop(key)
                break

    name = props.pop("name", None)
    if name is not None and not isinstance(name, str):
        name = _short(name, 1000)
    measurements = _parse_measurements(props.pop("measurements", None))
    children = None
    for key in ("childObjects", "children"):
        if isinstance(props.get(key), list):
            children = props.pop(key)
            break

    # geometry: coordinates are checked for every feature, the rest only when selected
    selected = object_type != "root" and _selected(class_name, classes)
    geometry = feature.get("geometry")
    try:
        geom = _geometry(geometry, label, item)
    except _NotPolygonal as exc:
        if selected:
            raise InputError(
                f"geometry type {exc.kind!r} is not a polygon; only Polygon and "
                "MultiPolygon annotations can be used",
                path=label,
                item=item,
            ) from None
        geom = None
    if geom is not None and selected:
        try:
            repaired = polygonal(geom)
        except shapely.errors.GEOSException as exc:
            raise InputError(f"geometry cannot be repaired: {exc}", path=label, item=item) from None
        if repaired is None:
            log.warning("%s: %s: geometry is empty after repair; skipped", label, item)
        else:
            plane = geometry.get("plane") if isinstance(geometry, dict) else None
            if isinstance(plane, dict):
                extra["plane"] = plane
            props.update(extra)
            out.append(
                Annotation(
                    geometry=repaired,
                    class_name=class_name,
                    color=color,
                    id=ann_id,
                    name=name,
                    measurements=measurements,
                    properties=copy.deepcopy(props),
                    object_type=object_type or "annotation",
                )
            )
    for i, child in enumerate(children or []):
        child_label = f"{index_label}/child {i}"
        if not isinstance(child, dict):
            raise InputError("child object is not a JSON object", path=label, item=child_label)
        _parse_feature(child_label, child, label, classes, out)


def read_annotations(
    source: str | os.PathLike | dict | list,
    *,
    classes: Sequence[str] | None = None,
    origin: str | None = None,
) -> list[Annotation]:
    """Annotations from a GeoJSON file (``.geojson``/``.json``, optionally gzipped) or from
    an already parsed JSON value.

    Args:
        source: path, or a parsed FeatureCollection / Feature / array of Features.
        classes: keep only these classes and classes derived from them (``"Vessel"`` keeps
            ``"Vessel: Invasive"``); ``None`` keeps everything.
        origin: name of the source in error messages (default: the path, or
            ``"<geojson>"`` for a parsed value).

    Returns:
        Annotations with geometry in full-resolution pixels, repaired to be valid.

    Raises:
        InputError: for anything wrong with the input (and only InputError), naming the
            file and the feature. A selected feature whose geometry is not polygonal is an
            error; an unselected one is ignored. A feature whose geometry is empty after
            repair is skipped with a warning.
    """
    if isinstance(classes, str):
        classes = [classes]
    doc, label = _load(source, origin)
    result: list[Annotation] = []
    try:
        for index_label, feature in _features(doc, label):
            _parse_feature(index_label, feature, label, classes, result)
    except InputError:
        raise
    except RecursionError:
        raise InputError("GeoJSON is nested too deeply", path=label) from None
    except Exception as exc:  # a last guard: bad input must never escape as another type
        raise InputError(f"cannot read GeoJSON: {type(exc).__name__}: {exc}", path=label) from exc
    if classes is not None:
        result = of_classes(result, classes)
    return result


def class_names(annotations: Iterable[Annotation]) -> list[str]:
    """Sorted unique full class names (``"Vessel: Invasive"``), unclassified left out."""
    return sorted({a.class_name for a in annotations if a.class_name})


