"""Tile preparation: slide sources, the annotations in a tile, and the donors and
backgrounds that synthesis composes — every geometry and pixel step before a model runs.

Units: geometries in level-0 px of their slide until :func:`~histosynth.integration.
geometry.to_tile` moves them to tile px; ``mpp`` is µm per px of the tiles made.

Size: the records (sources, donors, backgrounds) and the steps that make them share one
set of units and checks; geometry is in ``geometry.py``, pixels in ``slides.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from shapely.geometry import Polygon, box
from shapely.geometry.base import BaseGeometry
from shapely.strtree import STRtree

from histosynth.common.geometry import TileGeometry
from histosynth.integration.annotations import Annotation, class_matches, class_matches_any
from histosynth.integration.errors import InputError
from histosynth.integration.geojson import class_names, read_annotations
from histosynth.integration.geometry import polygonal, to_tile
from histosynth.integration.masks import mask_to_polygons, rasterize, tissue_mask
from histosynth.integration.qupath import QuPathProject
from histosynth.integration.slides import (
    centred_tile_origin,
    open_slide,
    read_tile,
    slide_mpp,
    slide_size,
)

log = logging.getLogger(__name__)


@dataclass
class SlideSource:
    """One slide and its annotations (all classes), as read from a project entry or a file."""

    slide_path: Path
    annotations: list[Annotation]
    annotations_origin: str
    entry_id: str = ""
    image_name: str = ""
    reader: object = None
    mpp: float = 0.0
    width: int = 0
    height: int = 0

    @property
    def label(self) -> str:
        """Short name used in tile ids: ``e<entryID>`` for a project entry, else the slide stem."""
        if self.entry_id:
            return f"e{self.entry_id}"
        return slug(self.slide_path.name.split(".")[0]) or "slide"


def load_sources(
    *,
    project: str | Path | None = None,
    slide: str | Path | None = None,
    annotations: str | Path | None = None,
    mpp: float | None = None,
    skip_missing: bool = False,
) -> list[SlideSource]:
    """Read the slides and their annotations from a QuPath project or a slide + GeoJSON pair.

    Opens every slide (so a missing or unreadable one fails here, before any output), and
    checks that every annotation lies on its slide: :func:`read_sources` then
    :func:`open_sources`.
    """
    sources = read_sources(
        project=project, slide=slide, annotations=annotations, skip_missing=skip_missing
    )
    return open_sources(sources, mpp) if sources else []


def read_sources(
    *,
    project: str | Path | None = None,
    slide: str | Path | None = None,
    annotations: str | Path | None = None,
    skip_missing: bool = False,
) -> list[SlideSource]:
    """The slides (not opened) and their annotations, from a QuPath project or a slide +
    GeoJSON pair: only the project and annotation files are read, so a command checks its
    classes in a second, before a slide or a model library loads (:func:`open_sources`
    opens them)."""
    if (project is None) == (slide is None):
        raise InputError("give either a project or a slide with its annotations")
    sources: list[SlideSource] = []
    if project is not None:
        qp = QuPathProject(project)
        missing = qp.missing_images()
        if missing and not skip_missing:
            raise InputError(
                f"{len(missing)} image(s) cannot be found: "
                + "; ".join(f"entry {e.entry_id} {e.name!r} ({e.uri})" for e in missing)
                + " (move them back, or pass --skip-missing)",
                path=qp.file,
            )
        for sidecar in qp.unknown_sidecars():
            log.warning(
                "%s: belongs to no entry of %s (no entry with that ID or image name); ignored",
                sidecar,
                qp.file,
            )
        for entry in qp.entries:
            if entry.metadata.get("histosynth.synthetic") == "true":
                # our own synthetic tiles are never sources: no synthetic-on-synthetic
                continue
            if entry in missing:
                log.warning(
                    "skipping entry %s %r: image not found (%s)",
                    entry.entry_id,
                    entry.name,
                    entry.uri,
                )
                continue
            origin = qp.annotation_source(entry)
            if origin is None:
                # QuPathProject.annotations() logs the warning naming the entry.
                qp.annotations(entry)
                continue
            sources.append(
                SlideSource(
                    Path(entry.image_path),
                    qp.annotations(entry),
                    str(origin),
                    entry_id=str(entry.entry_id),
                    image_name=entry.name,
                )
            )
    else:
        if annotations is None:
            raise InputError("--slide needs --annotations (a GeoJSON file)")
        sources.append(
            SlideSource(
                Path(slide),
                read_annotations(annotations),
                str(annotations),
                image_name=Path(slide).name,
            )
        )
    return sources


def annotations_on_slide(source: SlideSource, *, hint: str = "") -> list[Annotation]:
    """Annotations clipped to the slide; one entirely outside it is an error naming it (by
    its store key when it came from an annotation store) and ending with ``hint``; one
    that meets the slide only along its edge or at a corner (no area on it) is skipped
    with a warning."""
    bounds = box(0, 0, source.width, source.height)
    kept = []
    for ann in source.annotations:
        if not ann.geometry.intersects(bounds):
            minx, miny, maxx, maxy = ann.geometry.bounds
            key = ann.properties.get("store_key")
            label = ann.name or ann.class_name
            raise InputError(
                f"lies outside the slide {source.slide_path.name} "
                f"({source.width}×{source.height} px): bounds "
                f"({minx:.0f}, {miny:.0f}, {maxx:.0f}, {maxy:.0f})" + hint,
                path=source.annotations_origin,
                item=f"annotation {key if key is not None else ann.id}"
                + (f" ({label})" if label else ""),
            )
        if not bounds.contains(ann.geometry):
            clipped = polygonal(ann.geometry.intersection(bounds))
            if clipped is None:  # it meets the slide only along the edge or at a corner
                log.warning(
                    "%s: annotation %s touches the slide only along its edge (no area on "
                    "it); skipped",
                    source.annotations_origin,
                    ann.id,
                )
                continue
            log.warning(
                "%s: annotation %s extends beyond the slide; clipped to it",
                source.annotations_origin,
                ann.id,
            )
            ann.geometry = clipped
        kept.append(ann)
    return kept


def check_classes(sources: Sequence[SlideSource], classes: Sequence[str]) -> None:
    """Every requested class must match at least one annotation; else name what is there."""
    present = sorted({n for s in sources for n in class_names(s.annotations)})
    where = ", ".join(sorted({s.annotations_origin for s in sources}))
    for wanted in classes:
        if not any(class_matches(name, wanted) for name in present):
            raise InputError(
                f"no annotation of class {wanted!r}; classes present: "
                + (", ".join(repr(n) for n in present) or "none"),
                path=where if len(sources) == 1 else None,
            )


@dataclass
class PlannedTile:
    tile_id: str
    source: SlideSource
    vessel: Annotation
    x: int
    y: int
    neighbours: list[Annotation]


@dataclass
class TilePlan:
    tiles: list[PlannedTile] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def plan_vessel_tiles(
    sources: Sequence[SlideSource],
    classes: Sequence[str],
    geometry: TileGeometry,
    min_area: float,
    max_area: float,
) -> TilePlan:
    """Decide every tile of ``geometry`` (id, origin, annotations inside) before any pixel
    is read; ``min_area`` / ``max_area``: the vessels' area bounds, µm²."""
    tile_size, mpp = geometry.size, geometry.mpp
    plan = TilePlan()
    used_ids: set[str] = set()
    for source in sources:
        chosen = [a for a in source.annotations if class_matches_any(a.class_name, classes)]
        chosen.sort(key=lambda a: (a.geometry.bounds[1], a.geometry.bounds[0], a.id))
        tree = STRtree([a.geometry for a in chosen]) if chosen else None
        extent = geometry.level0_extent(source.mpp)
        for vessel in chosen:
            item = f"{source.annotations_origin}: annotation {vessel.id}"
            area_um2 = vessel.geometry.area * source.mpp**2
            if not min_area <= area_um2 <= max_area:
                plan.skipped.append(
                    (item, f"area {area_um2:.0f} µm² outside [{min_area:g}, {max_area:g}] µm²")
                )
                continue
            minx, miny, maxx, maxy = vessel.geometry.bounds
            if maxx - minx > extent or maxy - miny > extent:
                plan.skipped.append(
                    (
                        item,
                        f"vessel {(maxx - minx) * source.mpp:.0f}×"
                        f"{(maxy - miny) * source.mpp:.0f} µm is larger than the tile "
                        f"({extent * source.mpp:.0f} µm = {tile_size} px at {mpp:g} µm/px); "
                        "use a larger --tile-size or a coarser --mpp",
                    )
                )
                continue
            x, y = centred_tile_origin(
                (minx + maxx) / 2, (miny + maxy) / 2, tile_size, mpp, source.reader
            )
            region = box(x, y, x + extent, y + extent)
            neighbours = [
                chosen[i] for i in tree.query(region) if chosen[i].geometry.intersects(region)
            ]
            tile_id = unique_id(f"{source.label}-{slug(vessel.id)}", used_ids)
            plan.tiles.append(PlannedTile(tile_id, source, vessel, x, y, neighbours))
    return plan


