"""Real demo and test data built from the H&E image that ships inside TIAToolbox.

No download: the 1000 × 1000 H&E ``tiatoolbox/data/target_image.png`` is quilted to a
slide of any size, vessels built from real crops of the same image (a stroma wall warped
round a pale lumen, real endothelial and smooth-muscle nuclei, red cells, tumour emboli
in invasive vessels; see ``demo.vessels``) are put in at seeded positions, and the result is
written as a real pyramidal OME-TIFF (tifffile) that TIAToolbox and QuPath open. The
vessels' outlines are returned as annotations in level-0 pixels, and can be written as
every flavour of GeoJSON QuPath has produced, or as a QuPath project.

>>> slide = build_demo_slide("demo.ome.tif")                       # doctest: +SKIP
>>> project_file = build_demo_project("project", slide=slide)      # doctest: +SKIP

Used by the tests and by ``histosynth demo``.

Size: the demo builder writes each QuPath GeoJSON flavour (0.2–0.7) and a project of
every version the tests read; vessels are painted in ``demo/vessels.py``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from histosynth.common.files import atomic_write_json, atomic_write_text
from histosynth.integration.annotations import Annotation, class_parts
from histosynth.integration.class_colours import default_color, rgb_to_argb
from histosynth.integration.demo.vessels import (
    CropLibrary,
    Shape,
    build_crop_library,
    paint_tumour,
    paint_vessel,
    random_shape,
)
from histosynth.integration.errors import InputError
from histosynth.integration.qupath.classes import SKETCH_CLASS, SKETCH_COLOUR
from histosynth.integration.qupath.server import bioformats_server_builder
from histosynth.integration.qupath.uris import path_to_uri
from histosynth.integration.tiff import (
    tiff_levels,
    write_pyramidal_ome_tiff,
    write_uncalibrated_tiff,
)

__all__ = [
    "CLASS_INVASIVE",
    "CLASS_TUMOR",
    "CLASS_VESSEL",
    "GEOJSON_VARIANTS",
    "DemoSlide",
    "build_demo_project",
    "build_demo_slide",
    "he_source_image",
    "write_pyramidal_ome_tiff",
    "write_qupath_geojson_variants",
    "write_uncalibrated_tiff",
]

CLASS_VESSEL = "Vessel"
CLASS_INVASIVE = "Vessel: Invasive"
CLASS_TUMOR = "Tumor"
#: outlines an annotator drew for new vessels (``synthesize --mode shape --shapes drawn``)
CLASS_SKETCH = SKETCH_CLASS
#: sketches per demo slide, and their diameters (µm): lobed outlines no donor has
DEMO_SKETCHES = 2
SKETCH_DIAMETERS_UM = (90.0, 150.0)

#: Names of the GeoJSON flavours written by :func:`write_qupath_geojson_variants`.
GEOJSON_VARIANTS = (
    "v0.4_feature_collection",
    "v0.4_feature_array",
    "v0.4_single_feature",
    "v0.3",
    "v0.2",
    "derived_names",
    "joined_name",
    "plain",
)

# QuPath's default class list of a new project (classifiers/classes.json), signed ARGB.
_QUPATH_DEFAULT_CLASSES = [
    ("Tumor", -3670016),
    ("Stroma", -6895466),
    ("Immune cells", -6268256),
    ("Necrosis", -13487566),
    ("Other", -14336),
    ("Region*", -16777036),
    ("Ignore*", -4934476),
    ("Positive", -377282),
    ("Negative", -9408287),
]


# ----------------------------------------------------------------------------- pixels


@lru_cache(maxsize=1)
def _he_image() -> np.ndarray:
    spec = importlib.util.find_spec("tiatoolbox")
    if spec is None or not spec.origin:
        raise InputError(
            "TIAToolbox is not installed; its bundled H&E image is needed for demo data",
            item="tiatoolbox/data/target_image.png",
        )
    path = Path(spec.origin).parent / "data" / "target_image.png"
    image = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
    if image is None:
        raise InputError(
            "TIAToolbox's bundled H&E image is missing or unreadable; reinstall tiatoolbox",
            path=path,
        )
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    rgb.setflags(write=False)
    return rgb


def he_source_image() -> np.ndarray:
    """TIAToolbox's bundled H&E image (``tiatoolbox/data/target_image.png``), uint8 RGB
    (1000, 1000, 3). A fresh copy on each call."""
    return _he_image().copy()


# ----------------------------------------------------------------------------- vessels


@dataclass
class DemoSlide:
    """A demo slide on disk and its annotations.

    Attributes:
        path: the pyramidal OME-TIFF.
        mpp: µm per level-0 pixel.
        width, height: level-0 size in pixels.
        annotations: vessels (``"Vessel"``, ``"Vessel: Invasive"``) and a ``"Tumor"``
            region, geometry in level-0 pixels.
    """

    path: Path
    mpp: float
    width: int
    height: int
    annotations: list[Annotation] = field(default_factory=list)

    def of_class(self, class_name: str) -> list[Annotation]:
        """Annotations whose class is exactly ``class_name``."""
        return [a for a in self.annotations if a.class_name == class_name]


def _polygon(vertices: np.ndarray) -> Polygon:
    return Polygon(np.round(vertices, 2))


@lru_cache(maxsize=1)
def _crop_library() -> CropLibrary:
    """Real nuclei, stroma, red-cell and lumen crops of the source H&E, cut once."""
    return build_crop_library(_he_image())


@dataclass
class _Plan:
    """One object to place: diameter (µm), class, role."""

    diameter_um: float
    class_name: str
    role: str = ""  # "border", "pair", "hole", "tumour" or ""
    name: str | None = None
    required: bool = False


_PLANS = [
    # required first (they must fit even on a small slide), then the rest, largest first
    _Plan(45, CLASS_VESSEL, "border", required=True),
    _Plan(40, CLASS_VESSEL, "pair", required=True),
    _Plan(60, CLASS_INVASIVE, required=True),
    _Plan(220, CLASS_TUMOR, "tumour", name="Tumour region", required=True),
    _Plan(300, CLASS_VESSEL, name="Artery"),
    _Plan(180, CLASS_INVASIVE),
    _Plan(120, CLASS_VESSEL),
    _Plan(80, CLASS_VESSEL, "hole", name="Vessel wall (lumen excluded)"),
    _Plan(30, CLASS_VESSEL),
]


@dataclass
class _Room:
    """Where the demo objects go: the slide's size (level-0 px), the gap kept between
    objects (px) and the objects placed so far."""

    width: int
    height: int
    gap: float
    placed: list[Shape] = field(default_factory=list)

    def fits(self, shape: Shape, *others: Shape) -> bool:
        """Whether ``shape`` lies 2 px inside the slide and ``gap`` px clear of every
        placed object and of ``others``."""
        minx, miny, maxx, maxy = shape.bounds()
        if minx < 2 or miny < 2 or maxx > self.width - 2 or maxy > self.height - 2:
            return False
        return all(
            math.hypot(shape.cx - o.cx, shape.cy - o.cy) >= shape.radius + o.radius + self.gap
            for o in [*self.placed, *others]
        )


def _place(shape: Shape, rng: np.random.Generator, room: _Room, tries: int = 400) -> bool:
    """Put ``shape`` at a random place where it fits (at most ``tries`` draws)."""
    r, width, height = shape.radius, room.width, room.height
    if 2 * r + 4 > min(width, height):
        return False
    for _ in range(tries):
        shape.cx = float(rng.uniform(r + 2, width - r - 2))
        shape.cy = float(rng.uniform(r + 2, height - r - 2))
        if room.fits(shape):
            return True
    return False


def _place_at_border(shape: Shape, rng: np.random.Generator, room: _Room) -> bool:
    """Put ``shape`` 4–12 px from one of the slide's edges."""
    width, height = room.width, room.height
    for _ in range(400):
        side = int(rng.integers(4))
        shape.cx, shape.cy = 0.0, 0.0
        minx, miny, maxx, maxy = shape.bounds()
        offset = float(rng.uniform(4, 12))
        if side == 0:  # left
            shape.cx = offset - minx
            shape.cy = float(rng.uniform(-miny + 2, height - maxy - 2))
        elif side == 1:  # top
            shape.cy = offset - miny
            shape.cx = float(rng.uniform(-minx + 2, width - maxx - 2))
        elif side == 2:  # right
            shape.cx = width - offset - maxx
            shape.cy = float(rng.uniform(-miny + 2, height - maxy - 2))
        else:  # bottom
            shape.cy = height - offset - maxy
            shape.cx = float(rng.uniform(-minx + 2, width - maxx - 2))
        if room.fits(shape):
            return True
    return False


