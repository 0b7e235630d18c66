"""What the workflows that make tiles of annotated slides share (``extract``,
``synthesize``, ``cache build``): the slides loaded and checked (also the images of a
COCO dataset as slides), the output folder's first check, the row of a tile that sits on
a slide, and what a run did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histosynth.integration.dataset import TileRecord
from histosynth.integration.errors import InputError
from histosynth.integration.tiles import check_classes, open_sources, read_sources

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Sequence

    from histosynth.integration.annotations import Annotation
    from histosynth.integration.tiles import SlideSource

__all__ = ["RunResult", "annotated_slides", "coco_slides", "output_folder", "slide_tile_record"]


@dataclass
class RunResult:
    """What a run did: rows written, rows already present (resume), items skipped with
    their reasons."""

    run_dir: Path
    written: int = 0
    already_present: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def annotated_slides(
    classes: Sequence[str],
    project: str | Path | None,
    slide: str | Path | None,
    annotations: str | Path | None,
    slide_mpp_override: float | None,
    skip_missing: bool,
) -> list[SlideSource]:
    """The slides of ``project``, or ``slide`` with its ``annotations`` (GeoJSON), opened
    (``slide_mpp_override``: µm/px of slides without that metadata; ``skip_missing``:
    leave out project images whose file is gone). The classes are checked against the
    annotation files before any slide is opened (or a slide library imported).

    Raises:
        InputError: no slide, an unreadable one, or a class of ``classes`` annotated in
            none of them (listing the classes present).
    """
    sources = read_sources(
        project=project, slide=slide, annotations=annotations, skip_missing=skip_missing
    )
    check_classes(sources, classes)  # from the annotation files alone: in a second
    return open_sources(sources, slide_mpp_override)


def coco_slides(
    coco: str | Path, images: str | Path, mpp: float | None, option: str = "--slide-mpp"
) -> tuple[list[SlideSource], float]:
    """The images of the COCO dataset ``coco`` (in the folder ``images``) as slides (not
    opened; each image a slide, its instances its annotations), and their µm/px: ``mpp``
    (the command's ``option``), else the file's ``info.mpp``. Open them with
    ``open_sources(sources, mpp)``.

    Raises:
        InputError: a COCO file or image that cannot be used, or no µm/px known.
    """
    from histosynth.integration.coco_read import coco_mpp, coco_slide_sources, read_coco

    data = read_coco(coco, images)
    return coco_slide_sources(data), coco_mpp(data, mpp, option)


def output_folder(out: str | Path) -> Path:
    """``out`` as a path; InputError when it names a file (a folder, or nothing yet, is
    what a run writes into)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError("the output folder is a file", path=out)
    return out


def slide_tile_record(
    tile_id: str,
    synthesis_type: str,
    vessel: Annotation,
    source: SlideSource,
    x: int | None,
    y: int | None,
    tile_size: int,
    mpp: float,
    **fields: Any,
) -> TileRecord:
    """The ``index.csv`` row of a tile at (``x``, ``y``) (level-0 px; ``None`` for a
    generated one) of ``source``'s slide, ``tile_size`` px at ``mpp`` µm/px, made for
    ``vessel`` (its class and id); ``fields``: the row's other ``TileRecord`` fields."""
    return TileRecord(
        id=tile_id,
        synthesis_type=synthesis_type,
        class_name=vessel.class_name or "",
        source_image=str(source.slide_path),
        source_entry_id=source.entry_id,
        source_annotation_id=vessel.id,
        tile_x=x,
        tile_y=y,
        tile_size=tile_size,
        mpp=mpp,
        **fields,
    )