def tile_contents(
    planned: PlannedTile, geometry: TileGeometry
) -> tuple[np.ndarray, list[Annotation]]:
    """The mask (uint8 0/255, ``geometry.size``², every chosen annotation in the tile) and
    the annotations in tile px of one planned tile of ``geometry``."""
    tile_size = geometry.size
    scale = geometry.scale_from(planned.source.mpp)
    mask = rasterize(
        [a.geometry for a in planned.neighbours],
        origin=(planned.x, planned.y),
        scale=scale,
        shape=(tile_size, tile_size),
    )
    inside = annotations_in_tile(planned.neighbours, planned.x, planned.y, scale, tile_size)
    return mask, inside


def annotations_in_tile(
    annotations: Iterable[Annotation], x: float, y: float, scale: float, tile_size: int
) -> list[Annotation]:
    """``annotations`` (level-0 px) in the pixels of the tile whose corner is (x, y) level-0
    px, ``scale`` tile px per level-0 px, clipped to the tile; those left empty are
    dropped. Each keeps its class, colour and name, with its id as ``source_annotation_id``.
    """
    tile_box = box(0, 0, tile_size, tile_size)
    out = []
    for ann in annotations:
        geometry = polygonal(to_tile(ann.geometry, x, y, scale).intersection(tile_box))
        if geometry is not None:
            out.append(
                Annotation(
                    geometry=geometry,
                    class_name=ann.class_name,
                    color=ann.color,
                    name=ann.name,
                    properties={"source_annotation_id": ann.id},
                )
            )
    return out


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:64]


