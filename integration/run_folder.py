"""The run folder's own rules: what may be in it, what a row's files are, and whether a
row on disk is still the one written.

* :func:`check_run_folder` — a folder can receive a run (missing, empty, a run folder;
  ``--resume`` once it holds an index) and takes a 1 MiB pre-flight write
  (:func:`probe_writable`), so a read-only or full disk fails before any work.
* :func:`remove_temporary_files` — what a killed writer left (``.<name>.XXXXXXXX.tmp``).
* :func:`tile_paths`, :func:`validate_tile_id` — a tile's file names; a safe id.
* :func:`row_problem` — why an ``index.csv`` row can no longer be trusted (resume makes it
  again, write-back refuses it).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

from histosynth.integration.errors import InputError
from histosynth.integration.locks import RUN_LOCK_NAME

__all__ = [
    "INDEX_NAME",
    "PROBE_BYTES",
    "REVIEW_STATUSES",
    "RUN_JSON_NAME",
    "check_run_folder",
    "has_mask",
    "probe_writable",
    "refuse_links_in",
    "remove_temporary_files",
    "review_status",
    "row_problem",
    "tile_paths",
    "validate_tile_id",
]

log = logging.getLogger("histosynth.integration.dataset")

INDEX_NAME = "index.csv"
RUN_JSON_NAME = "run.json"
REVIEW_STATUSES = ("pending", "accepted", "rejected")

_ID_RE = re.compile(r"[A-Za-z0-9._-]+")
_ID_MAX_LEN = 200


def validate_tile_id(tile_id: str) -> str:
    """Return ``tile_id`` if it is safe as a file stem, else raise :class:`InputError`.

    Allowed: 1–200 characters of ``[A-Za-z0-9._-]``, not starting with ``.``.
    """
    if (
        not isinstance(tile_id, str)
        or not _ID_RE.fullmatch(tile_id)
        or tile_id.startswith(".")
        or len(tile_id) > _ID_MAX_LEN
    ):
        raise InputError(
            f"tile id {tile_id!r} is not usable as a file name "
            f"(1-{_ID_MAX_LEN} characters of A-Z a-z 0-9 . _ -, not starting with '.')",
            item="tile id",
        )
    return tile_id


def tile_paths(tile_id: str) -> dict[str, str]:
    """A tile's files in its run folder, relative, by index column."""
    return {
        "image_path": f"images/{tile_id}.png",
        "mask_path": f"masks/{tile_id}.png",
        "annotation_path": f"annotations/{tile_id}.geojson",
    }


def review_status(row: Mapping[str, str]) -> str:
    """A row's review status as read everywhere: case and surrounding space ignored, empty
    → ``pending`` (an unknown value is returned as found, lower-cased, for the caller to
    report)."""
    return (row.get("review_status") or "").strip().lower() or "pending"


def has_mask(row: Mapping[str, str]) -> bool:
    """Whether a row (of a run's ``index.csv`` or an export's ``metadata.csv``) carries a
    segmentation mask that matches its image: not a row with ``mask_source`` ``none`` (a
    variation), nor one of an older run whose variation rows carried their reference's
    unaligned mask (``reference``), nor an exported row with ``has_mask`` false."""
    if (row.get("has_mask") or "").strip().lower() == "false":
        return False
    return (row.get("mask_source") or "").strip().lower() not in ("none", "reference")


def row_problem(run_dir: Path, row: dict[str, str]) -> str | None:
    """What is wrong with an index row as found on disk, or ``None``: the id must be a
    safe file stem; its image, mask and GeoJSON must be regular files inside the run; their
    SHA-256 must be the recorded ones (``image_sha256``, ``mask_sha256``,
    ``annotation_sha256`` where the run has them); the review status a known one. Resume makes
    such a row again; write-back refuses it."""
    tile_id = row.get("id", "")
    try:
        validate_tile_id(tile_id)
    except InputError as exc:
        return exc.message
    root = run_dir.resolve()
    canonical = tile_paths(tile_id)
    for column in ("image_path", "mask_path", "annotation_path"):
        rel = row.get(column, "")
        if not rel:
            if column == "annotation_path" or (column == "mask_path" and not has_mask(row)):
                continue
            return f"no {column}"
        path = (run_dir / rel).resolve()
        if path == root or root not in path.parents:
            return f"{column} {rel!r} lies outside the run folder"
        if rel.replace("\\", "/") != canonical[column]:  # another tile's file: a changed id
            return f"{column} {rel!r} is not the file of tile {tile_id!r}"
        if not path.is_file():
            return f"{column} {rel!r} is missing"
    for column, what, sha in (("image_path", "image", "image_sha256"),
                              ("mask_path", "mask", "mask_sha256"),
                              ("annotation_path", "annotation", "annotation_sha256")):
        digest = row.get(sha, "")  # mask / annotation hashes: newer runs only
        if digest and row.get(column):
            actual = hashlib.sha256((run_dir / row[column]).read_bytes()).hexdigest()
            if actual != digest:
                return f"the {what} {row[column]!r} is not the one recorded (SHA-256 differs)"
    status = row.get("review_status", "")
    if status and status.strip().lower() not in REVIEW_STATUSES:
        return f"review_status {status!r} is not one of {', '.join(REVIEW_STATUSES)}"
    return None


