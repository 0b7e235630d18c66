"""Workflows: the jobs the command line runs, composed from the integration layer (and,
for synthesis, the engine).

Every workflow validates all of its inputs before it writes anything, so bad input
leaves no partial output; then it writes through ``RunWriter`` (atomic files, resumable).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from shapely.geometry import box
from shapely.strtree import STRtree

from histosynth import __version__
from histosynth.integration.annotations import Annotation, class_matches
from histosynth.integration.dataset import EncodedTile, RunWriter, TileRecord
from histosynth.integration.errors import InputError
from histosynth.integration.geojson import class_names, read_annotations
from histosynth.integration.masks import rasterize
from histosynth.integration.qupath import QuPathProject
from histosynth.integration.slides import (
    centred_tile_origin,
    open_slide,
    read_tile,
    slide_mpp,
    slide_size,
    tile_extent,
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
        return _slug(self.slide_path.name.split(".")[0]) or "slide"


@dataclass
class ExtractResult:
    """What ``extract`` did: rows written, rows already present (resume), items skipped."""

    run_dir: Path
    written: int = 0
    already_present: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


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
    checks that every annotation lies on its slide.
    """
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
    for source in sources:
        source.reader = open_slide(source.slide_path, mpp=mpp)
        source.mpp = slide_mpp(source.reader)
        source.width, source.height = slide_size(source.reader)
        source.annotations = _on_slide(source)
    return sources


def _on_slide(source: SlideSource) -> list[Annotation]:
    """Annotations clipped to the slide; one entirely outside it is an error naming it."""
    bounds = box(0, 0, source.width, source.height)
    kept = []
    for ann in source.annotations:
        if not ann.geometry.intersects(bounds):
            minx, miny, maxx, maxy = ann.geometry.bounds
            raise InputError(
                f"lies outside the slide {source.slide_path.name} "
                f"({source.width}×{source.height} px): bounds "
                f"({minx:.0f}, {miny:.0f}, {maxx:.0f}, {maxy:.0f})",
                path=source.annotations_origin,
                item=f"annotation {ann.id}" + (f" ({ann.name})" if ann.name else ""),
            )
        if not bounds.contains(ann.geometry):
            log.warning(
                "%s: annotation %s extends beyond the slide; clipped to it",
                source.annotations_origin,
                ann.id,
            )
            ann.geometry = ann.geometry.intersection(bounds)
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