def unique_id(candidate: str, used: set[str]) -> str:
    name, n = candidate, 1
    while name in used:
        n += 1
        name = f"{candidate}-{n}"
    used.add(name)
    return name


DONOR_MAX_FRACTION = 0.5  # a donor spans at most half the tile: room for tissue around it


#: the start of the skip reason of a vessel too large for the tile (callers sum these up)
TOO_LARGE = "too large:"


@dataclass
class Donor:
    """A real vessel cut out at the target resolution: crop, its mask, its context."""

    source: SlideSource
    vessel: Annotation
    image: np.ndarray  # (s, s, 3) uint8
    mask: np.ndarray  # (s, s) uint8 0/255, this vessel only
    context: np.ndarray  # tissue around it, for choosing similar backgrounds
    context_tissue: np.ndarray
    #: (s, s) uint8 0/255: the slide's other annotations in the crop (not to be pasted
    #: along with the vessel's tissue ring)
    others: np.ndarray | None = None
    #: (s, s) bool: the crop's tissue (:func:`~histosynth.integration.masks.tissue_mask`,
    #: the rule the backgrounds are measured by)
    tissue: np.ndarray | None = None


@dataclass
class Background:
    """A real tissue tile that may receive a donor."""

    source: SlideSource
    x: int | None  # level-0 corner; None for a synthetic background
    y: int | None
    image: np.ndarray  # (tile, tile, 3) uint8
    tissue: np.ndarray  # bool
    existing: list[Annotation]  # chosen-class annotations already in the tile, tile px
    existing_mask: np.ndarray  # uint8 0/255

    @classmethod
    def synthetic(cls, source: SlideSource, image: np.ndarray) -> Background:
        """A generated tile (no slide position, no annotations in it) of ``source``'s donor."""
        side = image.shape[0]
        return cls(
            source, None, None, image, tissue_mask(image), [], np.zeros((side, side), np.uint8)
        )


def open_sources(sources: Sequence[SlideSource], mpp: float | None) -> list[SlideSource]:
    """In-memory sources made ready as ``load_sources`` makes its own: reader, mpp,
    size, annotations checked against (and clipped to) the slide."""
    if not sources:
        raise InputError("no slide given")
    for source in sources:
        if source.reader is None:
            source.reader = open_slide(source.slide_path, mpp=mpp)
        source.mpp = slide_mpp(source.reader)
        source.width, source.height = slide_size(source.reader)
        source.annotations = annotations_on_slide(source)
    return list(sources)


