"""``index.csv``, the run folder's table of tiles: its columns, and reading and changing it.

One row per tile, columns :data:`INDEX_COLUMNS` (then :data:`FILE_HASH_COLUMNS`, then a
run's extra columns), RFC 4180 CSV in UTF-8. Rows are appended by
:class:`~histosynth.integration.dataset.RunWriter`; :func:`read_index` reads them (a last
line cut off by a kill is ignored), :func:`update_index` changes cells and rewrites the
file atomically. ``index.csv`` is never a link (it is rewritten in place).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.common.files import atomic_write_bytes
from histosynth.integration.errors import InputError
from histosynth.integration.run_folder import INDEX_NAME, REVIEW_STATUSES

log = logging.getLogger("histosynth.integration.dataset")

__all__ = [
    "CSV_FORMAT",
    "FILE_HASH_COLUMNS",
    "INDEX_COLUMNS",
    "cell_text",
    "index_path",
    "load_index",
    "read_index",
    "update_index",
]

INDEX_COLUMNS: tuple[str, ...] = (
    "id",
    "synthesis_type",
    "image_path",
    "mask_path",
    "annotation_path",
    "class_name",
    "source_image",
    "source_entry_id",
    "source_annotation_id",
    "tile_x",
    "tile_y",
    "tile_size",
    "mpp",
    "insert_x",
    "insert_y",
    "rotation_deg",
    "model",
    "adapter",
    "seed",
    "steps",
    "guidance_scale",
    "strength",
    "kv_compress",
    "image_sha256",
    "review_status",
    "created_at",
)
"""Required ``index.csv`` columns, in contract order. Extra columns may follow."""

FILE_HASH_COLUMNS: tuple[str, ...] = ("mask_sha256", "annotation_sha256")
"""SHA-256 of the row's mask PNG and annotation GeoJSON as written (empty when the row has
none), right after the required columns in runs written since they exist; export checks
them. Runs written before have no such columns."""


CSV_FORMAT: dict[str, Any] = {"lineterminator": "\r\n"}
"""csv writer settings of ``index.csv``: RFC 4180 line ends (a ``\\r`` in a cell is quoted)."""


def cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float | np.floating):
        return repr(float(value))
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


# --------------------------------------------------------------------------- index.csv


def split_records(text: str) -> tuple[list[str], str]:
    """Split CSV text into complete records (each ending in a newline) and a trailing rest.

    A record is complete when its quote count is even (the csv module doubles quotes inside
    quoted fields) and it ends with ``\\n``. The rest is a truncated last record, or "".
    """
    records: list[str] = []
    current: list[str] = []
    quotes = 0
    for line in re.split(r"(?<=\n)", text):
        if not line:
            continue
        current.append(line)
        quotes += line.count('"')
        if quotes % 2 == 0 and line.endswith("\n"):
            records.append("".join(current))
            current, quotes = [], 0
    return records, "".join(current)


def parse_record(record: str) -> list[str]:
    rows = list(csv.reader(io.StringIO(record, newline="")))
    return rows[0] if rows else []


def load_index(index: Path) -> tuple[list[str], list[dict[str, str]], int, bool]:
    """Parse ``index`` -> (header, rows, byte length of the complete part, truncated?)."""
    try:
        data = index.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the index: {exc.strerror or exc}", path=index) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(data) - 3:
            raise InputError(f"not UTF-8 text (byte {exc.start})", path=index) from exc
        text = data[: exc.start].decode("utf-8")  # a write cut inside the last character
    records, rest = split_records(text)
    if not records:
        if rest:
            raise InputError("the header line is incomplete", path=index)
        return [], [], 0, False
    header = parse_record(records[0])
    missing = [name for name in INDEX_COLUMNS if name not in header]
    if missing:
        raise InputError(f"required column(s) missing: {', '.join(missing)}", path=index)
    rows = []
    for number, record in enumerate(records[1:], start=2):
        cells = parse_record(record)
        if len(cells) != len(header):
            raise InputError(
                f"has {len(cells)} cells, the header has {len(header)}",
                path=index,
                item=f"record {number}",
            )
        rows.append(dict(zip(header, cells, strict=True)))
    complete = len("".join(records).encode("utf-8"))
    return header, rows, complete, bool(rest)


def index_path(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir)
    if path.is_dir():
        path = path / INDEX_NAME
    if not path.is_file():
        raise InputError("no index.csv here: not a histosynth run folder", path=run_dir)
    if path.is_symlink():  # read, and rewritten by review decisions: never someone else's
        raise InputError(
            f"index.csv is a link (to {path.resolve()}); a run folder's index is its own file",
            path=path,
        )
    return path


def read_index(run_dir: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of ``RUN/index.csv`` as ``{column: text}`` dicts, in file order.

    ``run_dir`` is the run folder (or its ``index.csv``). Every value is a string; empty
    cells are ``""``. A truncated last line (an interrupted append) is ignored.

    Raises:
        InputError: the folder or its index is missing, a required column is absent, or a
            record has the wrong number of cells.
    """
    index = index_path(run_dir)
    header, rows, _, truncated = load_index(index)
    if not header:
        raise InputError("the index is empty (no header line)", path=index)
    if truncated:
        log.warning("%s: ignoring an incomplete last line (interrupted write)", index)
    return rows


def update_index(run_dir: str | os.PathLike, updates: Mapping[str, Mapping[str, Any]]) -> int:
    """Change cells of existing rows and rewrite ``index.csv`` atomically.

    ``updates`` maps tile id → ``{column: new value}`` (e.g. ``{"t1": {"review_status":
    "accepted"}}``). Not to be called while a :class:`RunWriter` appends to the same run.
    A truncated last line is dropped. Returns the number of rows whose text changed.

    Raises:
        InputError: unknown id, unknown column, an attempt to change ``id``, or an invalid
            ``review_status``.
    """
    index = index_path(run_dir)
    header, rows, _, _ = load_index(index)
    by_id = {row["id"]: row for row in rows}
    for tile_id, changes in updates.items():
        if tile_id not in by_id:
            raise InputError("no such tile id in the index", path=index, item=str(tile_id))
        for column, value in changes.items():
            if column not in header:
                raise InputError(f"no column {column!r} in the index", path=index, item=tile_id)
            if column == "id":
                raise InputError("the id of a row cannot be changed", path=index, item=tile_id)
            if column == "review_status" and value not in REVIEW_STATUSES:
                raise InputError(
                    f"review_status {value!r} is not one of {', '.join(REVIEW_STATUSES)}",
                    path=index,
                    item=tile_id,
                )
    changed = 0
    for tile_id, changes in updates.items():
        row = by_id[tile_id]
        new = {**row, **{column: cell_text(value) for column, value in changes.items()}}
        changed += new != row
        row.update(new)
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, **CSV_FORMAT)
    writer.writerow(header)
    writer.writerows([row[name] for name in header] for row in rows)
    atomic_write_bytes(index, buffer.getvalue().encode("utf-8"))
    return changed
