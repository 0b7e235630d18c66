"""Export a reviewed run (or an ``extract`` dataset) as a COCO instance-segmentation
dataset — the JSON that detectron2, mmdetection, torchvision's ``CocoDetection`` and
pycocotools read.

Layout::

    OUT/
      images/<id>.png             byte copies of RUN/images/<id>.png (SHA-256 checked)
      annotations/train.json      one COCO file per split that has images
      annotations/val.json        (``split="slide"``), or annotations/all.json
      annotations/test.json       (``split="none"``)

Each file: ``info`` (histosynth version, source folder, created, the tiles' µm/px, the
class → category id mapping, the split), ``licenses`` ``[]``, ``images``, ``annotations``
and ``categories``. Ids are unique over the whole export (image ids 1..N in index order,
annotation ids 1..M); category ids are the sorted class names numbered 1..K
(:func:`histosynth.integration.coco.category_ids`), the same in every file.

- An **image** carries ``histosynth``: the row's ``id``, ``synthesis_type``,
  ``source_image``, ``source_annotation_id``, ``review_status``, ``qc``, ``slide_group``,
  ``mpp`` (µm/px), ``class_name`` and ``has_mask``; a row whose mask does not match its
  pixels (``mask_source`` ``none``: a variation) has no annotations and an image-level
  ``label`` (its class name) and ``label_category_id``.
- An **annotation** is one vessel *instance*: one feature of the row's GeoJSON
  (``annotations/<id>.geojson``, tile px) whose class is one of the run's classes
  (``run.json`` ``config.classes``; every classified feature when the run names none) — not
  the merged mask, so touching vessels stay two. ``segmentation`` is polygons (each part's
  exterior ring ``[x1, y1, x2, y2, ...]``) when the geometry has no hole, else compressed
  RLE; ``iscrowd`` 0; ``area`` the instance's pixel count and ``bbox`` ``[x, y, w, h]`` of
  its pixels, both of the geometry rasterised on the tile (pixel centres inside); extra
  ``histosynth``: ``annotation_id`` (the feature's id), ``inserted`` (the synthesised
  vessel) and ``shape_id`` when the feature has one. An instance with no pixel in the tile
  is left out.

Rows: as the image-folder export (:func:`histosynth.workflows.export.select_rows`):
accepted (and with ``include_pending`` pending) synthetic rows, never rejected ones, none
that failed the content check unless ``include_qc_failed``; real (``extracted``) rows are
the annotators' own outlines and go in unless rejected, so an ``extract`` folder exports as
it is. The export is atomic: a temporary folder beside ``OUT`` renamed at the end.

Splits (``split="slide"``): the downstream benchmark's rules
(:mod:`histosynth.integration.splits`, seed 0, fractions 0.70 / 0.15 / 0.15, at least one
slide group in each). With real tiles: real tiles follow their ``slide_group``, validation
and test hold real tiles only, and a synthetic tile goes to train only when none of its
slides (vessel's, background's) is a validation or test slide — else it is left out
(``info.split.left_out``). Without real tiles: the units are the connected components of
the slides the tiles touch (``slide_group`` and the background's ``source_image``), so no
slide is on two sides.

Example::

    result = export_coco("out/run", "out/coco", split="slide")
    result.images, result.annotations, result.by_split
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from shapely.geometry import box

from histosynth.integration.annotations import Annotation
from histosynth.integration.coco import (
    bbox_of_mask,
    categories,
    category_ids,
    encode_rle,
    geometry_has_holes,
    polygons_of,
)
from histosynth.integration.dataset import read_index, validate_tile_id
from histosynth.integration.decisions import rows_with_logged_decisions
from histosynth.integration.errors import InputError
from histosynth.integration.files import parse_json, read_input_bytes
from histosynth.integration.geojson import read_annotations
from histosynth.integration.geometry import polygonal
from histosynth.integration.masks import rasterize
from histosynth.integration.run_folder import has_mask, review_status
from histosynth.integration.splits import (
    LabelledTile,
    fold_tiles,
    leaks,
    slide_folds,
    slide_group,
    slide_stem,
)
from histosynth.workflows.export import (
    check_out,
    checked_bytes,
    move_into_place,
    run_file,
    select_rows,
    umask,
)

log = logging.getLogger(__name__)

SPLITS = ("slide", "none")
"""``slide``: train / val / test by slide group; ``none``: one file, ``all.json``."""
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
SPLIT_SEED = 0

Progress = Callable[[Iterable, int], Iterable]


@dataclass
class CocoExportResult:
    """What :func:`export_coco` wrote.

    Attributes:
        out_dir: the dataset folder.
        images: images written (all splits).
        annotations: instances written (all splits).
        by_split: images per annotation file stem (``train``, ``val``, ``test`` or ``all``).
        categories: class name → category id.
        excluded: rows left out, per review status or reason.
        left_out: ``(row id, why)`` of rows the slide split could not place without leakage.
    """

    out_dir: Path
    images: int
    annotations: int
    by_split: dict[str, int] = field(default_factory=dict)
    categories: dict[str, int] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)
    left_out: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Tile:
    """One exported row: its COCO image and its instances (class name, not yet an id)."""

    side: str
    image: dict
    instances: list[tuple[str, dict]]


def export_coco(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    include_pending: bool = False,
    include_qc_failed: bool = False,
    split: str = "slide",
    progress: Progress | None = None,
) -> CocoExportResult:
    """Write the run's (or dataset's) exported rows to ``out_dir`` as COCO; see the module
    docstring.

    Args:
        run_dir: a run or ``extract`` dataset folder (with ``index.csv``).
        out_dir: the folder to create; must not exist, or be an empty folder.
        include_pending: also export synthetic tiles nobody has reviewed yet.
        include_qc_failed: also export tiles that failed the content check.
        split: ``slide`` (train / val / test by slide group) or ``none`` (``all.json``).
        progress: ``progress(items, total) -> items``, e.g. a tqdm bar.

    Raises:
        InputError: not a run folder, ``out_dir`` not new, a missing image or GeoJSON, a
            SHA-256 that differs from the index, an unreadable GeoJSON, a row without a
            slide (``split="slide"``) or fewer than 3 slide groups to split — one line
            naming the file and the row. Nothing is left in ``out_dir`` then.
    """
    if split not in SPLITS:
        raise InputError(f"split {split!r} is not one of {', '.join(SPLITS)}", item="--split")
    run, out = Path(run_dir), Path(out_dir)
    rows = rows_with_logged_decisions(run, read_index(run))
    check_out(out)
    selected, excluded = select_rows(
        run, rows, include_pending=include_pending, include_qc_failed=include_qc_failed,
        real_unless_rejected=True,
    )
    for row in selected:
        _checked_id(run, row)
    if split == "slide":
        sides, left_out, split_info = _slide_sides(run, selected)
    else:
        sides = {row["id"]: "all" for row in selected}
        left_out, split_info = [], {"by": "none"}
    kept = [row for row in selected if row["id"] in sides]
    classes = _run_classes(run)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; give what mkdir would
        (tmp / "images").mkdir()
        (tmp / "annotations").mkdir()
        iterator: Iterable = progress(kept, len(kept)) if progress else kept
        tiles = [
            _export_row(run, tmp, row, sides[row["id"]], classes, k)
            for k, row in enumerate(iterator, start=1)
        ]
        result = _write_files(tmp, run, out, tiles, split_info, left_out)
        result.excluded = dict(sorted(excluded.items()))
        move_into_place(tmp, out, ("images", "annotations", "."))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _checked_id(run: Path, row: dict[str, str]) -> None:
    tile_id = row.get("id", "")
    try:
        validate_tile_id(tile_id)
    except InputError as exc:
        raise InputError(exc.message, path=run / "index.csv", item=repr(tile_id)) from exc


def _run_classes(run: Path) -> list[str] | None:
    """The run's vessel classes (``run.json`` ``config.classes``); ``None`` when it names
    none (then every classified feature is a vessel)."""
    path = run / "run.json"
    if not path.is_file():
        return None
    try:
        config = parse_json(read_input_bytes(path), path).get("config") or {}
    except (InputError, AttributeError):
        log.warning("%s: unreadable; every classified feature is exported as a vessel", path)
        return None
    classes = config.get("classes") if isinstance(config, dict) else None
    if isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes):
        return classes
    return None


# --------------------------------------------------------------------------- splits


def _slide_sides(
    run: Path, rows: list[dict[str, str]]
) -> tuple[dict[str, str], list[tuple[str, str]], dict]:
    """Each row's side (``train``, ``val``, ``test``), the rows left out with the reason,
    and the split's description for ``info``."""
    tiles = []
    for row in rows:
        group = (row.get("slide_group") or "").strip() or slide_group(row)
        if not group:
            raise InputError(
                "the tile names no slide (donor_image or source_image): it cannot be split "
                "by slide; export with --split none",
                path=run / "index.csv",
                item=f"tile {row['id']}",
            )
        background = slide_stem(row["source_image"]) if row.get("source_image") else group
        tiles.append(LabelledTile(
            id=row["id"], image=Path(row.get("image_path", "")), mask=None,
            class_name=row.get("class_name", ""),
            synthesis_type=row.get("synthesis_type", "") or "extracted",
            slide_group=group, background_slide=background,
        ))
    real = [t for t in tiles if not t.synthetic]
    if real:
        units = {t.slide_group: t.slide_group for t in real}
        rule = ("the downstream benchmark's: real tiles by slide_group; validation and test "
                "real only; a synthetic tile in train only when none of its slides is held out")
    else:
        units = _slide_components(tiles)
        rule = ("no real tiles: connected components of the slides each tile touches "
                "(slide_group, source_image) kept on one side")
    names = sorted(set(units.values()))
    if len(names) < 3:
        raise InputError(
            f"--split slide needs tiles from at least 3 slide groups (train, val, test); "
            f"these come from {len(names)} ({', '.join(names) or 'none'}): export with "
            "--split none",
            path=run / "index.csv",
        )
    fold = slide_folds(names, 1, SPLIT_FRACTIONS, SPLIT_SEED)[0]
    side_of_unit = {n: s for s, group in (("train", fold.train), ("val", fold.val),
                                          ("test", fold.test)) for n in group}
    left_out: list[tuple[str, str]] = []
    if real:
        assigned = fold_tiles(fold, real, [t for t in tiles if t.synthetic])
        problems = leaks(assigned)
        if problems:  # fold_tiles follows the rules; leaks() checks them again
            raise RuntimeError("; ".join(problems))
        sides = {t.id: "train" for t in assigned.train_real + assigned.train_synthetic}
        sides.update({t.id: "val" for t in assigned.val})
        sides.update({t.id: "test" for t in assigned.test})
        left_out = [(t.id, why) for t, why in assigned.excluded]
    else:
        sides = {t.id: side_of_unit[units[t.slide_group]] for t in tiles}
    slides = {s: sorted({g for g, unit in units.items() if side_of_unit[unit] == s})
              for s in ("train", "val", "test")}
    info = {"by": "slide_group", "seed": SPLIT_SEED, "fractions": list(SPLIT_FRACTIONS),
            "rule": rule, "slides": slides,
            "left_out": [{"id": i, "why": why} for i, why in left_out]}
    return sides, left_out, info


