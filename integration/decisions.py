"""The reviewers' decisions log of a run: ``RUN/review/decisions.jsonl``.

One JSON object per ``\n``-terminated line (ASCII: every other character escaped, so no
text a reviewer types — U+2028, U+0085, ``\r`` — can split a record), appended, flushed
and fsynced before the decision is applied to
``index.csv``: ``time`` (UTC, ISO 8601 with ms and ``Z``), ``id``, ``status``, ``before``
(the status it replaced), ``reviewer``, ``comment``, ``undo`` (it undoes the previous
decision of the page), ``source`` (``browser``). A line torn by a kill is skipped when
read, so the log is valid after any crash.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "DECISIONS_NAME",
    "append_decision",
    "latest_decision_times",
    "read_decisions",
    "utc_now_ms",
]

#: The decisions log, relative to the run folder.
DECISIONS_NAME = "review/decisions.jsonl"


def utc_now_ms() -> str:
    """Now in UTC, ISO 8601 with milliseconds and ``Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def append_decision(run_dir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one decision to the run's log (flushed and fsynced before it returns)."""
    path = Path(run_dir) / DECISIONS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(dict(record), ensure_ascii=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_decisions(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The decisions logged in the run, oldest first (a torn line is skipped)."""
    path = Path(run_dir) / DECISIONS_NAME
    if not path.is_file():
        return []
    out = []
    # split on "\n" alone: str.splitlines() also breaks at U+2028, U+0085, \r … which a
    # log written by an older version may hold inside a comment
    for line in path.read_text(encoding="utf-8").split("\n"):
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
        try:
            when = datetime.fromisoformat(str(record.get("time", "")).replace("Z", "+00:00"))
        except ValueError:
            continue
        out[record["id"]] = max(out.get(record["id"], 0.0), when.timestamp())
    return out