#: The atomic writes' temporary files (``.<name>.<8 random chars>.tmp``).
_TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def remove_temporary_files(run_dir: Path) -> int:
    """Remove the temporary files a killed writer left in the run folder and its first
    level of subfolders; returns how many. Call only while no writer of the run lives."""
    removed = 0
    for folder in (run_dir, *(p for p in run_dir.iterdir() if p.is_dir())):
        for path in folder.iterdir():
            if _TEMP_FILE.match(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
    if removed:
        log.info("%s: removed %d temporary file(s) of an interrupted run", run_dir, removed)
    return removed


def check_run_folder(run_dir: str | os.PathLike, *, resume: bool = False) -> None:
    """Raise ``InputError`` unless ``run_dir`` can receive a run: it is missing, an empty
    folder, or a histosynth run folder (which needs ``resume`` once it holds an index).

    ``RunWriter`` checks this when it opens; workflows call it first, before slow work.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError("is a file; the output must be a folder", path=run_dir)
    has_index = (run_dir / INDEX_NAME).is_file()
    has_run_json = (run_dir / RUN_JSON_NAME).is_file()
    # a run killed before its first run.json landed leaves only a temporary file
    contents = (
        [p for p in run_dir.iterdir() if not (_TEMP_FILE.match(p.name) or p.name == RUN_LOCK_NAME)]
        if run_dir.is_dir()
        else []
    )
    if contents and not (has_index or has_run_json):
        raise InputError(
            "the folder is not empty and is not a histosynth run folder "
            "(no run.json or index.csv); choose a new or empty folder",
            path=run_dir,
        )
    if has_index and not resume:
        raise InputError(
            "already holds a run (index.csv); pass --resume to continue it or choose a new folder",
            path=run_dir,
        )
    probe_writable(run_dir)


def refuse_links_in(run_dir: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` (inside ``run_dir``) unless it, or a folder between it and the run folder,
    is a symbolic link: a run's files are written as its own files only, never through a
    link planted to make a write land elsewhere.

    Raises:
        InputError: naming the link and where it leads.
    """
    root, target = Path(run_dir), Path(path)
    try:
        rel = target.relative_to(root)
    except ValueError:
        raise InputError("is not inside the run folder", path=target) from None
    current = root
    for part in rel.parts:
        current = current / part
        if current.is_symlink():
            raise InputError(
                f"is a link (to {os.path.realpath(current)}); a run's files are written as "
                "its own files, never through a link",
                path=current,
            )
    return target


#: Bytes the pre-flight write test writes (and removes): a full disk fails it.
PROBE_BYTES = 1 << 20


def probe_writable(folder: Path) -> None:
    """InputError when ``folder`` (or, while it does not exist, the nearest existing folder
    above it) cannot take a :data:`PROBE_BYTES` file: read-only, no permission, or full.
    Run before slow work, so that the error comes before a model is loaded."""
    target = folder
    while not target.exists() and target.parent != target:
        target = target.parent
    if not target.is_dir():
        raise InputError("is not a folder", path=target)
    try:
        fd, probe = tempfile.mkstemp(prefix=".histosynth-probe-", dir=target)
    except OSError as exc:
        raise InputError(
            f"cannot write the output folder ({exc.strerror or exc}); nothing was written",
            path=folder,
        ) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(bytes(PROBE_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise InputError(
            f"cannot write the output folder ({exc.strerror or exc}); nothing was written",
            path=folder,
        ) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)
