"""The dataset / run folder: tiles, masks, per-tile GeoJSON, ``index.csv`` and ``run.json``.

Layout (see contracts.md, "Dataset / run folder")::

    RUN/
      run.json                  config, versions, device, model + adapter ids, timings, skipped
      index.csv                 one row per tile, columns INDEX_COLUMNS (+ extra columns)
      images/<id>.png           RGB, lossless
      masks/<id>.png            single channel uint8, 0 / 255, same size as the image
      annotations/<id>.geojson  QuPath FeatureCollection in tile pixels
      refs/<id>-<name>.png      inputs of the row (background, donor, donor-mask,
                                vessel-mask, composite, reference)

Every file is written atomically, and a tile's index row is appended only after all of its
files are in place, so a row never points at a missing file. An interrupted run is resumed
with ``RunWriter(..., resume=True)``: tiles already in the index are skipped by the caller
(``writer.has(tile_id)``) and never written twice.

Example::

    with RunWriter("out/run", config={"mode": "inpaint", "seed": 0}) as writer:
        if not writer.has("t0001"):
            writer.add_tile(TileRecord(id="t0001", synthesis_type="inpainting"),
                            image, mask, annotations)
    rows = read_index("out/run")        # list of {column: str}

Reading and changing ``index.csv`` lives in :mod:`~histosynth.integration.run_index`,
what a run folder may hold in :mod:`~histosynth.integration.run_folder`; both are
importable from here too.

Size: the run-folder format and its one writer (``RunWriter``: atomic rows, resume,
run.json) are one contract; splitting them would split the format from its checks.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import platform
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import cv2
import numpy as np

from histosynth.common.files import atomic_write_bytes, atomic_write_json
from histosynth.integration.annotations import Annotation
from histosynth.integration.errors import InputError
from histosynth.integration.images import PNG_SETTINGS, encode_mask_png, encode_rgb_png
from histosynth.integration.locks import RUN_LOCK_NAME, folder_lock
from histosynth.integration.run_folder import (
    INDEX_NAME,
    REVIEW_STATUSES,
    RUN_JSON_NAME,
    check_run_folder,
    refuse_links_in,
    remove_temporary_files,
    row_problem,
    tile_paths,
    validate_tile_id,
)
from histosynth.integration.run_index import (
    CSV_FORMAT,
    FILE_HASH_COLUMNS,
    INDEX_COLUMNS,
    cell_text,
    index_path,
    load_index,
    read_index,
    update_index,
)

log = logging.getLogger(__name__)

#: the run folder's API: what this module defines, and the index and folder rules it
#: builds on (``run_index``, ``run_folder``), importable from here
__all__ = [
    "FILE_HASH_COLUMNS",
    "FORMAT_VERSION",
    "INDEX_COLUMNS",
    "INDEX_NAME",
    "REF_NAMES",
    "REVIEW_STATUSES",
    "RUN_JSON_NAME",
    "SYNTHESIS_TYPES",
    "SYNTHETIC_TYPES",
    "EncodedTile",
    "RunWriter",
    "TileRecord",
    "check_run_folder",
    "collect_versions",
    "read_index",
    "remove_temporary_files",
    "row_problem",
    "tile_paths",
    "untrained_tile_ids",
    "update_index",
    "utc_now",
    "validate_tile_id",
]

FORMAT_VERSION = 1
"""Version of the run-folder layout written into ``run.json``."""


#: what made a row: a real tile, a donor placed as it is, a tile like a reference, a donor
#: warped into a target outline (``synthesize --mode shape``)
SYNTHESIS_TYPES = ("extracted", "inpainting", "variation", "shape")
#: the synthetic ones (every type but ``extracted``)
SYNTHETIC_TYPES = SYNTHESIS_TYPES[1:]
REF_NAMES = ("background", "donor", "donor-mask", "vessel-mask", "composite", "reference",
             "reference-mask", "shape-mask")
"""Allowed names of reference images (``refs/<id>-<name>.png``); ``*mask`` ones are masks."""



@dataclass
class TileRecord:
    """One row of ``index.csv``.

    Empty strings / ``None`` (written as an empty cell) mean "not applicable". The paths,
    ``image_sha256`` and (when empty) ``created_at`` are filled by :meth:`RunWriter.add_tile`.

    Attributes:
        id: tile id, also the file stem; characters ``[A-Za-z0-9._-]``, not starting with ".".
        synthesis_type: ``extracted``, ``inpainting`` or ``variation``.
        tile_x, tile_y: tile's top-left corner in level-0 pixels of the source slide.
        tile_size: tile width in pixels at ``mpp`` (µm/px).
        insert_x, insert_y: inserted donor's centre in tile pixels.
        rotation_deg: donor rotation in degrees.
        review_status: ``pending`` (default), ``accepted`` or ``rejected``.
        created_at: ISO-8601 UTC time; filled at write time when empty.
        extra: values of the run's extra columns (``RunWriter(extra_columns=...)``).
    """

    id: str
    synthesis_type: str
    image_path: str = ""
    mask_path: str = ""
    annotation_path: str = ""
    class_name: str = ""
    source_image: str = ""
    source_entry_id: str = ""
    source_annotation_id: str = ""
    tile_x: int | None = None
    tile_y: int | None = None
    tile_size: int | None = None
    mpp: float | None = None
    insert_x: float | None = None
    insert_y: float | None = None
    rotation_deg: float | None = None
    model: str = ""
    adapter: str = ""
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    strength: float | None = None
    kv_compress: float | None = None
    image_sha256: str = ""
    review_status: str = "pending"
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self, columns: Sequence[str]) -> list[str]:
        """The record as CSV cells for ``columns`` (required columns first, then extras)."""
        cells = []
        for name in columns:
            value = getattr(self, name) if name in INDEX_COLUMNS else self.extra.get(name)
            cells.append(cell_text(value))
        return cells


def _sha256(data: bytes | None) -> str:
    return "" if data is None else hashlib.sha256(data).hexdigest()


def utc_now() -> str:
    """Current time as ISO-8601 UTC with milliseconds, e.g. ``2025-01-31T12:00:00.000Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- run.json


