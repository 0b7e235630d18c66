"""The write-back plan: every new QuPath entry of a run decided once — image, name,
description, metadata, tags, annotations — and checked against the project before any
writer touches it.

The native writer (:func:`~histosynth.integration.qupath.writeback.write_run_to_project`),
the paquo writer (:mod:`~histosynth.integration.qupath.paquo_writer`) and the Groovy
*Synthesize vessels* script (which reads ``RUN/qupath-plan.json``, written by
``histosynth qupath plan``) all apply this plan.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histosynth.common.files import atomic_write_json
from histosynth.integration.content_check import qc_failed
from histosynth.integration.dataset import (  # SYNTHETIC_TYPES: the rows written into a project
    INDEX_NAME,
    REVIEW_STATUSES,
    SYNTHETIC_TYPES,
    read_index,
    row_problem,
    utc_now,
    validate_tile_id,
)
from histosynth.integration.errors import InputError
from histosynth.integration.images import read_rgb
from histosynth.integration.qupath.entries import (
    META_ID,
    SYNTHETIC_TAGS,
    entry_description,
    row_metadata,
    synthetic_image_name,
    synthetic_metadata,
)
from histosynth.integration.qupath.project import QuPathProject
from histosynth.integration.tiff import write_calibrated_tiff

log = logging.getLogger(__name__)

#: ``RUN/qupath-entries.json``: per project, the entry id of each tile written into it
MAPPING_NAME = "qupath-entries.json"
#: ``RUN/qupath-plan.json``: the plan for the menu scripts
PLAN_NAME = "qupath-plan.json"
PLAN_FORMAT_VERSION = 1


@dataclass(frozen=True)
class WrittenTile:
    """One tile added to the project.

    Attributes:
        tile_id: the run's tile id.
        entry_id: the new entry's ``entryID``.
        image_name: ``synthetic-<run>-<id>``.
        image: the calibrated TIFF the entry points at.
        sidecar: ``P/annotations/<entryID>.geojson`` (``None`` when the row has no GeoJSON).
    """

    tile_id: str
    entry_id: int
    image_name: str
    image: Path
    sidecar: Path | None


@dataclass(frozen=True)
class PlannedEntry:
    """One new project entry, decided completely (see :func:`plan_write_back`): the
    checked ``index.csv`` row, its files and the entry's name, description, metadata and
    tags. Every writer applies exactly these.

    Attributes:
        png: the run's tile image; ``tiff``: the calibrated TIFF the entry points at
            (``RUN/images/<id>.tif``, written by the writer); ``geojson``: the tile's
            annotations (tile px) or ``None``; ``mpp``: µm per px; ``width``/``height``: px.
    """

    row: dict[str, str]
    tile_id: str
    png: Path
    tiff: Path
    geojson: Path | None
    mpp: float
    width: int
    height: int
    image_name: str
    description: str
    metadata: dict[str, str]
    tags: tuple[str, ...] = SYNTHETIC_TAGS

    def to_json(self) -> dict[str, Any]:
        """The entry as the menu scripts read it (paths absolute, strings only in
        ``metadata``)."""
        return {
            "tile_id": self.tile_id,
            "image": str(self.tiff),
            "png": str(self.png),
            "annotations": None if self.geojson is None else str(self.geojson),
            "mpp": self.mpp,
            "width": self.width,
            "height": self.height,
            "image_name": self.image_name,
            "description": self.description,
            "metadata": dict(self.metadata),
            "tags": list(self.tags),
        }


@dataclass(frozen=True)
class WriteBackPlan:
    """Everything a write-back will do, checked against the project, nothing written.

    Attributes:
        run: the run folder; ``run_name``: ``histosynth.run`` of its entries;
        entries: the new entries in index order; skipped: ``(tile id, reason)``.
    """

    project_file: Path
    run: Path
    run_name: str
    entries: list[PlannedEntry]
    skipped: list[tuple[str, str]]

    def to_json(self) -> dict[str, Any]:
        """The plan as ``RUN/qupath-plan.json`` holds it (:func:`write_plan_json`)."""
        return {
            "format_version": PLAN_FORMAT_VERSION,
            "project": str(self.project_file),
            "run": str(self.run),
            "run_name": self.run_name,
            "entries": [entry.to_json() for entry in self.entries],
            "skipped": [{"tile_id": t, "reason": r} for t, r in self.skipped],
        }


def default_run_name(run_dir: str | os.PathLike, project_file: Path | None = None) -> str:
    """The run's name in a project: the one used when it was last written into
    ``project_file`` (``RUN/qupath-entries.json``), else the run folder's name."""
    run = Path(run_dir).resolve()
    if run.is_file():
        run = run.parent
    if project_file is not None:
        record = read_mapping(run).get("projects", {}).get(str(Path(project_file).absolute()))
        if isinstance(record, dict) and isinstance(record.get("run_name"), str):
            return record["run_name"]
    return run.name


