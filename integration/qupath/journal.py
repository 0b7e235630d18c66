"""The write-back journal: a killed write-back is rolled back by the next one.

Native write-back writes the sidecars ``P/annotations/<entryID>.geojson`` first and
saves ``project.qpproj`` last. Before the first sidecar lands it records them — entry
id, path and SHA-256 of the bytes — in ``P/.histosynth-journal.json``; after the save it
removes the record. A process killed in between leaves the record, so the next writer
(holding the project lock: no writer is alive) knows exactly which files were its
predecessor's: sidecars of entries the project does not hold are removed (their ids
are planned again), those of saved entries kept. Temporary files of dead writers
(``.<name>.XXXXXXXX.tmp``, the atomic writes' names) are removed too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from histosynth.common.files import atomic_write_json
from histosynth.integration.errors import InputError
from histosynth.integration.files import MAX_PROJECT_BYTES, parse_json, read_input_bytes

__all__ = ["JOURNAL_NAME", "begin", "finish", "recover"]

log = logging.getLogger("histosynth")

JOURNAL_NAME = ".histosynth-journal.json"
#: Names of the atomic writes' temporary files (``tempfile.mkstemp``: 8 random chars).
_TEMP = re.compile(
    r"^\.(?:project\.qpproj(?:\.backup)?|[0-9]+\.geojson|\.histosynth-journal\.json)"
    r"\.[a-z0-9_]{8}\.tmp$"
)


def begin(folder: Path, run: Path, run_name: str, sidecars: list[tuple[int, Path, bytes]]) -> Path:
    """Record the sidecars about to be written (entry id, path, bytes) before any is."""
    path = folder / JOURNAL_NAME
    atomic_write_json(
        path,
        {
            "format_version": 1,
            "pid": os.getpid(),
            "run": str(run),
            "run_name": run_name,
            "sidecars": [
                {
                    "entry_id": int(entry_id),
                    "path": os.path.relpath(sidecar, folder),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
                for entry_id, sidecar, data in sidecars
            ],
        },
    )
    return path


def finish(folder: Path) -> None:
    """The write-back is saved (or rolled back by itself): drop the record."""
    (folder / JOURNAL_NAME).unlink(missing_ok=True)


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def recover(folder: Path, saved_entry_ids: set[int]) -> list[str]:
    """Roll back what a killed write-back left (call with the project lock held):
    returns one line per file removed. ``saved_entry_ids``: the project's entries."""
    removed: list[str] = []
    path = folder / JOURNAL_NAME
    if path.is_file():
        try:
            record: Any = parse_json(read_input_bytes(path, max_bytes=MAX_PROJECT_BYTES), path)
        except InputError as exc:
            log.warning("%s; it is ignored and removed", exc)
            record = {}
        planned = record.get("sidecars") if isinstance(record, dict) else None
        for item in planned if isinstance(planned, list) else []:
            if not isinstance(item, dict):
                continue
            entry_id, rel, digest = item.get("entry_id"), item.get("path"), item.get("sha256")
            if not isinstance(rel, str) or not isinstance(digest, str):
                continue
            sidecar = (folder / rel).resolve()
            if sidecar.parent != (folder / "annotations").resolve():
                continue  # only ever a sidecar of this project
            if entry_id in saved_entry_ids or _sha256(sidecar) != digest:
                continue  # saved with its entry, or not the file that was recorded
            sidecar.unlink(missing_ok=True)
            removed.append(
                f"removed {sidecar.name}, left by a write-back of "
                f"{record.get('run_name', '?')!r} that was killed before its save"
            )
        path.unlink(missing_ok=True)
    for where in (folder, folder / "annotations"):
        if not where.is_dir():
            continue
        for temp in where.iterdir():
            if _TEMP.match(temp.name) and temp.is_file():
                temp.unlink(missing_ok=True)
                removed.append(f"removed the temporary file {temp.name} of a killed writer")
    for line in removed:
        log.info("%s: %s", folder, line)
    return removed
