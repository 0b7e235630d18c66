"""``project.qpproj`` as a file on disk: finding it, reading it with a fingerprint (so a
change by QuPath is noticed), and replacing it atomically with a backup of the old bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histosynth.common.files import atomic_write_bytes
from histosynth.integration.errors import InputError
from histosynth.integration.files import MAX_PROJECT_BYTES, parse_json, read_input_bytes

__all__ = [
    "BACKUP_SUFFIX",
    "PROJECT_FILE",
    "Fingerprint",
    "changed_since",
    "check_unchanged",
    "fingerprint",
    "locate_project",
    "parse_json_object",
    "read_json_object",
    "read_with_fingerprint",
    "replace_with_backup",
]

PROJECT_FILE = "project.qpproj"
BACKUP_SUFFIX = ".backup"


def locate_project(path: str | os.PathLike) -> Path:
    """The absolute path of the ``project.qpproj`` that ``path`` (the file or its folder)
    names; InputError when there is none."""
    given = Path(path).expanduser()
    if given.is_dir():
        given = given / PROJECT_FILE
        if not given.is_file():
            raise InputError(f"no {PROJECT_FILE} in this folder", path=given.parent)
    elif not given.exists():
        raise InputError("no such file or folder", path=given)
    return given.absolute()


def parse_json_object(data: bytes, path: Path) -> dict[str, Any]:
    """``data`` (UTF-8, BOM allowed) as a JSON object; InputError naming ``path`` if not."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path=path) from None
    value = parse_json(text, path)
    if not isinstance(value, dict):
        raise InputError(f"expected a JSON object, found {type(value).__name__}", path=path)
    return value


def _read_bytes(path: Path) -> bytes:
    return read_input_bytes(path, max_bytes=MAX_PROJECT_BYTES)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in the file ``path`` (at most ``MAX_PROJECT_BYTES``)."""
    return parse_json_object(_read_bytes(path), path)


@dataclass(frozen=True)
class Fingerprint:
    """What identifies the file as read: modification time (ns), size and SHA-256."""

    mtime_ns: int
    size: int
    sha256: str


def fingerprint(data: bytes, st: os.stat_result) -> Fingerprint:
    """The fingerprint of a file holding ``data`` with the status ``st``."""
    return Fingerprint(st.st_mtime_ns, st.st_size, hashlib.sha256(data).hexdigest())


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path=path) from None


def read_with_fingerprint(path: Path) -> tuple[bytes, Fingerprint]:
    """The file's bytes and their fingerprint (re-read if it changed while reading)."""
    for _ in range(5):
        before = _stat(path)
        data = _read_bytes(path)
        after = _stat(path)
        if (before.st_mtime_ns, before.st_size) == (after.st_mtime_ns, after.st_size) and (
            len(data) == after.st_size
        ):
            return data, fingerprint(data, after)
    raise InputError("the file keeps changing while it is read; is QuPath saving it?", path=path)


def changed_since(path: Path, old: Fingerprint) -> str | None:
    """Why the file ``path`` is no longer the one read with fingerprint ``old`` (``None``
    if it is the same: modification time, size and SHA-256 unchanged)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "it was deleted"
    except OSError as exc:
        return f"it cannot be read: {exc.strerror or exc}"
    if st.st_size != old.size:
        return f"its size changed ({old.size} -> {st.st_size} bytes)"
    if st.st_mtime_ns != old.mtime_ns:
        return "its modification time changed"
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        return f"it cannot be read: {exc.strerror or exc}"
    if digest != old.sha256:
        return "its content changed"
    return None


def check_unchanged(path: Path, old: Fingerprint) -> None:
    """Raise :class:`InputError` when the project file changed since it was read."""
    why = changed_since(path, old)
    if why is not None:
        raise InputError(
            f"the project file changed on disk since it was read ({why}); it may be open "
            "in QuPath: close the project in QuPath and run again",
            path=path,
        )


def _mode(path: Path) -> int:
    try:
        return path.stat().st_mode
    except OSError:
        return 0o644


def replace_with_backup(
    path: Path, old_data: bytes, new_data: bytes, old: Fingerprint
) -> tuple[Path, Fingerprint]:
    """Keep ``old_data`` as ``<path>.backup``, then replace ``path`` by ``new_data``
    atomically (keeping its permissions); return the backup's path and the new file's
    fingerprint.

    Raises:
        InputError: the file changed since it was read (fingerprint ``old``), or it
            cannot be written.
    """
    backup = path.with_name(path.name + BACKUP_SUFFIX)
    mode = stat.S_IMODE(_mode(path))
    try:
        atomic_write_bytes(backup, old_data)
        check_unchanged(path, old)
        atomic_write_bytes(path, new_data)
    except OSError as exc:
        raise InputError(
            f"cannot write the project: {exc.strerror or exc}",
            path=getattr(exc, "filename", None) or path,
        ) from None
    with contextlib.suppress(OSError):
        os.chmod(path, mode)
    return backup, fingerprint(new_data, _stat(path))