def _package_version(name: str, module: str | None = None) -> str | None:
    """Version of an installed distribution without importing it (unless already imported)."""
    loaded = sys.modules.get(module or name)
    version = getattr(loaded, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_versions() -> dict[str, str]:
    """Versions of Python and of the libraries that shape outputs.

    torch and diffusers are reported when installed but never imported here (the
    integration layer must not import them).
    """
    return dict(_versions())


@functools.cache
def _versions() -> dict[str, str]:
    versions: dict[str, str] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
    }
    histosynth = sys.modules.get("histosynth")
    versions["histosynth"] = getattr(histosynth, "__version__", None) or (
        _package_version("histosynth") or "unknown"
    )
    for name in ("tiatoolbox", "shapely", "torch", "diffusers", "peft", "timm"):
        version = _package_version(name)
        if version:
            versions[name] = version
    return dict(sorted(versions.items()))


def _jsonable(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` as it will read back from JSON (tuples -> lists, paths -> strings)."""
    try:
        return json.loads(json.dumps(dict(config), default=str, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise InputError(f"config is not JSON-serialisable: {exc}", item="config") from exc


_RESERVED = frozenset(
    {
        "format_version",
        "status",
        "config",
        "command",
        "versions",
        "timings",
        "skipped",
        "counts",
        "error",
    }
)


def untrained_tile_ids(run_dir: str | os.PathLike, rows: Sequence[Mapping[str, str]]) -> set[str]:
    """Ids of the rows whose pixels came from an UNTRAINED engine (the ``tiny`` preset).

    A run's ``run.json`` records ``engine_trained``; rows of such a run are flagged unless
    they are extracted tiles or seams harmonised without the model (``harmonise``
    ``multiband`` / ``none``) on a real background. Rows whose ``model`` names an
    untrained engine (ids of the form ``tiny-untrained-…``) are flagged whatever
    ``run.json`` says.
    """
    untrained_run = False
    path = Path(run_dir) / RUN_JSON_NAME
    if path.is_file():
        try:
            untrained_run = (
                json.loads(path.read_text(encoding="utf-8")).get("engine_trained") is False
            )
        except (OSError, ValueError, AttributeError):
            untrained_run = False
    out = set()
    for row in rows:
        if row.get("synthesis_type", "") in ("", "extracted"):
            continue
        painted_background = row.get("background_kind", "") == "synthetic"
        if row.get("harmonise", "") in ("multiband", "none") and not painted_background:
            continue
        if untrained_run or "untrained" in row.get("model", "").lower():
            out.add(row.get("id", ""))
    return out


@dataclass(frozen=True)
class EncodedTile:
    """One tile ready to write: its record and the bytes of its files."""

    record: TileRecord
    image_png: bytes
    mask_png: bytes | None  # None: a row without a segmentation mask (mask_source none)
    geojson: bytes
    refs: dict[str, bytes] = field(default_factory=dict)
    image_sha256: str = ""


class RunWriter:
    """Writes tiles into a run folder; a context manager.

    Args:
        run_dir: the run folder; created if missing. Must be empty, or a histosynth run
            folder (then ``resume=True`` is needed once it holds an index).
        config: the settings that change outputs (JSON-serialisable). Stored in
            ``run.json``; on resume it must equal the stored one.
        resume: continue an interrupted run: read the ids already written, repair a
            truncated last index line.
        command: the command line, for the record.
        extra_columns: names of index columns after the required ones, fixed for the run;
            values come from ``TileRecord.extra``.
        device: where the run ran (e.g. ``"cuda:0 NVIDIA H100"``), for the record.
        png: ``"small"`` (zlib level 1, SUB filter) or ``"fast"`` (stored, no filter:
            ~8× faster to write, ~1.6× larger on H&E); both lossless.

    ``run.json`` is written when the writer opens (``status: "running"``) and when it
    closes (``"complete"``, or ``"interrupted"`` / ``"failed"`` when the ``with`` block exits
    by KeyboardInterrupt / another exception).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        config: Mapping[str, Any],
        resume: bool = False,
        command: str = "",
        extra_columns: Sequence[str] = (),
        device: str | None = None,
        png: str = "small",
    ) -> None:
        if png not in PNG_SETTINGS:
            raise ValueError(f"png must be one of {', '.join(PNG_SETTINGS)}, not {png!r}")
        self._png = PNG_SETTINGS[png]
        self.run_dir = Path(run_dir)
        self.config = _jsonable(config)
        self.resume = resume
        self.command = command
        extra = list(extra_columns)
        bad = [name for name in extra
               if name in INDEX_COLUMNS or name in FILE_HASH_COLUMNS or not name]
        if bad or len(set(extra)) != len(extra):
            raise InputError(
                f"extra columns must be new, unique, non-empty names: {extra}",
                item="extra_columns",
            )
        self.columns: tuple[str, ...] = INDEX_COLUMNS + FILE_HASH_COLUMNS + tuple(extra)
        self.info: dict[str, Any] = {"device": device}
        for key in ("model", "adapter"):
            if key in self.config:
                self.info[key] = self.config[key]
        self._ids: set[str] = set()
        self._lock = threading.Lock()
        self._claimed: set[str] = set()  # ids whose files are being written (commit)
        self._counts: Counter[str] = Counter()
        self._classes: Counter[str] = Counter()
        self._skipped: list[dict[str, str]] = []
        self._written = 0
        self._sessions = 1
        self._open = False
        self._hold = contextlib.ExitStack()
        self._started_at = ""
        self._t0 = 0.0

    # -- state

    @property
    def index_path(self) -> Path:
        """``RUN/index.csv``."""
        return self.run_dir / INDEX_NAME

    @property
    def run_json_path(self) -> Path:
        """``RUN/run.json``."""
        return self.run_dir / RUN_JSON_NAME

    @property
    def ids(self) -> frozenset[str]:
        """Ids of every tile in the index (including those of earlier sessions)."""
        return frozenset(self._ids)

    def has(self, tile_id: str) -> bool:
        """True when ``tile_id`` already has a row in the index."""
        return tile_id in self._ids

    # -- open / close

    def __enter__(self) -> RunWriter:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close("complete")
        elif issubclass(exc_type, KeyboardInterrupt | SystemExit | GeneratorExit):
            self.close("interrupted", error=exc)
        else:
            self.close("failed", error=exc)

    def open(self) -> RunWriter:
        """Check the folder, read an existing index on resume, write ``run.json``."""
        if self._open:
            return self
        run_dir = self.run_dir
        check_run_folder(run_dir, resume=self.resume)
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        hold = contextlib.ExitStack()
        try:
            # one writer per run folder: a second one refuses (its temporary files and
            # index are the first one's); held until close()
            hold.enter_context(
                folder_lock(run_dir, RUN_LOCK_NAME, "the run folder", "the run folder")
            )
            check_run_folder(run_dir, resume=self.resume)  # again, now that it is ours
            refuse_links_in(run_dir, self.run_json_path)  # read, then rewritten
            if self.resume and self.run_json_path.is_file():
                self._check_config()
            if self.index_path.is_symlink():  # rows are appended to it: never through a link
                index_path(self.index_path)  # refuses, naming it
            if self.resume and self.index_path.is_file():
                self._read_existing()
            remove_temporary_files(run_dir)  # of a killed writer: none is alive now
            self._started_at = utc_now()
            self._t0 = time.monotonic()
            self._open = True
            self._write_run_json("running")
        except BaseException:
            self._open = False
            hold.close()
            if created:
                with contextlib.suppress(OSError):
                    run_dir.rmdir()  # only when still empty: no partial output
            raise
        self._hold = hold
        return self

    def close(self, status: str = "complete", *, error: BaseException | None = None) -> None:
        """Write the final ``run.json`` with ``status`` and stop accepting tiles."""
        if not self._open:
            return
        self._open = False
        try:
            self._write_run_json(status, error=error, finished=True)
        finally:
            self._hold.close()

    def _check_config(self) -> None:
        try:
            stored = json.loads(self.run_json_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read run.json: {exc}", path=self.run_json_path) from exc
        if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict):
            raise InputError("run.json has no config object", path=self.run_json_path)
        old = stored["config"]
        differing = sorted(
            key for key in set(old) | set(self.config) if old.get(key) != self.config.get(key)
        )
        if differing:
            details = "; ".join(
                f"{key}: {old.get(key)!r} -> {self.config.get(key)!r}" for key in differing
            )
            raise InputError(
                f"cannot resume with different settings ({details}); use the original "
                "settings or a new folder",
                path=self.run_dir,
                item="config",
            )
        self._sessions = int(stored.get("sessions", 1) or 1) + 1

    def _read_existing(self) -> None:
        index = self.index_path
        header, rows, complete, truncated = load_index(index)
        if header:
            # a run of an older histosynth has no file-hash columns: it goes on without
            missing = [n for n in self.columns if n not in header and n not in FILE_HASH_COLUMNS]
            if missing:
                raise InputError(
                    f"cannot resume: the index lacks the extra column(s) {', '.join(missing)}",
                    path=index,
                )
            self.columns = tuple(header)
        if truncated:
            log.warning("%s: removing an incomplete last line (interrupted write)", index)
            data = index.read_bytes()[:complete]
            atomic_write_bytes(index, data)
        if not header:
            index.unlink()  # empty file: recreated with a header on the first row
        kept, dropped = [], []
        for row in rows:
            if row["id"] in self._ids:
                raise InputError("duplicate tile id in the index", path=index, item=row["id"])
            problem = row_problem(self.run_dir, row)
            if problem is not None:
                log.warning("%s: tile %r: %s; it is made again", index, row["id"], problem)
                dropped.append(row)
                continue
            kept.append(row)
            self._ids.add(row["id"])
            self._count(row["synthesis_type"], row["class_name"])
        if dropped:  # the index without them: the run makes them again
            buffer = io.StringIO(newline="")
            csv_writer = csv.writer(buffer, **CSV_FORMAT)
            csv_writer.writerow(header)
            csv_writer.writerows([row[name] for name in header] for row in kept)
            atomic_write_bytes(index, buffer.getvalue().encode("utf-8"))

    def _count(self, synthesis_type: str, class_name: str) -> None:
        self._counts[synthesis_type] += 1
        self._classes[class_name] += 1

    # -- run.json

    def set_info(self, **info: Any) -> None:
        """Record run facts in ``run.json`` (``model=``, ``adapter=``, ``device=``, …)."""
        clash = sorted(set(info) & _RESERVED)
        if clash:
            raise ValueError(f"reserved run.json keys: {', '.join(clash)}")
        self.info.update(_jsonable(info))
        if self._open:
            self._write_run_json("running")

    def skip(self, item: str, reason: str, *, warn: bool = True) -> None:
        """Record that ``item`` (an annotation, entry, tile …) was skipped and why; logged as
        a warning unless ``warn`` is false (the caller then sums such skips up itself)."""
        self._skipped.append({"item": str(item), "reason": str(reason)})
        if warn:
            log.warning("skipped %s: %s", item, reason)

    @property
    def skipped(self) -> list[dict[str, str]]:
        """Items skipped in this session, as ``{"item", "reason"}`` dicts."""
        return [dict(entry) for entry in self._skipped]

    def _write_run_json(
        self, status: str, *, error: BaseException | None = None, finished: bool = False
    ) -> None:
        seconds = time.monotonic() - self._t0
        document: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "status": status,
            "config": self.config,
            "command": self.command,
            "versions": collect_versions(),
            **self.info,
            "sessions": self._sessions,
            "timings": {
                "started_at": self._started_at,
                "finished_at": utc_now() if finished else None,
                "seconds": round(seconds, 3) if finished else None,
                "tiles_written": self._written,
            },
            "skipped": self.skipped,
            "counts": {
                "tiles": len(self._ids),
                "tiles_written": self._written,
                "skipped": len(self._skipped),
                "by_synthesis_type": dict(sorted(self._counts.items())),
                "by_class": dict(sorted(self._classes.items())),
            },
        }
        if error is not None:
            document["error"] = f"{type(error).__name__}: {error}"
        atomic_write_json(refuse_links_in(self.run_dir, self.run_json_path), document)

    # -- tiles

    def add_tile(
        self,
        record: TileRecord,
        image: np.ndarray,
        mask: np.ndarray | None,
        annotations: Sequence[Annotation],
        *,
        refs: Mapping[str, np.ndarray] | None = None,
        annotation_kwargs: Mapping[str, Any] | None = None,
    ) -> TileRecord:
        """Write one tile's files, then append its index row; return the completed record.

        The same as ``commit(encode_tile(...))``.

        Args:
            record: the row; paths, ``image_sha256`` and an empty ``created_at`` are filled.
            image: (H, W, 3) uint8 RGB.
            mask: (H, W) bool or uint8; non-zero becomes 255. ``None``: the row has no
                segmentation mask (no mask file, an empty ``mask_path``; its ``mask_source``
                extra column must say ``none``).
            annotations: in tile pixel coordinates, unless ``annotation_kwargs`` (passed to
                ``write_annotations``: ``offset``, ``scale``, ``clip_to``) says otherwise.
            refs: reference images by name (``REF_NAMES``); ``*mask`` ones (H, W), others
                (H, W, 3) uint8 RGB.

        Raises:
            InputError: unsafe or duplicate id, bad arrays, unknown ref name or extra column.
            RuntimeError: the writer is not open.
        """
        return self.commit(
            self.encode_tile(
                record, image, mask, annotations, refs=refs, annotation_kwargs=annotation_kwargs
            )
        )

    def encode_tile(
        self,
        record: TileRecord,
        image: np.ndarray,
        mask: np.ndarray | None,
        annotations: Sequence[Annotation],
        *,
        refs: Mapping[str, np.ndarray] | None = None,
        annotation_kwargs: Mapping[str, Any] | None = None,
    ) -> EncodedTile:
        """Validate and encode one tile (PNG, GeoJSON bytes) without touching the run.

        Thread-safe and free of I/O, so several tiles can be encoded in parallel while
        :meth:`commit` writes them one at a time. Arguments as :meth:`add_tile`.
        """
        tile_id = validate_tile_id(record.id)
        if record.synthesis_type not in SYNTHESIS_TYPES:
            raise InputError(
                f"synthesis_type {record.synthesis_type!r} is not one of "
                f"{', '.join(SYNTHESIS_TYPES)}",
                item=tile_id,
            )
        if record.review_status not in REVIEW_STATUSES:
            raise InputError(
                f"review_status {record.review_status!r} is not one of "
                f"{', '.join(REVIEW_STATUSES)}",
                item=tile_id,
            )
        unknown = sorted(
            set(record.extra) - set(self.columns[len(INDEX_COLUMNS) :]) - set(FILE_HASH_COLUMNS)
        )
        if unknown:
            raise InputError(
                f"extra value(s) for column(s) not declared in extra_columns: {unknown}",
                item=tile_id,
            )
        image_png = encode_rgb_png(image, f"{tile_id}: image", self._png)
        height, width = image.shape[:2]
        if mask is None and record.extra.get("mask_source") != "none":
            raise InputError("a row without a mask must have mask_source 'none'", item=tile_id)
        mask_png = (
            None if mask is None else encode_mask_png(mask, (height, width), f"{tile_id}: mask")
        )
        ref_pngs = {}
        for name, array in (refs or {}).items():
            if name not in REF_NAMES:
                raise InputError(
                    f"unknown reference name {name!r} (expected one of {', '.join(REF_NAMES)})",
                    item=tile_id,
                )
            what = f"{tile_id}: ref {name}"
            ref_pngs[name] = (
                encode_mask_png(array, None, what)
                if name.endswith("mask")
                else encode_rgb_png(array, what, self._png)
            )

        from histosynth.integration.geojson import geojson_bytes

        return EncodedTile(
            record=record,
            image_png=image_png,
            mask_png=mask_png,
            geojson=geojson_bytes(annotations, **dict(annotation_kwargs or {})),
            refs=ref_pngs,
            image_sha256=hashlib.sha256(image_png).hexdigest(),
        )

    def commit(self, tile: EncodedTile) -> TileRecord:
        """Write an encoded tile's files atomically, then append its index row.

        Thread-safe: several threads may commit at once; the files are written in the
        calling thread (its id claimed first, so a duplicate fails before any write) and
        only the index row is appended under the writer's lock.
        Returns the completed record (paths, ``image_sha256``, ``created_at`` filled).
        """
        if not self._open:
            raise RuntimeError("RunWriter is not open; use it in a 'with' block")
        record = tile.record
        tile_id = record.id
        with self._lock:
            if tile_id in self._ids or tile_id in self._claimed:
                raise InputError("a tile with this id is already in the run", item=tile_id)
            self._claimed.add(tile_id)
        written: list[Path] = []  # removed again unless the row lands in the index
        try:
            paths = tile_paths(tile_id)
            image_rel, mask_rel = paths["image_path"], paths["mask_path"]
            annotation_rel = paths["annotation_path"]
            for name, data in tile.refs.items():
                ref = self.run_dir / "refs" / f"{tile_id}-{name}.png"
                written.append(refuse_links_in(self.run_dir, ref))
                atomic_write_bytes(written[-1], data)
            if tile.mask_png is None:
                mask_rel = ""
            for rel, data in (
                (image_rel, tile.image_png),
                (mask_rel, tile.mask_png),
                (annotation_rel, tile.geojson),
            ):
                if data is None:
                    continue
                written.append(refuse_links_in(self.run_dir, self.run_dir / rel))
                atomic_write_bytes(written[-1], data)
            done = dataclasses.replace(
                record,
                image_path=image_rel,
                mask_path=mask_rel,
                annotation_path=annotation_rel,
                image_sha256=tile.image_sha256 or hashlib.sha256(tile.image_png).hexdigest(),
                created_at=record.created_at or utc_now(),
                extra={
                    **record.extra,
                    "mask_sha256": _sha256(tile.mask_png),
                    "annotation_sha256": _sha256(tile.geojson),
                },
            )
            with self._lock:
                if not self._open:
                    raise RuntimeError("RunWriter was closed while a tile was being written")
                self._append_row(done.row(self.columns))
                written = []
                self._ids.add(tile_id)
                self._written += 1
                self._count(done.synthesis_type, done.class_name)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        finally:
            with self._lock:
                self._claimed.discard(tile_id)
        return done

    def _append_row(self, cells: list[str]) -> None:
        buffer = io.StringIO(newline="")
        csv.writer(buffer, **CSV_FORMAT).writerow(cells)
        row = buffer.getvalue().encode("utf-8")
        index = self.index_path
        if not index.exists():
            header = io.StringIO(newline="")
            csv.writer(header, **CSV_FORMAT).writerow(self.columns)
            atomic_write_bytes(index, header.getvalue().encode("utf-8") + row)
            return
        fd = os.open(index, os.O_WRONLY | os.O_APPEND)
        try:
            view = memoryview(row)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
