"""Reading input files defensively: regular files only, bounded sizes and JSON depth.

A FIFO or a device (``/dev/zero``) would block or never end; a multi-GB file read whole
would exhaust memory; a JSON value nested 100 000 deep ends Python's parser in a
``RecursionError``. Each becomes one :class:`InputError` naming the file, raised before
anything is read or written.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import zlib
from pathlib import Path
from typing import Any

from histosynth.integration.errors import InputError

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_PROJECT_BYTES",
    "check_not_special",
    "parse_json",
    "read_input_bytes",
]

#: Largest GeoJSON / annotation export read, bytes (a whole slide's cells: a few GB).
MAX_JSON_BYTES = 4 * 2**30
#: Largest ``project.qpproj`` or run record read, bytes.
MAX_PROJECT_BYTES = 256 * 2**20

_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _size_text(size: int) -> str:
    return f"{size / 2**20:.0f} MiB" if size >= 2**20 else f"{size} bytes"


def check_not_special(path: str | os.PathLike, label: str | None = None) -> None:
    """InputError naming ``path`` (or ``label``) when it is a FIFO, a device or a socket:
    reading one would block or never end. Missing paths and folders pass (the caller
    says what it needs)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return
    for test, kind in _KINDS:
        if test(mode):
            raise InputError(f"is {kind}, not a regular file", path=label or path)


def read_input_bytes(
    path: str | os.PathLike,
    *,
    max_bytes: int = MAX_JSON_BYTES,
    gunzip: bool = False,
    label: str | None = None,
) -> bytes:
    """The bytes of the regular file ``path`` (at most ``max_bytes``; with ``gunzip``, a
    gzip file is decompressed, to at most ``max_bytes`` too). InputError naming the file
    (or ``label``) when it is missing, a folder, a FIFO / device / socket, unreadable or
    too large."""
    source = Path(path)
    path = label or source
    try:
        info = os.stat(source)
    except FileNotFoundError:
        raise InputError("file not found", path=path) from None
    except (OSError, ValueError) as exc:
        raise InputError(
            f"cannot read: {getattr(exc, 'strerror', None) or exc}", path=path
        ) from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError("is a folder, not a file", path=path)
    for test, kind in _KINDS:
        if test(info.st_mode):
            raise InputError(f"is {kind}, not a regular file", path=path)
    if info.st_size > max_bytes:
        raise InputError(
            f"is {_size_text(info.st_size)}, more than the {_size_text(max_bytes)} this reader "
            "accepts",
            path=path,
        )
    try:
        with open(source, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path=path) from None
    if len(data) > max_bytes:  # it grew while we read it
        raise InputError(f"is more than the {_size_text(max_bytes)} this reader accepts", path=path)
    if gunzip and data[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as archive:
                data = archive.read(max_bytes + 1)
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(f"cannot decompress: {exc}", path=path) from None
        if len(data) > max_bytes:
            raise InputError(
                f"decompresses to more than the {_size_text(max_bytes)} this reader accepts",
                path=path,
            )
    return data


def parse_json(text: str | bytes, path: str | os.PathLike | None) -> Any:
    """``json.loads(text)``; InputError naming ``path`` when it is not JSON or nests
    deeper than the parser can follow (about a thousand levels)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})", path=path
        ) from None
    except RecursionError:
        raise InputError(
            "JSON nested too deeply (more than about a thousand levels of arrays / objects)",
            path=path,
        ) from None
