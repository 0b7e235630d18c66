"""Target outlines an annotator draws for shape-guided vessels (``--shapes drawn``).

A sketch is a polygon of the sketch class (``Vessel sketch`` by default) on a real slide:
one tile of the run is centred on it and the new vessel takes its outline. A sketch must
be one closed outline that fits the tile with its tissue ring and lies inside the slide;
one that does not is skipped with one line naming its file and annotation (a line
string, QuPath's open polyline, is refused when the annotations are read).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from shapely.geometry import MultiPolygon, Polygon

from histosynth.common.geometry import TileGeometry
from histosynth.integration.annotations import Annotation, class_matches
from histosynth.integration.masks import rasterize
from histosynth.integration.slides import centred_tile_origin
from histosynth.integration.tiles import Background, SlideSource, background_at

__all__ = ["Sketch", "collect_sketches", "sketch_tile"]

#: a sketch smaller than this (tile px²) has no outline to speak of
MIN_SKETCH_AREA_PX = 64.0


@dataclass
class Sketch:
    """One drawn target outline: its slide and its annotation (level-0 px)."""

    source: SlideSource
    annotation: Annotation

    @property
    def outline(self) -> Polygon:
        """The outline (the polygon's exterior; holes are not part of a target shape)."""
        return Polygon(self.annotation.geometry.exterior)


def collect_sketches(
    sources: Sequence[SlideSource],
    shape_class: str,
    geometry: TileGeometry,
    ring_px: int,
    skipped: list[tuple[str, str]],
) -> list[Sketch]:
    """Every polygon of ``shape_class`` (or a class derived from it) in ``sources`` usable as a
    target outline for tiles of ``geometry`` with ``ring_px`` px of tissue ring, in slide
    then id order; the others go to ``skipped`` as (item, reason)."""
    sketches = []
    for source in sources:
        scale = geometry.scale_from(source.mpp)
        drawn = [a for a in source.annotations if class_matches(a.class_name, shape_class)]
        for annotation in sorted(drawn, key=lambda a: a.id):
            item = f"{source.annotations_origin}: sketch {annotation.id}"
            reason = _sketch_problem(annotation, source, scale, geometry.size, ring_px)
            if reason is None:
                sketches.append(Sketch(source, annotation))
            else:
                skipped.append((item, reason))
    return sketches


def _sketch_problem(
    annotation: Annotation, source: SlideSource, scale: float, tile_size: int, ring_px: int
) -> str | None:
    """Why a sketch cannot be a target outline, or ``None``."""
    shape = annotation.geometry
    if isinstance(shape, MultiPolygon) or not isinstance(shape, Polygon):
        return (
            "the sketch is not one closed outline (self-intersecting, or in several parts); "
            "redraw it as one outline that does not cross itself"
        )
    area = Polygon(shape.exterior).area * scale * scale
    if area < MIN_SKETCH_AREA_PX:
        return f"the sketch has (almost) no area ({area:.0f} px² at the tile's resolution)"
    minx, miny, maxx, maxy = shape.bounds
    span = max(maxx - minx, maxy - miny) * scale + 2 * ring_px
    if span > tile_size:
        return (
            f"the sketch ({span:.0f} px with its {ring_px} px ring) is larger than the "
            f"{tile_size} px tile"
        )
    if minx <= 0 or miny <= 0 or maxx >= source.width or maxy >= source.height:
        return (
            f"the sketch touches the edge of the slide ({source.width}×{source.height} px); "
            "draw it inside the tissue"
        )
    return None


def sketch_tile(
    sketch: Sketch, geometry: TileGeometry, classes: Sequence[str]
) -> tuple[Background, np.ndarray, np.ndarray]:
    """The tile of ``geometry`` centred on ``sketch`` (kept on the slide) as a background
    with the annotations of ``classes`` in it, the sketch's outline in tile px ((n, 2),
    not closed) and its mask (uint8 0/255, the pixels whose centre lies inside)."""
    source = sketch.source
    minx, miny, maxx, maxy = sketch.annotation.geometry.bounds
    x, y = centred_tile_origin(
        (minx + maxx) / 2, (miny + maxy) / 2, geometry.size, geometry.mpp, source.reader
    )
    background = background_at(source, x, y, geometry, classes)
    scale = geometry.scale_from(source.mpp)
    outline = sketch.outline
    points = (np.asarray(outline.exterior.coords, dtype=float)[:-1, :2] - (x, y)) * scale
    mask = rasterize([outline], origin=(x, y), scale=scale, shape=(geometry.size,) * 2)
    return background, points, mask