def _place_pair(
    first: Shape, second: Shape, rng: np.random.Generator, room: _Room, tile_extent: float
) -> bool:
    """Place two vessels close enough to share one tile of ``tile_extent`` level-0 px."""
    for _ in range(400):
        if not _place(first, rng, room, tries=50):
            continue
        for _ in range(50):
            distance = first.radius + second.radius + room.gap * rng.uniform(1.0, 3.0)
            t = rng.uniform(0, 2 * math.pi)
            second.cx = first.cx + distance * math.cos(t)
            second.cy = first.cy + distance * math.sin(t)
            if not room.fits(second, first):
                continue
            a, b = first.bounds(), second.bounds()
            minx, miny = min(a[0], b[0]), min(a[1], b[1])
            maxx, maxy = max(a[2], b[2]), max(a[3], b[3])
            if maxx - minx <= 0.8 * tile_extent and maxy - miny <= 0.8 * tile_extent:
                return True
    return False


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


#: Side of the real H&E patches a demo background is quilted from, and their overlap (px).
QUILT_PATCH, QUILT_OVERLAP = 384, 96


def _quilt_weight(size: int, overlap: int) -> np.ndarray:
    """A patch's blending weight: 1 inside, a raised-cosine ramp over ``overlap`` px at
    each edge (neighbouring ramps sum to 1, so the weights of the quilt sum to 1)."""
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap, dtype=np.float32) + 0.5) / overlap)
    line = np.ones(size, np.float32)
    line[:overlap], line[size - overlap :] = ramp, ramp[::-1]
    return np.outer(line, line)


