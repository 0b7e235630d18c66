"""The reviewers' decisions log of a run: ``RUN/review/decisions.jsonl``.

One JSON object per ``\n``-terminated line (ASCII: every other character escaped, so no
text a reviewer types — U+2028, U+0085, ``\r`` — can split a record), appended, flushed
and fsynced before the decision is applied to
``index.csv``: ``time`` (UTC, ISO 8601 with ms and ``Z``), ``id``, ``status``, ``before``
(the status it replaced), ``reviewer``, ``comment``, ``undo`` (it undoes the previous
decision of the page), ``source`` (``browser``). A line torn by a kill is skipped when
read, and the next append starts on a line of its own, so the log is valid after any crash.

The log is the durable record; ``index.csv`` follows it. ``RUN/review/decisions.applied``
holds how many bytes of the log are in ``index.csv`` (written after each index write), and
:func:`replay_decisions` applies the rest — what a server killed between its log append
and its index write left behind. It is idempotent: replaying twice changes nothing more.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from histosynth.common.files import atomic_write_bytes
from histosynth.integration.dataset import REVIEW_STATUSES, read_index, update_index
from histosynth.integration.run_folder import refuse_links_in, review_status

log = logging.getLogger(__name__)

__all__ = [
    "APPLIED_NAME",
    "DECISIONS_NAME",
    "append_decision",
    "applied_bytes",
    "decision_time",
    "latest_decision_times",
    "log_size",
    "mark_applied",
    "pending_decisions",
    "read_decisions",
    "replay_decisions",
    "rows_with_logged_decisions",
    "utc_now_ms",
]

#: The decisions log, relative to the run folder.
DECISIONS_NAME = "review/decisions.jsonl"
#: How many bytes of the log ``index.csv`` holds (JSON ``{"log_bytes": N}``).
APPLIED_NAME = "review/decisions.applied"


def utc_now_ms() -> str:
    """Now in UTC, ISO 8601 with milliseconds and ``Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _log_path(run_dir: str | os.PathLike) -> Path:
    # appended to: never someone else's file
    return refuse_links_in(run_dir, Path(run_dir) / DECISIONS_NAME)


def append_decision(run_dir: str | os.PathLike, record: Mapping[str, Any]) -> int:
    """Append one decision to the run's log (flushed and fsynced before it returns); the
    log's size after it, bytes. A line torn by an earlier kill is ended first."""
    path = _log_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(dict(record), ensure_ascii=True) + "\n").encode("ascii")
    with open(path, "ab+") as handle:
        end = handle.seek(0, os.SEEK_END)
        if end:
            handle.seek(end - 1)
            if handle.read(1) != b"\n":
                line = b"\n" + line
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())
        return handle.tell()


def log_size(run_dir: str | os.PathLike) -> int:
    """Bytes in the run's decisions log (0 when there is none)."""
    path = _log_path(run_dir)
    return path.stat().st_size if path.is_file() else 0


def read_decisions(run_dir: str | os.PathLike, start: int = 0) -> list[dict[str, Any]]:
    """The decisions logged in the run, oldest first (a torn line is skipped); from byte
    ``start`` of the log (the start of a line) on."""
    path = _log_path(run_dir)
    if not path.is_file():
        return []
    with open(path, "rb") as handle:
        handle.seek(start)
        text = handle.read().decode("utf-8", errors="replace")
    out = []
    # split on "\n" alone: str.splitlines() also breaks at U+2028, U+0085, \r … which a
    # log written by an older version may hold inside a comment
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a write cut off by a kill
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            out.append(record)
    return out


def latest_decision_times(run_dir: str | os.PathLike) -> dict[str, float]:
    """Tile id → the time of its latest logged decision, seconds since the epoch."""
    out: dict[str, float] = {}
    for record in read_decisions(run_dir):
        when = decision_time(record)
        if when is not None:
            out[record["id"]] = max(out.get(record["id"], 0.0), when)
    return out


def decision_time(record: Mapping[str, Any]) -> float | None:
    """A record's ``time``, seconds since the epoch (None when missing or unreadable)."""
    try:
        when = datetime.fromisoformat(str(record.get("time", "")).replace("Z", "+00:00"))
    except ValueError:
        return None
    return when.timestamp() if when.tzinfo else None


def applied_bytes(run_dir: str | os.PathLike) -> int | None:
    """Bytes of the log that ``index.csv`` holds, or None when not recorded (a run
    reviewed before this was kept) or unreadable."""
    path = Path(run_dir) / APPLIED_NAME
    try:
        value = json.loads(path.read_text(encoding="ascii"))["log_bytes"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    return value if isinstance(value, int) and value >= 0 else None


def mark_applied(run_dir: str | os.PathLike, log_bytes: int) -> None:
    """Record that ``index.csv`` holds the first ``log_bytes`` bytes of the log."""
    path = refuse_links_in(run_dir, Path(run_dir) / APPLIED_NAME)
    atomic_write_bytes(path, json.dumps({"log_bytes": int(log_bytes)}).encode("ascii") + b"\n")


def pending_decisions(run_dir: str | os.PathLike) -> tuple[dict[str, str], int]:
    """Tile id → status of the logged decisions ``index.csv`` may not hold yet (the latest
    per tile, in log order), and the log size they run to, bytes.

    Those are the records after the recorded :data:`APPLIED_NAME` offset; without a
    record (or with one past the end of a replaced log), the records newer than
    ``index.csv`` itself."""
    run = Path(run_dir)
    size = log_size(run)
    start = applied_bytes(run)
    if start is not None and start <= size:
        records = read_decisions(run, start)
    else:
        index = run / "index.csv"
        since = index.stat().st_mtime if index.is_file() else 0.0
        records = [r for r in read_decisions(run) if (decision_time(r) or 0.0) > since]
    latest: dict[str, str] = {}
    for record in records:
        status = str(record.get("status", ""))
        if status in REVIEW_STATUSES:
            latest[record["id"]] = status
    return latest, size


def rows_with_logged_decisions(
    run_dir: str | os.PathLike, rows: list[dict[str, str]]
) -> list[dict[str, str]]:
    """``rows`` (the run's index) with the logged decisions it does not hold yet applied
    (a review server still running, or killed before its index write), in place."""
    latest, _ = pending_decisions(run_dir)
    if latest:
        for row in rows:
            if row.get("id") in latest:
                row["review_status"] = latest[row["id"]]
    return rows


def replay_decisions(run_dir: str | os.PathLike) -> dict[str, str]:
    """Apply the logged decisions ``index.csv`` does not hold yet (see
    :func:`pending_decisions`) and record the log as applied; the caller holds the run
    folder's lock. Returns tile id → status of the rows it changed. A logged tile no
    longer in the index is skipped with a warning."""
    run = Path(run_dir)
    latest, size = pending_decisions(run)
    if not latest:
        if size and applied_bytes(run) != size:
            mark_applied(run, size)
        return {}
    current = {row["id"]: review_status(row) for row in read_index(run)}
    for tile_id in sorted(set(latest) - set(current)):
        log.warning("%s: a logged decision names tile %r, which is not in the index",
                    run / DECISIONS_NAME, tile_id)
    changes = {t: s for t, s in latest.items() if t in current and current[t] != s}
    if changes:
        update_index(run, {t: {"review_status": s} for t, s in changes.items()})
    if size:
        mark_applied(run, size)
    return changes