def _slide_components(tiles: list[LabelledTile]) -> dict[str, str]:
    """Every slide a tile touches → the name of its connected component (slides joined
    when one tile touches both), the component named by its slides, sorted, joined by +."""
    parent: dict[str, str] = {}

    def root(slide: str) -> str:
        parent.setdefault(slide, slide)
        while parent[slide] != slide:
            parent[slide] = parent[parent[slide]]
            slide = parent[slide]
        return slide

    for tile in tiles:
        a, b = root(tile.slide_group), root(tile.background_slide)
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[str, list[str]] = {}
    for slide in parent:
        members.setdefault(root(slide), []).append(slide)
    names = {r: "+".join(sorted(m)) for r, m in members.items()}
    return {slide: names[root(slide)] for slide in parent}


# --------------------------------------------------------------------------- rows


def _png_size(data: bytes, path: Path, tile_id: str) -> tuple[int, int]:
    """(width, height) from a PNG's header."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise InputError("not a PNG image", path=path, item=tile_id)
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _number(text: str | None) -> float | None:
    try:
        value = float(text or "")
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _metadata(annotation: Annotation, key: str) -> str:
    """A feature's own property or QuPath metadata value (as text; empty when absent)."""
    props = annotation.properties
    metadata = props.get("metadata") if isinstance(props.get("metadata"), dict) else {}
    value = props.get(key, metadata.get(key, ""))
    return "" if value is None else str(value)