def beyond_slide(source: SlideSource, x: float, y: float, size: int, scale: float) -> np.ndarray:
    """Which pixels of the ``size`` px square read at (x, y) level-0 px, ``scale`` tile px
    per level-0 px, reach beyond the slide (uint8 (size, size), 255 = at least part of the
    pixel lies outside ``source.width`` × ``source.height``)."""
    edges = np.arange(size + 1) / scale
    cols = (x + edges[:-1] < 0) | (x + edges[1:] > source.width)
    rows = (y + edges[:-1] < 0) | (y + edges[1:] > source.height)
    return ((rows[:, None] | cols[None, :]) * 255).astype(np.uint8)


def collect_donors(
    sources: Sequence[SlideSource],
    classes: Sequence[str],
    geometry: TileGeometry,
    skipped: list[tuple[str, str]],
    *,
    margin_px: int = 8,
    max_fraction: float = DONOR_MAX_FRACTION,
    role: str = "donor",
    context_px: int = 0,
) -> list[Donor]:
    """Every vessel of ``classes`` as a donor crop at ``geometry.mpp`` for tiles of
    ``geometry``; too large ones are skipped.

    A donor may span at most ``max_fraction`` of the tile so that there is room to
    place it; the crop is square, ``margin_px`` wider than the vessel on each side.
    ``role`` names the vessel in skip reasons (``"reference vessel"`` in variation mode,
    where a vessel may fill the tile: ``max_fraction`` 1). ``context_px`` more pixels of
    the slide are read on every side (the tissue ring pasted with the vessel); they do not
    count against ``max_fraction``.
    """
    tile_size, mpp = geometry.size, geometry.mpp
    donors = []
    for source in sources:
        scale = geometry.scale_from(source.mpp)
        for vessel in sorted(
            (a for a in source.annotations if class_matches_any(a.class_name, classes)),
            key=lambda a: a.id,
        ):
            item = f"{source.annotations_origin}: annotation {vessel.id}"
            minx, miny, maxx, maxy = vessel.geometry.bounds
            span = max(maxx - minx, maxy - miny) * scale + 2 * margin_px
            if span > tile_size * max_fraction:
                skipped.append(
                    (
                        item,
                        f"{TOO_LARGE} the {role} ({span:.0f} px at {mpp:g} µm/px) is larger than "
                        f"{max_fraction:.0%} of the {tile_size} px tile",
                    )
                )
                continue
            side = math.ceil(span + 2 * context_px)
            extent = side / scale
            x0 = (minx + maxx) / 2 - extent / 2
            y0 = (miny + maxy) / 2 - extent / 2
            image = read_tile(source.reader, x0, y0, side, mpp)
            mask = rasterize([vessel.geometry], origin=(x0, y0), scale=scale, shape=(side, side))
            region = box(x0, y0, x0 + extent, y0 + extent)
            others = rasterize(
                [
                    a.geometry
                    for a in source.annotations
                    if a is not vessel and a.geometry.intersects(region)
                ],
                origin=(x0, y0),
                scale=scale,
                shape=(side, side),
            )
            # the white beyond the slide's edge is no tissue to paste with the vessel
            others |= beyond_slide(source, x0, y0, side, scale)
            if not mask.any():
                skipped.append((item, "the vessel covers no pixel at this resolution"))
                continue
            context_side = min(tile_size, 3 * side)
            cx, cy = centred_tile_origin(
                (minx + maxx) / 2, (miny + maxy) / 2, context_side, mpp, source.reader
            )
            context = read_tile(source.reader, cx, cy, context_side, mpp)
            context_tissue = tissue_mask(context)
            donors.append(
                Donor(source, vessel, image, mask, context, context_tissue, others,
                      tissue=tissue_mask(image))
            )
    return donors


