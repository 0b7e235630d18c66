"""Write a run's synthetic tiles into a QuPath project, and read reviewers' decisions back.

:func:`write_run_to_project` (``--write-project native``, contracts.md "Project
write-back"): for each synthetic row of ``RUN/index.csv`` it writes a calibrated TIFF
``RUN/images/<id>.tif`` beside the PNG (lossless tiled pyramidal OME-TIFF, pixel size in
the TIFF resolution tags and in OME-XML), appends one entry per tile to
``project.qpproj`` (:meth:`QuPathProject.add_synthetic_entry`), copies the tile's GeoJSON
to ``P/annotations/<entryID>.geojson`` and records ``RUN/qupath-entries.json`` (tile id ->
entry id per project). Everything is checked before anything is written; the project file
comes last. Only while the project is not open in QuPath.

:func:`review_sync` (``histosynth review sync``) copies each entry's ``review_status``
into ``RUN/index.csv``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from histosynth.integration.atomic import atomic_write_bytes, atomic_write_json
from histosynth.integration.dataset import (
    INDEX_NAME,
    REVIEW_STATUSES,
    read_index,
    update_index,
    utc_now,
    validate_tile_id,
)
from histosynth.integration.errors import InputError
from histosynth.integration.qupath.project import (
    META_ID,
    META_REVIEW,
    META_RUN,
    QuPathProject,
)

log = logging.getLogger(__name__)

__all__ = [
    "MAPPING_NAME",
    "SYNTHETIC_TYPES",
    "PlannedTile",
    "ReviewSyncResult",
    "WriteBackResult",
    "WrittenTile",
    "default_run_name",
    "plan_write_back",
    "review_sync",
    "write_calibrated_tiff",
    "write_run_to_project",
]

SYNTHETIC_TYPES = ("inpainting", "variation")
"""``synthesis_type`` values written into a project (``extracted`` rows are not)."""
MAPPING_NAME = "qupath-entries.json"
"""``RUN/qupath-entries.json``: per project, the entry id of each tile written into it."""
TIFF_TILE = 256


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


@dataclass
class WriteBackResult:
    """What :func:`write_run_to_project` did.

    Attributes:
        project_file: the ``project.qpproj`` written.
        run_dir: the run folder.
        run_name: the run's name in the entries' metadata (``histosynth.run``).
        added: the new entries, in index order.
        skipped: ``(tile id, reason)`` for rows not written (not synthetic, or already in
            the project).
        backup: ``project.qpproj.backup`` (``None`` when nothing was added).
        mapping: ``RUN/qupath-entries.json`` (``None`` when nothing was written).
    """

    project_file: Path
    run_dir: Path
    run_name: str
    added: list[WrittenTile] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    backup: Path | None = None
    mapping: Path | None = None

    def summary(self) -> str:
        """One line for the command line."""
        text = f"{len(self.added)} synthetic tile(s) of run {self.run_name!r} added to " + str(
            self.project_file
        )
        if self.added:
            first, last = self.added[0].entry_id, self.added[-1].entry_id
            text += f" (entries {first}-{last})" if first != last else f" (entry {first})"
        if self.skipped:
            reasons = Counter(reason.split(" (")[0] for _, reason in self.skipped)
            text += "; skipped " + ", ".join(f"{n} {why}" for why, n in reasons.items())
        return text


@dataclass
class ReviewSyncResult:
    """What :func:`review_sync` did.

    Attributes:
        project_file, run_dir, run_name: as for :class:`WriteBackResult`.
        counts: ``{"accepted": n, "rejected": n, "pending": n}`` over the run's entries
            found in the project.
        changed: index rows whose ``review_status`` changed.
        statuses: tile id -> the status copied.
        not_in_index: labels of entries of this run whose tile id is not in the index.
        not_in_project: synthetic tile ids of the index with no entry in the project.
    """

    project_file: Path
    run_dir: Path
    run_name: str
    counts: dict[str, int]
    changed: int
    statuses: dict[str, str]
    not_in_index: list[str] = field(default_factory=list)
    not_in_project: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the command line."""
        counts = ", ".join(f"{self.counts.get(s, 0)} {s}" for s in REVIEW_STATUSES)
        text = (
            f"review of run {self.run_name!r}: {counts}; {self.changed} row(s) of "
            f"{self.run_dir / INDEX_NAME} changed"
        )
        if self.not_in_project:
            text += f"; {len(self.not_in_project)} synthetic tile(s) not in the project"
        if self.not_in_index:
            text += f"; {len(self.not_in_index)} entry(ies) name tiles missing from the index"
        return text


