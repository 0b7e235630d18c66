"""The ``extract`` workflow: one real tile per vessel, centred on it, into a dataset.

It validates all of its inputs before it writes anything, so bad input leaves no partial
output; then it writes through ``RunWriter`` (atomic files, resumable).
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histosynth import __version__
from histosynth.common.geometry import DEFAULT_MPP, TileGeometry
from histosynth.integration.dataset import EncodedTile, RunWriter, check_run_folder
from histosynth.integration.errors import InputError
from histosynth.integration.slides import read_tile
from histosynth.integration.tiles import (
    PlannedTile,
    plan_vessel_tiles,
    tile_contents,
)
from histosynth.workflows.tile_runs import (
    RunResult,
    annotated_slides,
    output_folder,
    slide_tile_record,
)


class ExtractResult(RunResult):
    """What ``extract`` did: rows written, rows already present (resume), items skipped."""


@dataclass(frozen=True)
class ExtractSettings:
    """What to extract (frozen; checked when made).

    ``classes``: annotation classes ('Vessel' includes 'Vessel: …'); ``tile_size`` px at
    ``mpp`` µm/px; ``min_area_um2`` / ``max_area_um2``: the vessels' area bounds in µm²;
    ``png``: ``"fast"`` (stored PNG, the quickest to write) or ``"small"`` (zlib, ~35 %
    smaller).

    Raises:
        InputError: no class, a size or resolution that is not positive, or
            ``min_area_um2`` above ``max_area_um2``.
    """

    classes: tuple[str, ...]
    tile_size: int = 1024
    mpp: float = DEFAULT_MPP
    min_area_um2: float = 0.0
    max_area_um2: float = math.inf
    png: str = "fast"

    @property
    def geometry(self) -> TileGeometry:
        """The tiles' size (px) and resolution (µm/px)."""
        return TileGeometry(self.tile_size, self.mpp)

    def __post_init__(self) -> None:
        classes = (self.classes,) if isinstance(self.classes, str) else tuple(self.classes)
        object.__setattr__(self, "classes", classes)
        if not classes:
            raise InputError("name at least one class (--class)")
        if self.tile_size <= 0 or self.mpp <= 0:
            raise InputError(
                f"tile size ({self.tile_size}) and mpp ({self.mpp}) must be positive"
            )
        if self.min_area_um2 > self.max_area_um2:
            raise InputError(
                f"--min-area {self.min_area_um2} is above --max-area {self.max_area_um2}"
            )


def extract(
    settings: ExtractSettings,
    *,
    out: str | Path,
    project: str | Path | None = None,
    slide: str | Path | None = None,
    annotations: str | Path | None = None,
    slide_mpp_override: float | None = None,
    resume: bool = False,
    skip_missing: bool = False,
    progress: Callable[[Iterable, int], Iterable] | None = None,
    command: str = "",
) -> ExtractResult:
    """Write one tile per vessel of ``settings.classes``, centred on it, at
    ``settings.mpp`` µm/px, into the dataset folder ``out``.

    Each tile's mask holds every annotation of the classes inside the tile (255), its
    GeoJSON those annotations clipped to the tile in tile pixels. Vessels larger than the
    tile are skipped with the reason in ``run.json``; tiles at the border stay inside the
    slide. The slides come from ``project``, or ``slide`` + ``annotations`` (GeoJSON);
    ``slide_mpp_override``: µm/px of slides without resolution metadata.
    """
    classes, tile_size, mpp = settings.classes, settings.tile_size, settings.mpp
    min_area_um2, max_area_um2 = settings.min_area_um2, settings.max_area_um2
    out = output_folder(out)
    check_run_folder(out, resume=resume)  # before the slides are read
    sources = annotated_slides(
        classes, project, slide, annotations, slide_mpp_override, skip_missing
    )
    plan = plan_vessel_tiles(sources, classes, settings.geometry, min_area_um2, max_area_um2)

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
    with RunWriter(
        out, config=config, resume=resume, command=command, png=settings.png
    ) as writer:
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

        def encode_and_commit(planned: PlannedTile, image: np.ndarray) -> None:
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


def _encode_tile(
    writer: RunWriter, planned: PlannedTile, image: np.ndarray, tile_size: int, mpp: float
) -> EncodedTile:
    """Mask (0/255), tile-pixel annotations and encoded files of one planned tile."""
    mask, tile_annotations = tile_contents(planned, TileGeometry(tile_size, mpp))
    record = slide_tile_record(
        planned.tile_id,
        "extracted",
        planned.vessel,
        planned.source,
        planned.x,
        planned.y,
        tile_size,
        mpp,
    )
    return writer.encode_tile(record, image, mask, tile_annotations)