def extract(
    *,
    classes: Sequence[str],
    out: str | Path,
    project: str | Path | None = None,
    slide: str | Path | None = None,
    annotations: str | Path | None = None,
    tile_size: int = 1024,
    mpp: float = 0.5,
    slide_mpp_override: float | None = None,
    min_area_um2: float = 0.0,
    max_area_um2: float = math.inf,
    resume: bool = False,
    skip_missing: bool = False,
    png: str = "fast",
    progress: Callable[[Iterable, int], Iterable] | None = None,
    command: str = "",
) -> ExtractResult:
    """Write one tile per vessel of ``classes``, centred on it, at ``mpp`` µm/px.

    Each tile's mask holds every annotation of ``classes`` inside the tile (255), its
    GeoJSON those annotations clipped to the tile in tile pixels. Vessels larger than the
    tile are skipped with the reason in ``run.json``; tiles at the border stay inside the
    slide. ``min_area_um2`` / ``max_area_um2`` filter vessels by area in µm². ``png``:
    ``"fast"`` (stored PNG, the quickest to write) or ``"small"`` (zlib, ~35 % smaller).
    """
    if not classes:
        raise InputError("name at least one class (--class)")
    if tile_size <= 0 or mpp <= 0:
        raise InputError(f"tile size ({tile_size}) and mpp ({mpp}) must be positive")
    if min_area_um2 > max_area_um2:
        raise InputError(f"--min-area {min_area_um2} is above --max-area {max_area_um2}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError("the output folder is a file", path=out)

    sources = load_sources(
        project=project,
        slide=slide,
        annotations=annotations,
        mpp=slide_mpp_override,
        skip_missing=skip_missing,
    )
    check_classes(sources, classes)
    plan = _plan_tiles(sources, classes, tile_size, mpp, min_area_um2, max_area_um2)

    config = {
        "command": "extract",
        "classes": list(classes),
        "tile_size": tile_size,
        "mpp": mpp,
        "min_area_um2": min_area_um2,
        "max_area_um2": None if math.isinf(max_area_um2) else max_area_um2,
        "sources": sorted(str(s.slide_path) for s in sources),
    }
    result = ExtractResult(out)
    with RunWriter(out, config=config, resume=resume, command=command, png=png) as writer:
        writer.set_info(histosynth=__version__)
        for item, reason in plan.skipped:
            writer.skip(item, reason)
            result.skipped.append((item, reason))
        todo = [t for t in plan.tiles if not writer.has(t.tile_id)]
        result.already_present = len(plan.tiles) - len(todo)
        iterator = progress(todo, len(todo)) if progress else todo
        # Slides are read here, one tile at a time (readers are not shared between
        # threads); masks, GeoJSON, PNG encoding and the atomic writes run in worker
        # threads meanwhile (rows reach the index in completion order; ids are unique).
        workers = max(1, min(4, os.cpu_count() or 1))
        pending: deque[Future] = deque()

        def encode_and_commit(planned: _PlannedTile, image: np.ndarray) -> None:
            writer.commit(_encode_tile(writer, planned, image, tile_size, mpp))

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for planned in iterator:
                image = read_tile(planned.source.reader, planned.x, planned.y, tile_size, mpp)
                pending.append(pool.submit(encode_and_commit, planned, image))
                while pending and (len(pending) > 2 * workers or pending[0].done()):
                    pending.popleft().result()
                    result.written += 1
            while pending:
                pending.popleft().result()
                result.written += 1
    return result


@dataclass
class _PlannedTile:
    tile_id: str
    source: SlideSource
    vessel: Annotation
    x: int
    y: int
    neighbours: list[Annotation]


@dataclass
class _Plan:
    tiles: list[_PlannedTile] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _plan_tiles(
    sources: Sequence[SlideSource],
    classes: Sequence[str],
    tile_size: int,
    mpp: float,
    min_area: float,
    max_area: float,
) -> _Plan:
    """Decide every tile (id, origin, annotations inside) before any pixel is read."""
    plan = _Plan()
    used_ids: set[str] = set()
    for source in sources:
        chosen = [
            a for a in source.annotations if any(class_matches(a.class_name, c) for c in classes)
        ]
        chosen.sort(key=lambda a: (a.geometry.bounds[1], a.geometry.bounds[0], a.id))
        tree = STRtree([a.geometry for a in chosen]) if chosen else None
        extent = tile_extent(tile_size, mpp, source.mpp)
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
            tile_id = _unique(f"{source.label}-{_slug(vessel.id)}", used_ids)
            plan.tiles.append(_PlannedTile(tile_id, source, vessel, x, y, neighbours))
    return plan


def _encode_tile(
    writer: RunWriter, planned: _PlannedTile, image: np.ndarray, tile_size: int, mpp: float
) -> EncodedTile:
    """Mask (0/255), tile-pixel annotations and encoded files of one planned tile."""
    source = planned.source
    scale = source.mpp / mpp
    mask = rasterize(
        [a.geometry for a in planned.neighbours],
        origin=(planned.x, planned.y),
        scale=scale,
        shape=(tile_size, tile_size),
    )
    tile_annotations = annotations_in_tile(
        planned.neighbours, planned.x, planned.y, scale, tile_size
    )
    record = TileRecord(
        id=planned.tile_id,
        synthesis_type="extracted",
        class_name=planned.vessel.class_name or "",
        source_image=str(source.slide_path),
        source_entry_id=source.entry_id,
        source_annotation_id=planned.vessel.id,
        tile_x=planned.x,
        tile_y=planned.y,
        tile_size=tile_size,
        mpp=mpp,
    )
    return writer.encode_tile(record, image, mask, tile_annotations)


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
        geometry = _polygonal(_to_tile(ann.geometry, x, y, scale).intersection(tile_box))
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


def _to_tile(geometry, x0: float, y0: float, scale: float):
    from shapely import affinity

    return affinity.affine_transform(geometry, [scale, 0, 0, scale, -x0 * scale, -y0 * scale])


def _polygonal(geometry):
    from shapely.geometry import MultiPolygon, Polygon

    if geometry.is_empty:
        return None
    if isinstance(geometry, (Polygon, MultiPolygon)):
        return geometry
    parts = [g for g in getattr(geometry, "geoms", []) if isinstance(g, (Polygon, MultiPolygon))]
    polys = [p for g in parts for p in (g.geoms if isinstance(g, MultiPolygon) else [g])]
    polys = [p for p in polys if not p.is_empty and p.area > 0]
    if not polys:
        return None
    return polys[0] if len(polys) == 1 else MultiPolygon(polys)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:64]


def _unique(candidate: str, used: set[str]) -> str:
    name, n = candidate, 1
    while name in used:
        n += 1
        name = f"{candidate}-{n}"
    used.add(name)
    return name