@dataclass(frozen=True)
class PlannedTile:
    """A synthetic row checked and ready to write (see :func:`plan_write_back`)."""

    row: dict[str, str]
    tile_id: str
    png: Path
    tiff: Path
    geojson: Path | None
    mpp: float
    width: int
    height: int


# --------------------------------------------------------------------------- helpers


def default_run_name(run_dir: str | os.PathLike, project_file: Path | None = None) -> str:
    """The run's name in a project: the one used when it was last written into
    ``project_file`` (``RUN/qupath-entries.json``), else the run folder's name."""
    run = Path(run_dir).resolve()
    if run.is_file():
        run = run.parent
    if project_file is not None:
        record = _read_mapping(run).get("projects", {}).get(str(Path(project_file).absolute()))
        if isinstance(record, dict) and isinstance(record.get("run_name"), str):
            return record["run_name"]
    return run.name


def _check_run_name(run_name: Any) -> str:
    if not isinstance(run_name, str) or not run_name.strip() or any(
        c in run_name for c in "\r\n"
    ):
        raise InputError(f"the run name must be a one-line text, not {run_name!r}",
                         item="run name")
    return run_name


def _run_folder(run_dir: str | os.PathLike) -> Path:
    run = Path(run_dir).absolute()
    if run.is_file() and run.name == INDEX_NAME:
        run = run.parent
    return run


def _read_mapping(run: Path) -> dict[str, Any]:
    path = run / MAPPING_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s: ignored, cannot read it (%s)", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _check_writable(folder: Path, what: str) -> None:
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


def _png_size(path: Path, tile_id: str) -> tuple[int, int]:
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


def _read_rgb(path: Path, tile_id: str) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise InputError("cannot decode the tile image", path=path, item=f"tile {tile_id}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def write_calibrated_tiff(
    path: str | os.PathLike, rgb: np.ndarray, mpp: float, *, tile: int = TIFF_TILE
) -> list[tuple[int, int]]:
    """Write ``rgb`` as a lossless (zlib) tiled pyramidal OME-TIFF, atomically; return
    its levels as (width, height), level 0 first.

    The pixel size ``mpp`` (µm/px) is in the TIFF resolution tags (pixels per cm,
    ``ResolutionUnit`` CENTIMETER) and in OME-XML ``PhysicalSizeX/Y`` (µm), which
    Bio-Formats (QuPath), TIAToolbox and OpenSlide-less TIFF readers use.
    """
    from histosynth.integration.demodata import write_pyramidal_ome_tiff

    written = write_pyramidal_ome_tiff(path, rgb, mpp=mpp, tile=tile, compression="zlib")
    with tifffile.TiffFile(written) as tif:
        page = tif.pages.first
        levels = [(int(page.imagewidth), int(page.imagelength))]
        levels += [(int(sub.imagewidth), int(sub.imagelength)) for sub in page.pages or []]
    return levels


def _description(row: dict[str, str], run_name: str) -> str:
    """One line of provenance for the entry's description."""
    kind = row.get("synthesis_type", "")
    text = f"histosynth {kind} tile"
    if row.get("class_name"):
        text += f" of class {row['class_name']!r}"
    if row.get("source_image"):
        text += f" from {row['source_image']}"
        if row.get("source_entry_id"):
            text += f" (entry {row['source_entry_id']})"
        if row.get("tile_x") and row.get("tile_y"):
            text += f" at x={row['tile_x']}, y={row['tile_y']}"
    details = [f"{key} {row[key]}" for key in ("model", "adapter", "seed") if row.get(key)]
    if details:
        text += "; " + ", ".join(details)
    text += f"; run {run_name}, tile {row.get('id', '')}"
    return " ".join(text.split())


# --------------------------------------------------------------------------- plan