def tissue_positions(
    source: SlideSource,
    geometry: TileGeometry,
    min_tissue: float,
    *,
    avoid: Sequence[Annotation] = (),
) -> list[tuple[int, int]]:
    """Level-0 corners, in half-tile steps, of the tiles of ``geometry`` whose tissue
    fraction in the slide's thumbnail (≥ 4 µm/px, cheap) is at least ``min_tissue`` and
    that touch none of ``avoid``; ``[]`` when the slide is smaller than a tile."""
    extent = geometry.level0_extent(source.mpp)
    if source.width < extent or source.height < extent:
        return []
    thumb_mpp = max(source.mpp * 8, 4.0)
    thumb = source.reader.slide_thumbnail(resolution=thumb_mpp, units="mpp")[..., :3]
    tissue = tissue_mask(np.ascontiguousarray(thumb, dtype=np.uint8))
    factor = source.mpp / thumb_mpp  # thumbnail px per level-0 px
    tree = STRtree([a.geometry for a in avoid]) if avoid else None
    positions = []
    for y in np.arange(0, source.height - extent + 1, extent / 2):
        for x in np.arange(0, source.width - extent + 1, extent / 2):
            if tree is not None:
                region = box(x, y, x + extent, y + extent)
                if any(avoid[i].geometry.intersects(region) for i in tree.query(region)):
                    continue
            window = tissue[
                int(y * factor) : int((y + extent) * factor) + 1,
                int(x * factor) : int((x + extent) * factor) + 1,
            ]
            if window.size and window.mean() >= min_tissue:
                positions.append((int(x), int(y)))
    return positions