def _quilted_background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """``width`` × ``height`` of real H&E without mirror symmetry: patches of the source
    image at random places, each turned by a random multiple of 90° and maybe flipped,
    laid on a grid with overlaps and blended with raised-cosine weights."""
    source = _he_image()
    size, overlap = QUILT_PATCH, QUILT_OVERLAP
    step = size - overlap
    cols = max(1, math.ceil((width - overlap) / step))
    rows = max(1, math.ceil((height - overlap) / step))
    full_w, full_h = cols * step + overlap, rows * step + overlap
    total = np.zeros((full_h, full_w, 3), np.float32)
    weights = np.zeros((full_h, full_w), np.float32)
    weight = _quilt_weight(size, overlap)
    sh, sw = source.shape[:2]
    for r in range(rows):
        for c in range(cols):
            y, x = int(rng.integers(0, sh - size + 1)), int(rng.integers(0, sw - size + 1))
            patch = np.rot90(source[y : y + size, x : x + size], int(rng.integers(4)))
            if rng.random() < 0.5:
                patch = patch[:, ::-1]
            ys, xs = slice(r * step, r * step + size), slice(c * step, c * step + size)
            total[ys, xs] += patch.astype(np.float32) * weight[..., None]
            weights[ys, xs] += weight
    out = total / np.maximum(weights, 1e-6)[..., None]
    return np.ascontiguousarray(np.clip(np.rint(out[:height, :width]), 0, 255).astype(np.uint8))


def _layout(
    rng: np.random.Generator, width: int, height: int, mpp: float
) -> list[tuple[Shape, _Plan]] | None:
    """Seeded positions of the demo objects, or ``None`` when a required one does not fit."""
    room = _Room(width, height, 12.0 / mpp)
    tile_extent = 512.0 / mpp
    layout: list[tuple[Shape, _Plan]] = []
    for plan in _PLANS:
        diameter = plan.diameter_um / mpp
        if plan.role == "tumour":
            diameter = min(diameter, 0.3 * min(width, height))
        shape = random_shape(rng, diameter, 0.12 if plan.role == "tumour" else 0.05)
        shapes = [shape]
        if plan.role == "border":
            ok = _place_at_border(shape, rng, room)
        elif plan.role == "pair":
            shapes.append(random_shape(rng, 35 / mpp, 0.05))
            ok = _place_pair(shape, shapes[1], rng, room, tile_extent)
        else:
            ok = _place(shape, rng, room)
        if not ok:
            if plan.required:
                return None
            continue
        room.placed.extend(shapes)
        layout.extend((one, plan) for one in shapes)
    return layout


