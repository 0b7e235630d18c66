"""Atomic writes: write a temporary file beside the target, fsync it, rename it over the
target, fsync the folder.

A reader (or a crash) sees either the old file or the new one, never half of either, and
after a power cut the rename itself is on disk. A target that is a symbolic link is
written through to the file it points to (the link stays a link); run folders refuse
links before they write (``histosynth.integration.run_folder.refuse_links_in``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "atomic_write_with",
    "file_sha256",
    "folder_written_in_place",
    "fsync_dir",
    "replace_durably",
    "temporary_path",
]


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (64 hex digits) of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename, a new file) to disk; a no-op where folders
    cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_durably(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """``os.replace(source, target)``, then fsync the target's folder."""
    os.replace(source, target)
    fsync_dir(Path(target).parent)


@contextlib.contextmanager
def folder_written_in_place(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty folder beside ``folder`` (``.<name>.tmp-XXXXXXXX``) to write into;
    when the block ends without an error it replaces ``folder`` (an existing one is moved
    aside first, then removed), else it is removed and ``folder`` is left as it was."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(folder, old)
            replace_durably(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            replace_durably(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def temporary_path(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """A new, empty temporary file beside ``path`` (``.<name>.XXXXXXXX<suffix>``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    path = _through_links(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        replace_durably(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_with(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Let ``write(tmp)`` make the file at the temporary path ``tmp`` beside ``path`` (for
    writers that want a file name: tifffile, SQLite, h5py, torch.save), fsync it and
    rename it onto ``path``; the temporary file is removed if anything fails. Returns
    ``path``."""
    path = _through_links(path)
    tmp = temporary_path(path)
    try:
        write(str(tmp))
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (UTF-8, non-ASCII kept) to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def _through_links(path: str | os.PathLike) -> Path:
    """``path``, or the file its chain of symbolic links ends at (renaming onto a link
    would replace the link itself with a plain file)."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