def mostly_tissue(
    source: SlideSource, x: int, y: int, geometry: TileGeometry, min_tissue: float
) -> bool:
    """Whether the tile of ``geometry`` at level-0 (``x``, ``y``) is ≥ ``min_tissue``
    tissue, checked on an 8× smaller read."""
    tile_size, mpp = geometry.size, geometry.mpp
    small = max(16, tile_size // 8)
    preview = read_tile(source.reader, x, y, small, mpp * tile_size / small)
    return float(tissue_mask(preview, min_area_px=16).mean()) >= min_tissue


def most_tissue_crop(image: np.ndarray, tissue: np.ndarray, side: int) -> np.ndarray:
    """The ``side`` px square crop of ``image`` (uint8 RGB) with the most ``tissue`` (bool,
    same size), searched in half-crop steps; an image smaller than ``side`` is first
    enlarged to it (cubic; the mask nearest-neighbour)."""
    if image.shape[0] < side or image.shape[1] < side:
        image = cv2.resize(image, (side, side), interpolation=cv2.INTER_CUBIC)
        tissue = cv2.resize(
            tissue.astype(np.uint8), (side, side), interpolation=cv2.INTER_NEAREST
        ).astype(bool)
    best, best_y, best_x = -1.0, 0, 0
    step = max(side // 2, 1)
    for y in range(0, image.shape[0] - side + 1, step):
        for x in range(0, image.shape[1] - side + 1, step):
            fraction = float(tissue[y : y + side, x : x + side].mean())
            if fraction > best:
                best, best_y, best_x = fraction, y, x
    return np.ascontiguousarray(image[best_y : best_y + side, best_x : best_x + side])


def collect_backgrounds(
    sources: Sequence[SlideSource],
    classes: Sequence[str],
    geometry: TileGeometry,
    *,
    seed: int,
    per_slide: int = 8,
    min_tissue: float = 0.5,
    skipped: list[tuple[str, str]] | None = None,
) -> list[Background]:
    """Tissue tiles of the slides (≥ ``min_tissue`` tissue), at most ``per_slide`` each.

    Candidate positions come from a tissue mask of the slide's thumbnail (cheap); only
    the chosen ones are read (tiles of ``geometry``). Annotations of ``classes`` already
    in a tile are kept (tile pixels) so the placement avoids them and the output carries
    them.
    """
    rng = np.random.default_rng([seed, 7])
    backgrounds = []
    for source in sources:
        extent = geometry.level0_extent(source.mpp)
        if source.width < extent or source.height < extent:
            if skipped is not None:
                skipped.append(
                    (
                        str(source.slide_path),
                        f"slide {source.slide_path.name} ({source.width}×{source.height} px) is "
                        f"smaller than a background tile ({extent:.0f} px at level 0)",
                    )
                )
            continue
        positions = tissue_positions(source, geometry, min_tissue)
        if len(positions) > per_slide:
            chosen = rng.choice(len(positions), size=per_slide, replace=False)
            positions = [positions[i] for i in sorted(chosen)]
        for x, y in positions:
            background = background_at(source, x, y, geometry, classes)
            if background.tissue.mean() >= min_tissue:
                backgrounds.append(background)
    return backgrounds


def background_at(
    source: SlideSource, x: int, y: int, geometry: TileGeometry, classes: Sequence[str]
) -> Background:
    """The tile of ``geometry`` at level-0 (``x``, ``y``) of ``source`` as a background: its
    pixels, tissue and the annotations of ``classes`` in it (tile px, and their mask)."""
    tile_size = geometry.size
    image = read_tile(source.reader, x, y, tile_size, geometry.mpp)
    extent = geometry.level0_extent(source.mpp)
    region = box(x, y, x + extent, y + extent)
    inside = [
        a
        for a in source.annotations
        if class_matches_any(a.class_name, classes) and a.geometry.intersects(region)
    ]
    existing = annotations_in_tile(inside, x, y, geometry.scale_from(source.mpp), tile_size)
    existing_mask = rasterize(
        [a.geometry for a in existing], origin=(0, 0), scale=1.0, shape=(tile_size, tile_size)
    )
    return Background(source, x, y, image, tissue_mask(image), existing, existing_mask)


# --------------------------------------------------------------------------- references


@dataclass
class ReferenceTile:
    """The real tile centred on a donor's vessel (variation mode's reference)."""

    image: np.ndarray  # (tile, tile, 3) uint8
    mask: np.ndarray  # (tile, tile) uint8 0/255: every annotation of the classes in it
    x: int  # level-0 corner
    y: int


def reference_tile(
    donor: Donor, geometry: TileGeometry, classes: Sequence[str]
) -> ReferenceTile:
    """The tile of ``geometry`` centred on ``donor``'s vessel (kept on the slide), masked
    with every annotation of ``classes`` in it."""
    tile_size, mpp = geometry.size, geometry.mpp
    source = donor.source
    minx, miny, maxx, maxy = donor.vessel.geometry.bounds
    x, y = centred_tile_origin((minx + maxx) / 2, (miny + maxy) / 2, tile_size, mpp, source.reader)
    image = read_tile(source.reader, x, y, tile_size, mpp)
    extent = geometry.level0_extent(source.mpp)
    region = box(x, y, x + extent, y + extent)
    inside = [
        a.geometry
        for a in source.annotations
        if class_matches_any(a.class_name, classes) and a.geometry.intersects(region)
    ]
    scale = geometry.scale_from(source.mpp)
    mask = rasterize(inside, origin=(x, y), scale=scale, shape=(tile_size, tile_size))
    return ReferenceTile(image, mask, x, y)


def mask_annotation(
    mask: np.ndarray, like: Annotation, name: str, properties: dict[str, str] | None = None
) -> Annotation | None:
    """The polygons of ``mask`` (tile px) as one annotation with ``like``'s class and
    colour, named ``name``; ``None`` when the mask is empty."""
    return _annotation_like(mask_to_polygons(mask), like, name, properties)


def outline_annotation(
    outline: np.ndarray,
    like: Annotation,
    name: str,
    properties: dict[str, str] | None = None,
    *,
    size: int,
) -> Annotation | None:
    """The closed polygon ``outline`` ((n, 2) tile px) clipped to the ``size`` px tile as
    one annotation with ``like``'s class and colour, named ``name``; ``None`` when nothing
    of it is in the tile."""
    shape = polygonal(Polygon(np.asarray(outline, dtype=float)))  # repaired if it crosses itself
    geometry = None if shape is None else polygonal(shape.intersection(box(0, 0, size, size)))
    return _annotation_like(geometry, like, name, properties)


def _annotation_like(
    geometry: BaseGeometry | None, like: Annotation, name: str, properties: dict[str, str] | None
) -> Annotation | None:
    """``geometry`` as an annotation with ``like``'s class and colour (``None``: none)."""
    if geometry is None:
        return None
    return Annotation(
        geometry=geometry,
        class_name=like.class_name,
        color=like.color,
        name=name,
        properties=dict(properties or {}),
    )


def annotations_outside(annotations: Iterable[Annotation], region: np.ndarray) -> list[Annotation]:
    """``annotations`` (tile px) less the pixels of ``region`` (non-zero: what was pasted
    over them); those left empty are dropped."""
    cover = mask_to_polygons(np.asarray(region))
    if cover is None:
        return list(annotations)
    out = []
    for ann in annotations:
        rest = polygonal(ann.geometry.difference(cover))
        if rest is not None:
            out.append(dataclasses.replace(ann, geometry=rest))
    return out