def build_demo_slide(
    path: str | os.PathLike,
    *,
    width: int = 4096,
    height: int = 3072,
    mpp: float = 0.25,
    seed: int = 0,
) -> DemoSlide:
    """Build a demo slide (pyramidal OME-TIFF at ``path``) and its annotations.

    The H&E background is quilted from randomly turned real patches (no mirror symmetry)
    to ``width`` × ``height`` level-0 pixels at ``mpp`` µm/px, and vessels are painted in
    at seeded, non-overlapping positions: equivalent diameters 30–300 µm, classes
    ``"Vessel"`` and ``"Vessel: Invasive"``, one vessel 4–12 px from a slide edge, two
    small vessels close enough to share one 512 µm tile (1024 px at 0.5 µm/px), one
    vessel annotated with its lumen as a hole, and a ``"Tumor"`` region that is not a
    vessel. Vessels that do not fit a small slide are left out (the border vessel, the
    pair, one invasive vessel and the tumour always fit from 1024 × 768 px at 0.25
    µm/px). Same seed, same slide and annotations.
    """
    if width < 256 or height < 256:
        raise ValueError(f"demo slide must be at least 256 × 256 px, not {width} × {height}")
    rng = np.random.default_rng(seed)
    image = _quilted_background(width, height, rng)
    for attempt in range(50):
        layout = _layout(np.random.default_rng([seed, attempt]), width, height, mpp)
        if layout is not None:
            break
    else:
        raise ValueError(
            f"cannot place the demo objects on a {width} × {height} px slide at {mpp} µm/px; "
            "make it larger"
        )
    annotations = [_paint_and_annotate(image, shape, plan, mpp, rng) for shape, plan in layout]
    annotations += _sketches(
        np.random.default_rng([seed, 97]), [shape for shape, _ in layout], width, height, mpp
    )
    order = {CLASS_VESSEL: 0, CLASS_INVASIVE: 1, CLASS_TUMOR: 2, CLASS_SKETCH: 3}
    annotations.sort(key=lambda a: order.get(a.class_name or "", 3))
    write_pyramidal_ome_tiff(path, image, mpp=mpp)
    return DemoSlide(Path(path), mpp, width, height, annotations)


def _sketches(
    rng: np.random.Generator, placed: list[Shape], width: int, height: int, mpp: float
) -> list[Annotation]:
    """Up to :data:`DEMO_SKETCHES` lobed outlines of class ``Vessel sketch`` on free tissue
    (drawn, not painted: where an annotator wants a new vessel), 40 µm clear of every
    object and 20 µm inside the slide's edges."""
    room = _Room(width, height, 40.0 / mpp, list(placed))
    edge = 20.0 / mpp
    sketches = []
    for _ in range(DEMO_SKETCHES):
        diameter = float(rng.uniform(*SKETCH_DIAMETERS_UM)) / mpp
        shape = random_shape(rng, diameter, 0.35)
        low, high = edge + shape.radius, (width - edge - shape.radius, height - edge - shape.radius)
        if high[0] <= low or high[1] <= low:
            break
        for _ in range(400):
            shape.cx, shape.cy = float(rng.uniform(low, high[0])), float(rng.uniform(low, high[1]))
            if room.fits(shape):
                break
        else:
            continue
        room.placed.append(shape)
        sketches.append(
            Annotation(
                geometry=_polygon(shape.outline()),
                class_name=CLASS_SKETCH,
                color=SKETCH_COLOUR,
                id=_uuid(rng),
            )
        )
    return sketches


def _paint_and_annotate(
    image: np.ndarray, shape: Shape, plan: _Plan, mpp: float, rng: np.random.Generator
) -> Annotation:
    lumen = None
    if plan.role == "tumour":
        paint_tumour(image, shape, mpp, rng, _crop_library())
    else:
        # thicker walls on larger vessels (arteries), thin on capillary-sized ones
        wall = float(np.clip(rng.uniform(0.18, 0.3) + plan.diameter_um / 1500, 0.15, 0.45))
        invasive = plan.class_name == CLASS_INVASIVE
        lumen = paint_vessel(image, shape, wall, mpp, rng, _crop_library(), invasive=invasive)
    geometry: BaseGeometry = _polygon(shape.outline())
    if plan.role == "hole" and lumen is not None:
        hole = _polygon(lumen)
        geometry = Polygon(geometry.exterior.coords, [hole.exterior.coords])
    area_um2 = round(geometry.area * mpp * mpp, 2)
    return Annotation(
        geometry=geometry,
        class_name=plan.class_name,
        color=default_color(plan.class_name),
        id=_uuid(rng),
        name=plan.name,
        measurements={"Area µm^2": area_um2},
    )