def check_run_name(run_name: Any) -> str:
    if not isinstance(run_name, str) or not run_name.strip() or any(c in run_name for c in "\r\n"):
        raise InputError(f"the run name must be a one-line text, not {run_name!r}", item="run name")
    return run_name


def run_folder(run_dir: str | os.PathLike) -> Path:
    run = Path(run_dir).absolute()
    if run.is_file() and run.name == INDEX_NAME:
        run = run.parent
    return run


def read_mapping(run: Path) -> dict[str, Any]:
    path = run / MAPPING_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s: ignored, cannot read it (%s)", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def check_writable(folder: Path, what: str) -> None:
    """Raise :class:`InputError` naming ``folder`` unless a file can be created in it.

    Asks ``os.access`` and then really creates (and removes) a temporary file, which
    also catches read-only file systems, where root is refused too.
    """
    if not folder.is_dir():
        raise InputError(f"{what} is not a folder", path=folder)
    problem = None
    if not os.access(folder, os.W_OK | os.X_OK):
        problem = "no write permission"
    else:
        try:
            fd, probe = tempfile.mkstemp(prefix=".histosynth-probe-", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            problem = exc.strerror or str(exc)
    if problem:
        raise InputError(f"{what} is read-only ({problem}); nothing was written", path=folder)


def png_size(path: Path, tile_id: str) -> tuple[int, int]:
    """(width, height) from a PNG's header; the file must be an 8-bit PNG."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(33)
    except FileNotFoundError:
        raise InputError("the tile image is missing", path=path, item=f"tile {tile_id}") from None
    except OSError as exc:
        raise InputError(
            f"cannot read the tile image: {exc.strerror or exc}", path=path, item=f"tile {tile_id}"
        ) from None
    if len(head) < 33 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise InputError("not a PNG image", path=path, item=f"tile {tile_id}")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    if width == 0 or height == 0 or depth != 8 or colour not in (0, 2, 4, 6):
        raise InputError(
            f"expected an 8-bit RGB PNG (found bit depth {depth}, colour type {colour})",
            path=path,
            item=f"tile {tile_id}",
        )
    return int(width), int(height)


def plan_write_back(
    project: QuPathProject, run_dir: str | os.PathLike, run_name: str
) -> tuple[list[PlannedEntry], list[tuple[str, str]]]:
    """Check every row of the run against the project, writing nothing.

    Returns the synthetic tiles to add, in index order, and ``(tile id, reason)`` for the
    rows skipped (``extracted`` rows; tiles that failed the content check; tiles whose
    ``histosynth.run`` + ``histosynth.id`` already name an entry).

    Raises:
        InputError: no index, a missing or unreadable tile image or GeoJSON, or a row
            without a usable ``mpp`` (each naming the file and the tile).
    """
    run = run_folder(run_dir)
    index = run / INDEX_NAME
    rows = read_index(run)
    planned: list[PlannedEntry] = []
    skipped: list[tuple[str, str]] = []
    for row in rows:
        tile_id = row["id"]
        kind = row["synthesis_type"]
        if kind not in SYNTHETIC_TYPES:
            skipped.append((tile_id, f"not synthetic ({kind or 'no synthesis_type'})"))
            continue
        try:
            validate_tile_id(tile_id)
        except InputError as exc:
            raise InputError(exc.message, path=index, item=f"tile {tile_id!r}") from None
        existing = project.synthetic_entry(run_name, tile_id)
        if existing is None and qc_failed(row.get("qc")):  # never into a user's project
            skipped.append((tile_id, f"failed the content check ({row['qc'][6:]}); see the "
                                     "run's gallery"))
            continue
        problem = None if existing is not None else row_problem(run, row)
        if problem is not None:  # a replaced, truncated or outside file is never imported
            raise InputError(
                f"{problem}; nothing was written (resume the run to make the tile again)",
                path=index,
                item=f"tile {tile_id}",
            )
        if existing is not None:
            if existing.stored_path is not None and existing.stored_path != (
                run / "images" / f"{tile_id}.tif"
            ):
                log.warning(
                    "%s: %s holds tile %s of a run named %r at %s, not in %s; pass another "
                    "run name to add this run as well",
                    project.file,
                    existing.label(),
                    tile_id,
                    run_name,
                    existing.stored_path,
                    run,
                )
            skipped.append((tile_id, f"already in the project ({existing.label()})"))
            continue
        if not row.get("image_path"):
            raise InputError("the row has no image_path", path=index, item=f"tile {tile_id}")
        png = run / row["image_path"]
        width, height = png_size(png, tile_id)
        try:
            mpp = float(row.get("mpp", ""))
        except ValueError:
            mpp = math.nan
        if not (math.isfinite(mpp) and mpp > 0):
            raise InputError(
                f"mpp {row.get('mpp', '')!r} is not a positive pixel size in µm; the TIFF needs it",
                path=index,
                item=f"tile {tile_id}",
            )
        geojson = None
        if row.get("annotation_path"):
            geojson = run / row["annotation_path"]
            if not geojson.is_file():
                raise InputError(
                    "the tile's GeoJSON is missing", path=geojson, item=f"tile {tile_id}"
                )
            from histosynth.integration.geojson import read_annotations

            read_annotations(geojson)  # InputError naming the file and feature if broken
        tiff = run / "images" / f"{tile_id}.tif"
        if tiff.is_dir():
            raise InputError("a folder is in the way of the tile's TIFF", path=tiff)
        status = (row.get("review_status") or "pending").strip().lower()
        planned.append(
            PlannedEntry(
                row,
                tile_id,
                png,
                tiff,
                geojson,
                mpp,
                width,
                height,
                image_name=synthetic_image_name(run_name, tile_id),
                description=entry_description(row, run_name),
                metadata=synthetic_metadata(
                    run_name,
                    tile_id,
                    kind,
                    row.get("source_entry_id", ""),
                    status if status in REVIEW_STATUSES else "pending",
                )
                | row_metadata(row),
            )
        )
    return planned, skipped


def check_targets(project: QuPathProject, run: Path, planned: list[PlannedEntry]) -> None:
    """Writable folders, and no sidecar of another entry in the way."""
    check_writable(project.folder, "the QuPath project folder")
    annotations = project.folder / "annotations"
    if annotations.exists():
        check_writable(annotations, "the project's annotations folder")
    if not planned:
        return
    check_writable(run, "the run folder")
    check_writable(planned[0].tiff.parent, "the run's images folder")
    for offset, tile in enumerate(planned, start=1):
        if tile.geojson is None:
            continue
        sidecar = annotations / f"{project.last_id + offset}.geojson"
        if sidecar.exists():
            raise InputError(
                f"a GeoJSON file for entry id {project.last_id + offset} already exists, but "
                "the project has no such entry; it would be overwritten by the entry of tile "
                f"{tile.tile_id!r}: move it away (QuPathProject.unknown_sidecars() lists such "
                "files)",
                path=sidecar,
            )


def record_mapping(
    run: Path, project: QuPathProject, run_name: str, added: list[WrittenTile]
) -> Path | None:
    """Update ``RUN/qupath-entries.json`` with every tile of the run now in the project."""
    entries = {e.metadata.get(META_ID, ""): e.entry_id for e in project.synthetic_entries(run_name)}
    entries.update({tile.tile_id: tile.entry_id for tile in added})
    entries.pop("", None)
    if not entries:
        return None
    path = run / MAPPING_NAME
    data = read_mapping(run)
    projects = data.get("projects")
    if not isinstance(projects, dict):
        projects = {}
    projects[str(project.file)] = {
        "run_name": run_name,
        "updated_at": utc_now(),
        "entries": dict(sorted(entries.items(), key=lambda item: item[1])),
    }
    try:
        atomic_write_json(path, {"format_version": 1, "projects": projects})
    except OSError as exc:
        log.warning("%s: not written (%s)", path, exc.strerror or exc)
        return None
    return path


def make_plan(
    project: QuPathProject, run_dir: str | os.PathLike, run_name: str | None = None
) -> WriteBackPlan:
    """The checked plan of writing the run into ``project`` (nothing written): run name
    (default :func:`default_run_name`), entries, skips, and the targets writable with no
    other entry's sidecar in the way."""
    run = run_folder(run_dir)
    name = check_run_name(run_name if run_name is not None else default_run_name(run, project.file))
    entries, skipped = plan_write_back(project, run, name)
    check_targets(project, run, entries)
    return WriteBackPlan(project.file, run, name, entries, skipped)


def write_entry_images(plan: WriteBackPlan) -> None:
    """Write each planned entry's calibrated TIFF (lossless pyramidal OME-TIFF) from its PNG."""
    for entry in plan.entries:
        write_calibrated_tiff(entry.tiff, read_rgb(entry.png, f"tile {entry.tile_id}"), entry.mpp)


def write_plan_json(plan: WriteBackPlan) -> Path:
    """Write ``RUN/qupath-plan.json`` atomically and return its path."""
    path = plan.run / PLAN_NAME
    atomic_write_json(path, plan.to_json())
    return path