def _export_row(
    run: Path, tmp: Path, row: dict[str, str], side: str, classes: list[str] | None,
    image_id: int,
) -> _Tile:
    tile_id = row["id"]
    image_path = run_file(run, row.get("image_path", ""), "image", tile_id)
    data = checked_bytes(image_path, row, "image_sha256", tile_id)
    width, height = _png_size(data, image_path, tile_id)
    masked = has_mask(row)
    info = {
        "id": tile_id,
        "synthesis_type": row.get("synthesis_type", "") or "extracted",
        "source_image": row.get("source_image", ""),
        "source_annotation_id": row.get("source_annotation_id", ""),
        "review_status": review_status(row),
        "qc": row.get("qc", ""),
        "slide_group": slide_group(row),
        "mpp": _number(row.get("mpp")),
        "class_name": row.get("class_name", ""),
        "has_mask": masked,
    }
    if not masked:
        info["label"] = row.get("class_name", "")
    image = {"id": image_id, "file_name": f"{tile_id}.png", "width": width, "height": height,
             "histosynth": info}
    instances = _instances(run, row, width, height, classes) if masked else []
    with open(tmp / "images" / f"{tile_id}.png", "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return _Tile(side, image, instances)


def _instances(
    run: Path, row: dict[str, str], width: int, height: int, classes: list[str] | None
) -> list[tuple[str, dict]]:
    """The vessel features of the row's GeoJSON as (class name, COCO annotation without
    ids)."""
    tile_id = row["id"]
    rel = row.get("annotation_path", "")
    if not rel:
        raise InputError(
            "the row has a mask but no GeoJSON (annotation_path): COCO instances are read "
            "from the GeoJSON",
            path=run / "index.csv",
            item=f"tile {tile_id}",
        )
    path = run_file(run, rel, "annotation", tile_id)
    data = checked_bytes(path, row, "annotation_sha256", tile_id)
    try:
        features = read_annotations(parse_json(data, path), classes=classes, origin=str(path))
    except InputError as exc:
        item = f"tile {tile_id}" + (f": {exc.item}" if exc.item else "")
        raise InputError(exc.message, path=path, item=item) from exc
    tile = box(0, 0, width, height)
    out = []
    for feature in features:
        if not feature.class_name:
            continue
        geometry = polygonal(feature.geometry.intersection(tile))
        if geometry is None:
            continue
        mask = rasterize(geometry, origin=(0.0, 0.0), scale=1.0, shape=(height, width)) > 0
        area = int(mask.sum())
        if area == 0:
            continue
        segmentation = encode_rle(mask) if geometry_has_holes(geometry) else polygons_of(geometry)
        extra = {"annotation_id": feature.id,
                 "inserted": _metadata(feature, "histosynth_inserted").lower() == "true"}
        shape_id = _metadata(feature, "shape_id")
        if shape_id:
            extra["shape_id"] = shape_id
        out.append((feature.class_name, {
            "segmentation": segmentation, "area": area, "bbox": bbox_of_mask(mask),
            "iscrowd": 0, "histosynth": extra,
        }))
    return out


# --------------------------------------------------------------------------- files


def _write_files(
    tmp: Path, run: Path, out: Path, tiles: list[_Tile], split_info: dict,
    left_out: list[tuple[str, str]],
) -> CocoExportResult:
    """One COCO file per side that has images; the result of the export."""
    names = [name for t in tiles for name, _ in t.instances]
    names += [t.image["histosynth"]["label"] for t in tiles if "label" in t.image["histosynth"]]
    ids = category_ids(n for n in names if n)
    for tile in tiles:
        label = tile.image["histosynth"].get("label")
        if label:
            tile.image["histosynth"]["label_category_id"] = ids[label]
    mpps = {t.image["histosynth"]["mpp"] for t in tiles}
    from histosynth import __version__

    created = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    by_split: dict[str, int] = {}
    next_id = 1
    for side in ("train", "val", "test", "all"):
        chosen = [t for t in tiles if t.side == side]
        if not chosen:
            continue
        annotations = []
        for tile in chosen:
            for name, annotation in tile.instances:
                annotations.append({"id": next_id, "image_id": tile.image["id"],
                                    "category_id": ids[name], **annotation})
                next_id += 1
        document = {
            "info": {
                "description": f"histosynth vessel tiles of {run.name} ({side}): one "
                "annotation per vessel instance; images without annotations carry an "
                "image-level label (histosynth.label)",
                "version": __version__,
                "year": int(created[:4]),
                "date_created": created,
                "histosynth_version": __version__,
                "source": str(run.resolve()),
                "created": created,
                "mpp": next(iter(mpps)) if len(mpps) == 1 else None,
                "split": side,
                "split_rule": split_info,
                "category_ids": ids,
            },
            "licenses": [],
            "images": [t.image for t in chosen],
            "annotations": annotations,
            "categories": categories(ids),
        }
        text = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
        with open(tmp / "annotations" / f"{side}.json", "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        by_split[side] = len(chosen)
    return CocoExportResult(
        out_dir=out, images=len(tiles), annotations=next_id - 1, by_split=by_split,
        categories=ids, left_out=list(left_out),
    )