def plan_write_back(
    project: QuPathProject, run_dir: str | os.PathLike, run_name: str
) -> tuple[list[PlannedTile], list[tuple[str, str]]]:
    """Check every row of the run against the project, writing nothing.

    Returns the synthetic tiles to add, in index order, and ``(tile id, reason)`` for the
    rows skipped (``extracted`` rows; tiles whose ``histosynth.run`` + ``histosynth.id``
    already name an entry).

    Raises:
        InputError: no index, a missing or unreadable tile image or GeoJSON, or a row
            without a usable ``mpp`` (each naming the file and the tile).
    """
    run = _run_folder(run_dir)
    index = run / INDEX_NAME
    rows = read_index(run)
    planned: list[PlannedTile] = []
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
        if existing is not None:
            if existing.stored_path is not None and existing.stored_path != (
                run / "images" / f"{tile_id}.tif"
            ):
                log.warning(
                    "%s: %s holds tile %s of a run named %r at %s, not in %s; pass another "
                    "run name to add this run as well",
                    project.file, existing.label(), tile_id, run_name,
                    existing.stored_path, run,
                )
            skipped.append((tile_id, f"already in the project ({existing.label()})"))
            continue
        if not row.get("image_path"):
            raise InputError("the row has no image_path", path=index, item=f"tile {tile_id}")
        png = run / row["image_path"]
        width, height = _png_size(png, tile_id)
        try:
            mpp = float(row.get("mpp", ""))
        except ValueError:
            mpp = math.nan
        if not (math.isfinite(mpp) and mpp > 0):
            raise InputError(
                f"mpp {row.get('mpp', '')!r} is not a positive pixel size in µm; the TIFF "
                "needs it",
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
        planned.append(PlannedTile(row, tile_id, png, tiff, geojson, mpp, width, height))
    return planned, skipped


def _check_targets(project: QuPathProject, run: Path, planned: list[PlannedTile]) -> None:
    """Writable folders, and no sidecar of another entry in the way."""
    _check_writable(project.folder, "the QuPath project folder")
    annotations = project.folder / "annotations"
    if annotations.exists():
        _check_writable(annotations, "the project's annotations folder")
    if not planned:
        return
    _check_writable(run, "the run folder")
    _check_writable(planned[0].tiff.parent, "the run's images folder")
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


# --------------------------------------------------------------------------- write


def write_run_to_project(
    project_path: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    run_name: str | None = None,
) -> WriteBackResult:
    """Add the run's synthetic tiles to a QuPath project as new image entries.

    Args:
        project_path: ``project.qpproj`` or its folder. Must not be open in QuPath.
        run_dir: the run folder (with ``index.csv``).
        run_name: ``histosynth.run`` of the entries; default: the name used when this run
            was last written into this project, else the run folder's name.

    Per synthetic row (``inpainting``/``variation``) not yet in the project: the TIFF
    ``RUN/images/<id>.tif`` (calibrated, lossless), one entry (contracts.md), and the
    row's GeoJSON copied to ``P/annotations/<entryID>.geojson``. Rows already in the
    project (same ``histosynth.run`` and ``histosynth.id``) are skipped and reported.

    Raises:
        InputError: read-only folder, missing tile image or GeoJSON, bad ``mpp``, a
            sidecar of another entry in the way, or ``project.qpproj`` changed since it
            was read; nothing is written to the project then.
    """
    project = QuPathProject(project_path, use_paquo=False)
    run = _run_folder(run_dir)
    name = _check_run_name(run_name if run_name is not None
                           else default_run_name(run, project.file))
    planned, skipped = plan_write_back(project, run, name)
    _check_targets(project, run, planned)
    project.check_unchanged()
    result = WriteBackResult(project.file, run, name, skipped=skipped)
    for tile_id, reason in skipped:
        log.info("%s: tile %s skipped: %s", project.file, tile_id, reason)
    if not planned:
        result.mapping = _record_mapping(run, project, name, [])
        return result

    added: list[tuple[PlannedTile, Any]] = []
    for tile in planned:
        rgb = _read_rgb(tile.png, tile.tile_id)
        levels = write_calibrated_tiff(tile.tiff, rgb, tile.mpp)
        status = tile.row.get("review_status") or "pending"
        entry = project.add_synthetic_entry(
            tile.tiff,
            run=name,
            tile_id=tile.tile_id,
            synthesis_type=tile.row["synthesis_type"],
            width=levels[0][0],
            height=levels[0][1],
            mpp=tile.mpp,
            source_entry_id=tile.row.get("source_entry_id", ""),
            description=_description(tile.row, name),
            review_status=status if status in REVIEW_STATUSES else "pending",
            levels=levels,
            tile_size=TIFF_TILE,
        )
        added.append((tile, entry))

    sidecars: list[Path] = []
    try:
        for tile, entry in added:
            if tile.geojson is None:
                continue
            sidecar = project.folder / "annotations" / f"{entry.entry_id}.geojson"
            if sidecar.exists():  # appeared since the check: never overwrite it
                raise InputError("a GeoJSON file of another entry is in the way", path=sidecar)
            atomic_write_bytes(sidecar, tile.geojson.read_bytes())
            sidecars.append(sidecar)
        result.backup = project.save()
    except BaseException:
        for sidecar in sidecars:
            sidecar.unlink(missing_ok=True)
        raise
    result.added = [
        WrittenTile(
            tile.tile_id,
            entry.entry_id,
            entry.name or "",
            tile.tiff,
            project.folder / "annotations" / f"{entry.entry_id}.geojson"
            if tile.geojson is not None
            else None,
        )
        for tile, entry in added
    ]
    result.mapping = _record_mapping(run, project, name, result.added)
    return result


def _record_mapping(
    run: Path, project: QuPathProject, run_name: str, added: list[WrittenTile]
) -> Path | None:
    """Update ``RUN/qupath-entries.json`` with every tile of the run now in the project."""
    entries = {
        e.metadata.get(META_ID, ""): e.entry_id for e in project.synthetic_entries(run_name)
    }
    entries.update({tile.tile_id: tile.entry_id for tile in added})
    entries.pop("", None)
    if not entries:
        return None
    path = run / MAPPING_NAME
    data = _read_mapping(run)
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


# --------------------------------------------------------------------------- review


def review_sync(
    project_path: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    run_name: str | None = None,
) -> ReviewSyncResult:
    """Copy reviewers' decisions (entry metadata ``review_status``) into ``RUN/index.csv``.

    Entries of other runs (``histosynth.run``) are ignored. A status is read
    case-insensitively, surrounding spaces ignored; an entry of the run without
    ``review_status`` counts as ``pending``. The index is rewritten atomically.

    Raises:
        InputError: a status that is not ``pending``, ``accepted`` or ``rejected``
            (naming the entry), or two entries of one tile with different decisions;
            the index is not changed then.
    """
    project = QuPathProject(project_path, use_paquo=False)
    run = _run_folder(run_dir)
    name = _check_run_name(run_name if run_name is not None
                           else default_run_name(run, project.file))
    rows = read_index(run)
    by_id = {row["id"]: row for row in rows}
    statuses: dict[str, str] = {}
    decided_by: dict[str, str] = {}
    not_in_index: list[str] = []
    for entry in project.entries:
        meta = entry.metadata
        if meta.get(META_RUN) != name:
            continue
        tile_id = meta.get(META_ID, "")
        raw = meta.get(META_REVIEW)
        if raw is None:
            log.warning("%s: %s has no review_status; counted as pending", project.file,
                        entry.label())
            status = "pending"
        else:
            status = raw.strip().lower()
            if status not in REVIEW_STATUSES:
                raise InputError(
                    f"review_status {raw!r} is not one of {', '.join(REVIEW_STATUSES)}",
                    path=project.file,
                    item=entry.label(),
                )
        if tile_id not in by_id:
            not_in_index.append(entry.label())
            log.warning("%s: %s names tile %r, which is not in %s", project.file,
                        entry.label(), tile_id, run / INDEX_NAME)
            continue
        if tile_id in statuses and statuses[tile_id] != status:
            raise InputError(
                f"two entries hold tile {tile_id!r} with different decisions "
                f"({decided_by[tile_id]}: {statuses[tile_id]}, {entry.label()}: {status})",
                path=project.file,
                item=entry.label(),
            )
        statuses[tile_id] = status
        decided_by[tile_id] = entry.label()
    changed = update_index(run, {t: {"review_status": s} for t, s in statuses.items()}) if (
        statuses
    ) else 0
    not_in_project = [
        row["id"] for row in rows
        if row["synthesis_type"] in SYNTHETIC_TYPES and row["id"] not in statuses
    ]
    counts = {status: 0 for status in REVIEW_STATUSES}
    counts.update(Counter(statuses.values()))
    return ReviewSyncResult(
        project.file, run, name, counts, changed, statuses, not_in_index, not_in_project
    )
