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

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histosynth.common.files import atomic_write_bytes
from histosynth.integration.dataset import (
    INDEX_NAME,
    REVIEW_STATUSES,
    read_index,
    update_index,
)
from histosynth.integration.decisions import latest_decision_times, replay_decisions
from histosynth.integration.errors import InputError
from histosynth.integration.images import read_rgb
from histosynth.integration.locks import RUN_LOCK_NAME, folder_lock
from histosynth.integration.qupath import journal
from histosynth.integration.qupath.entries import META_ID, META_REVIEW, META_RUN
from histosynth.integration.qupath.plan import (
    MAPPING_NAME,
    SYNTHETIC_TYPES,
    PlannedEntry,
    WrittenTile,
    check_run_name,
    default_run_name,
    make_plan,
    plan_write_back,
    record_mapping,
    run_folder,
)
from histosynth.integration.qupath.project import QuPathProject, locked_project
from histosynth.integration.tiff import CALIBRATED_TILE, write_calibrated_tiff

log = logging.getLogger(__name__)

__all__ = [
    "MAPPING_NAME",
    "SYNTHETIC_TYPES",
    "PlannedEntry",
    "ReviewSyncResult",
    "WriteBackResult",
    "WrittenTile",
    "default_run_name",
    "plan_write_back",
    "review_sync",
    "write_run_to_project",
]


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
        kept_newer: tile ids whose decision in the run (``review serve``'s log) is newer
            than the project's last save, so the project's older status was not copied.
    """

    project_file: Path
    run_dir: Path
    run_name: str
    counts: dict[str, int]
    changed: int
    statuses: dict[str, str]
    not_in_index: list[str] = field(default_factory=list)
    not_in_project: list[str] = field(default_factory=list)
    kept_newer: list[str] = field(default_factory=list)

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
        if self.kept_newer:
            text += (
                f"; {len(self.kept_newer)} newer decision(s) of the run kept "
                "(made in the browser after the project was last saved)"
            )
        return text


# --------------------------------------------------------------------------- write


def write_run_to_project(
    project_path: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    run_name: str | None = None,
    wait_s: float = 0.0,
) -> WriteBackResult:
    """Add the run's synthetic tiles to a QuPath project as new image entries.

    Args:
        project_path: ``project.qpproj`` or its folder. Must not be open in QuPath.
        run_dir: the run folder (with ``index.csv``).
        run_name: ``histosynth.run`` of the entries; default: the name used when this run
            was last written into this project, else the run folder's name.
        wait_s: how long to wait for another writer's project lock, seconds
            (:func:`~histosynth.integration.locks.project_lock`, held from the
            plan to the save).

    Per synthetic row (``inpainting``/``variation``) not yet in the project: the TIFF
    ``RUN/images/<id>.tif`` (calibrated, lossless), one entry (contracts.md), and the
    row's GeoJSON copied to ``P/annotations/<entryID>.geojson``. Rows already in the
    project (same ``histosynth.run`` and ``histosynth.id``) are skipped and reported.

    Raises:
        InputError: read-only folder, missing tile image or GeoJSON, bad ``mpp``, a
            sidecar of another entry in the way, or ``project.qpproj`` changed since it
            was read; nothing is written to the project then.
    """
    with locked_project(project_path, wait_s=wait_s) as project:
        return _write_locked(project, run_dir, run_name)


def _write_locked(
    project: QuPathProject, run_dir: str | os.PathLike, run_name: str | None
) -> WriteBackResult:
    # what a killed write-back left: its unsaved sidecars and temporary files
    journal.recover(project.folder, {e.entry_id for e in project.entries})
    plan = make_plan(project, run_dir, run_name)
    project.check_unchanged()
    run, name = plan.run, plan.run_name
    result = WriteBackResult(project.file, run, name, skipped=plan.skipped)
    for tile_id, reason in plan.skipped:
        log.info("%s: tile %s skipped: %s", project.file, tile_id, reason)
    if not plan.entries:
        result.mapping = record_mapping(run, project, name, [])
        return result

    added: list[tuple[PlannedEntry, Any]] = []
    for tile in plan.entries:
        rgb = read_rgb(tile.png, f"tile {tile.tile_id}")
        levels = write_calibrated_tiff(tile.tiff, rgb, tile.mpp)
        entry = project.add_image_entry(
            tile.tiff,
            width=levels[0][0],
            height=levels[0][1],
            mpp=tile.mpp,
            image_name=tile.image_name,
            description=tile.description,
            metadata=tile.metadata,
            tags=tile.tags,
            levels=levels,
            tile_size=CALIBRATED_TILE,
        )
        added.append((tile, entry))

    planned = [
        (
            entry.entry_id,
            project.folder / "annotations" / f"{entry.entry_id}.geojson",
            tile.geojson.read_bytes(),
        )
        for tile, entry in added
        if tile.geojson is not None
    ]
    sidecars: list[Path] = []
    journal.begin(project.folder, run, name, planned)
    try:
        for _, sidecar, data in planned:
            if sidecar.exists():  # appeared since the check: never overwrite it
                raise InputError("a GeoJSON file of another entry is in the way", path=sidecar)
            atomic_write_bytes(sidecar, data)
            sidecars.append(sidecar)
        result.backup = project.save()
    except BaseException:
        for sidecar in sidecars:
            sidecar.unlink(missing_ok=True)
        journal.finish(project.folder)
        raise
    journal.finish(project.folder)
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
    result.mapping = record_mapping(run, project, name, result.added)
    return result


# --------------------------------------------------------------------------- review


def review_sync(
    project_path: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    run_name: str | None = None,
    wait_s: float = 0.0,
) -> ReviewSyncResult:
    """Copy reviewers' decisions (entry metadata ``review_status``) into ``RUN/index.csv``.

    Entries of other runs (``histosynth.run``) are ignored. A status is read
    case-insensitively, surrounding spaces ignored; an entry of the run without
    ``review_status`` counts as ``pending``. The index is rewritten atomically.

    First, the browser decisions logged in ``RUN/review/decisions.jsonl`` that
    ``index.csv`` does not hold yet (a review server killed before writing it) are
    written into it. A tile decided in the browser (``histosynth review serve``)
    after the project was last saved (its ``modifyTimestamp``, else the file's time) keeps
    the run's decision: the project cannot hold a newer one.

    Raises:
        InputError: a status that is not ``pending``, ``accepted`` or ``rejected``
            (naming the entry), or two entries of one tile with different decisions;
            the index is not changed then.
    """
    project = QuPathProject(project_path, use_paquo=False)
    run = run_folder(run_dir)
    name = check_run_name(run_name if run_name is not None else default_run_name(run, project.file))
    with folder_lock(run, RUN_LOCK_NAME, "the run folder", "the run folder", wait_s=wait_s):
        replayed = replay_decisions(run)  # a review server killed before its index write
    if replayed:
        log.warning("%s: %d logged browser decision(s) written into index.csv first", run,
                    len(replayed))
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
            log.warning(
                "%s: %s has no review_status; counted as pending", project.file, entry.label()
            )
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
            log.warning(
                "%s: %s names tile %r, which is not in %s",
                project.file,
                entry.label(),
                tile_id,
                run / INDEX_NAME,
            )
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
    saved_at = (
        project.modify_timestamp / 1000.0
        if project.modify_timestamp
        else project.file.stat().st_mtime
    )
    decided_at = latest_decision_times(run)
    current = {row["id"]: (row.get("review_status") or "pending") for row in rows}
    kept_newer = sorted(
        tile_id
        for tile_id, status in statuses.items()
        if status != current.get(tile_id) and decided_at.get(tile_id, 0.0) > saved_at
    )
    for tile_id in kept_newer:
        del statuses[tile_id]
    changed = 0
    if statuses:  # the run's index is changed only with the run folder's lock held
        with folder_lock(run, RUN_LOCK_NAME, "the run folder", "the run folder", wait_s=wait_s):
            changed = update_index(run, {t: {"review_status": s} for t, s in statuses.items()})
    not_in_project = [
        row["id"]
        for row in rows
        if row["synthesis_type"] in SYNTHETIC_TYPES and row["id"] not in statuses
    ]
    counts = {status: 0 for status in REVIEW_STATUSES}
    counts.update(Counter(statuses.values()))
    return ReviewSyncResult(
        project.file,
        run,
        name,
        counts,
        changed,
        statuses,
        not_in_index,
        not_in_project,
        kept_newer,
    )