# ----------------------------------------------------------------------------- GeoJSON


def _num(value: float) -> float | int:
    """A coordinate as QuPath writes it: at most 2 decimals, integers without '.0'."""
    rounded = round(float(value), 2)
    return int(rounded) if rounded.is_integer() else rounded


def _ring(coords: Any) -> list[list[float | int]]:
    return [[_num(x), _num(y)] for x, y, *_ in coords]


def _geometry_json(geometry: BaseGeometry) -> dict[str, Any]:
    def polygon(p: Polygon) -> list[list[list[float | int]]]:
        return [_ring(p.exterior.coords), *(_ring(r.coords) for r in p.interiors)]

    if isinstance(geometry, Polygon):
        return {"type": "Polygon", "coordinates": polygon(geometry)}
    if isinstance(geometry, MultiPolygon):
        return {"type": "MultiPolygon", "coordinates": [polygon(p) for p in geometry.geoms]}
    raise ValueError(f"cannot write a {geometry.geom_type} annotation")


def _rgb(annotation: Annotation) -> list[int]:
    color = annotation.color or default_color(annotation.class_name or "")
    return [int(c) for c in color]


def _class_v04(annotation: Annotation, *, force_names: bool = False) -> dict[str, Any]:
    """``PathClassTypeAdapter`` (0.4+): ``name`` for a single class, ``names`` for a
    derived one; always a ``color``."""
    parts = class_parts(annotation.class_name)
    if len(parts) == 1 and not force_names:
        return {"name": parts[0], "color": _rgb(annotation)}
    return {"names": parts, "color": _rgb(annotation)}


def _class_gson(parts: list[str], argb: int, parent_argb: list[int]) -> dict[str, Any]:
    """Gson's default serialisation of a ``PathClass`` (before 0.4): parent first."""
    out: dict[str, Any] = {}
    if len(parts) > 1:
        out["parentClass"] = _class_gson(parts[:-1], parent_argb[-1], parent_argb[:-1])
    out["name"] = parts[-1]
    out["colorRGB"] = argb
    return out


def _class_legacy(annotation: Annotation) -> dict[str, Any]:
    parts = class_parts(annotation.class_name)
    parents = [rgb_to_argb(default_color(": ".join(parts[:i]))) for i in range(1, len(parts))]
    return _class_gson(parts, rgb_to_argb(_rgb(annotation)), parents)


def _feature_v04(annotation: Annotation, *, force_names: bool = False) -> dict[str, Any]:
    properties: dict[str, Any] = {"objectType": annotation.object_type or "annotation"}
    if annotation.name is not None:
        properties["name"] = annotation.name
    if annotation.class_name:
        properties["classification"] = _class_v04(annotation, force_names=force_names)
    if annotation.measurements:
        properties["measurements"] = dict(annotation.measurements)
    return {
        "type": "Feature",
        "id": annotation.id,
        "geometry": _geometry_json(annotation.geometry),
        "properties": properties,
    }


def _feature_joined(annotation: Annotation) -> dict[str, Any]:
    feature = _feature_v04(annotation)
    if annotation.class_name:
        feature["properties"]["classification"] = {
            "name": ": ".join(class_parts(annotation.class_name)),
            "color": _rgb(annotation),
        }
    return feature


def _measurement_list(annotation: Annotation) -> list[dict[str, Any]]:
    return [{"name": k, "value": v} for k, v in annotation.measurements.items()]


def _feature_v03(annotation: Annotation) -> dict[str, Any]:
    """``PathObjectTypeAdapter`` of QuPath 0.3: ``object_type``, no id, Gson classes,
    ``isLocked`` always, measurements as a list when not empty."""
    properties: dict[str, Any] = {"object_type": annotation.object_type or "annotation"}
    if annotation.name is not None:
        properties["name"] = annotation.name
    if annotation.class_name:
        properties["classification"] = _class_legacy(annotation)
    properties["isLocked"] = False
    if annotation.measurements:
        properties["measurements"] = _measurement_list(annotation)
    return {
        "type": "Feature",
        "geometry": _geometry_json(annotation.geometry),
        "properties": properties,
    }


def _feature_v02(annotation: Annotation) -> dict[str, Any]:
    """QuPath 0.2: the object type in ``id``, ``color`` written with a ``name``,
    ``isLocked`` and ``measurements`` (a list) always."""
    properties: dict[str, Any] = {}
    if annotation.name is not None:
        properties["name"] = annotation.name
        properties["color"] = _rgb(annotation)
    if annotation.class_name:
        properties["classification"] = _class_legacy(annotation)
    properties["isLocked"] = False
    properties["measurements"] = _measurement_list(annotation)
    return {
        "type": "Feature",
        "id": "PathAnnotationObject",
        "geometry": _geometry_json(annotation.geometry),
        "properties": properties,
    }


def _feature_plain(annotation: Annotation) -> dict[str, Any]:
    """Plain GeoJSON as other tools write it: no id, no object type, class as a string."""
    properties: dict[str, Any] = {}
    if annotation.name is not None:
        properties["name"] = annotation.name
    if annotation.class_name:
        properties["classification"] = ": ".join(class_parts(annotation.class_name))
    return {
        "type": "Feature",
        "geometry": _geometry_json(annotation.geometry),
        "properties": properties,
    }


def _feature_collection(annotations: Sequence[Annotation]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": [_feature_v04(a) for a in annotations]}


_PAIR = re.compile(r"\[\s+(-?[0-9.eE+-]+),\s+(-?[0-9.eE+-]+)\s+\]")


def _dump(obj: Any, pretty: bool) -> str:
    if pretty:  # Gson's pretty printing; coordinates inline as QuPath writes them
        text = json.dumps(obj, indent=2, ensure_ascii=False)
        return _PAIR.sub(r"[\1, \2]", text) + "\n"
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def write_qupath_geojson_variants(
    annotations: Sequence[Annotation], folder: str | os.PathLike
) -> dict[str, Path]:
    """Write the same annotations in every GeoJSON flavour QuPath has written (plus two
    that other tools write), one file each, ``<folder>/<variant>.geojson``.

    Variants (keys of the result, in ``GEOJSON_VARIANTS``):

    - ``v0.4_feature_collection``: 0.4+ ``exportObjectsToGeoJson(..., "FEATURE_COLLECTION")``:
      UUID ``id``, ``objectType``, ``classification {name, color}`` (derived classes
      ``{names: [...], color}``), ``measurements`` as a map;
    - ``v0.4_feature_array``: the same Features in a JSON array (0.4+ default export);
    - ``v0.4_single_feature``: the first annotation alone, as one Feature;
    - ``v0.3``: array; ``object_type``, no id, classification as Gson wrote ``PathClass``
      (``{name, colorRGB}``, derived classes nested in ``parentClass``), ``isLocked``,
      measurements as a list of ``{name, value}``;
    - ``v0.2``: array; ``"id": "PathAnnotationObject"``, no object type, as 0.3 otherwise
      (``measurements`` always present);
    - ``derived_names``: FeatureCollection with every class as ``{names: [...], color}``;
    - ``joined_name``: FeatureCollection with every class as ``{name: "Vessel: Invasive",
      color}`` (readable by QuPath's ``PathClass.fromString``);
    - ``plain``: FeatureCollection without ids or object types, classification a string.
    """
    annotations = list(annotations)
    if not annotations:
        raise ValueError("no annotations to write")
    folder = Path(folder)
    docs: dict[str, tuple[Any, bool]] = {
        "v0.4_feature_collection": (_feature_collection(annotations), False),
        "v0.4_feature_array": ([_feature_v04(a) for a in annotations], True),
        "v0.4_single_feature": (_feature_v04(annotations[0]), True),
        "v0.3": ([_feature_v03(a) for a in annotations], True),
        "v0.2": ([_feature_v02(a) for a in annotations], True),
        "derived_names": (
            {
                "type": "FeatureCollection",
                "features": [_feature_v04(a, force_names=True) for a in annotations],
            },
            True,
        ),
        "joined_name": (
            {"type": "FeatureCollection", "features": [_feature_joined(a) for a in annotations]},
            True,
        ),
        "plain": (
            {"type": "FeatureCollection", "features": [_feature_plain(a) for a in annotations]},
            False,
        ),
    }
    paths = {}
    for variant in GEOJSON_VARIANTS:
        doc, pretty = docs[variant]
        paths[variant] = folder / f"{variant}.geojson"
        atomic_write_text(paths[variant], _dump(doc, pretty))
    return paths


# ----------------------------------------------------------------------------- project


def _version_tuple(version: str) -> tuple[int, int, int, int]:
    """``"0.6.0-rc4"`` → (0, 6, 0, 4); a release sorts after its candidates."""
    match = re.match(r"^(\d+)\.(\d+)\.(\d+)(?:-rc(\d+))?", version)
    if not match:
        raise ValueError(f"not a QuPath version: {version!r}")
    major, minor, patch, rc = match.groups()
    return int(major), int(minor), int(patch), int(rc) if rc else 10**6


def build_demo_project(
    folder: str | os.PathLike,
    *,
    slide: DemoSlide | Sequence[DemoSlide] | int | None = None,
    qupath_version: str = "0.5.1",
    overwrite: bool = False,
) -> Path:
    """Build a QuPath project folder around demo slides; returns its ``project.qpproj``.

    Writes ``project.qpproj`` as QuPath ``qupath_version`` does (one Bio-Formats image
    entry per slide, ``metadata`` ``{}``; ``tags`` ``[]`` from 0.6.0-rc4),
    ``classifiers/classes.json`` (QuPath's default classes plus the annotations'
    classes) and ``annotations/<entryID>.geojson`` (0.4+ FeatureCollection) per entry.
    No ``data/`` folder: QuPath opens such entries without objects.

    Args:
        folder: project folder (created).
        slide: one or more slides; default: two new ones in ``folder/slides/``
            (4096 × 3072 px seed 0, and 2048 × 1536 px seed 1, both 0.25 µm/px); a
            number: that many new ones (the two, then 2048 × 1536 px, seeds 2, 3, …).
        qupath_version: the ``version`` written.
        overwrite: replace an existing ``project.qpproj``; otherwise that is an
            :class:`InputError` (never clobber a user's project).
    """
    folder = Path(folder).absolute()
    project_file = folder / "project.qpproj"
    if project_file.exists() and not overwrite:
        raise InputError("a QuPath project already exists here", path=project_file)
    version = _version_tuple(qupath_version)
    if slide is None:
        slides = [
            build_demo_slide(folder / "slides" / "demo-slide-1.ome.tif", seed=0),
            build_demo_slide(
                folder / "slides" / "demo-slide-2.ome.tif", width=2048, height=1536, seed=1
            ),
        ]
    elif isinstance(slide, int):  # that many: the two above, then 2048 × 1536 ones
        slides = [
            build_demo_slide(
                folder / "slides" / f"demo-slide-{k + 1}.ome.tif",
                **({} if k == 0 else {"width": 2048, "height": 1536}),
                seed=k,
            )
            for k in range(slide)
        ]
    elif isinstance(slide, DemoSlide):
        slides = [slide]
    else:
        slides = list(slide)
    if not slides:
        raise ValueError("no slides for the project")

    now = int(time.time() * 1000)
    images = []
    classes: dict[str, int] = dict(_QUPATH_DEFAULT_CLASSES)
    for entry_id, one in enumerate(slides, start=1):
        slide_path = Path(one.path).absolute()
        entry: dict[str, Any] = {
            "serverBuilder": bioformats_server_builder(
                slide_path, one.width, one.height, one.mpp, tiff_levels(slide_path)
            ),
            "entryID": entry_id,
            "randomizedName": str(uuid.uuid4()),
            "imageName": slide_path.name,
            "metadata": {},
        }
        if version >= (0, 6, 0, 4):
            entry["tags"] = []
        images.append(entry)
        for annotation in one.annotations:
            if annotation.class_name and annotation.class_name not in classes:
                classes[annotation.class_name] = rgb_to_argb(_rgb(annotation))
        atomic_write_text(
            folder / "annotations" / f"{entry_id}.geojson",
            _dump(_feature_collection(one.annotations), False),
        )
    atomic_write_json(
        folder / "classifiers" / "classes.json",
        {"pathClasses": [{"name": n, "color": c} for n, c in classes.items()]},
    )
    project = {
        "version": qupath_version,
        "createTimestamp": now,
        "modifyTimestamp": now,
        "uri": path_to_uri(project_file, directory=False, ascii_only=False),
        "lastID": len(images),
        "images": images,
    }
    atomic_write_json(project_file, project)
    return project_file
